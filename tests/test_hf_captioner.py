"""`--captioner hf`: any image-text-to-text model of transformers in this process, on tiny random Qwen2.5-VL and
SmolVLM (Idefics3) folders in the hub's layout (tests/tiny_vlms.py): answers, store ids, a training run, the dry run."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latteclip_nb.hf_captioner import HF_MAX_PIXELS, HFCaptioner, bound_pixels
from latteclip_nb.llava import model_fingerprint
from tiny_vlms import build_tiny_idefics3, build_tiny_qwen25vl

PROMPTS = ["Describe the texture in the photo concisely, less than 20 words.",
           "Describe the common visual attributes of the flowers in all the photos concisely, less than 20 words.",
           "Describe the scene."]


@pytest.fixture(autouse=True, scope="module")
def own_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LATTECLIP_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def models(tmp_path_factory, own_cache):
    root = tmp_path_factory.mktemp("models")
    # Qwen2.5-VL with the real processor bound (12.8 megapixels), so only the captioner's bound limits the tokens
    return {"qwen": build_tiny_qwen25vl(root / "Qwen2.5-VL-tiny", max_pixels=12845056),
            "smolvlm": build_tiny_idefics3(root / "SmolVLM-tiny")}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((60, 80), (336, 336), (800, 1000))]


@pytest.mark.parametrize("family", ["qwen", "smolvlm"])
def test_answers_batched_static_and_named_by_content(models, images, family):
    cap = HFCaptioner(models[family], batch_size=3, max_new_tokens=8)
    answers = cap.describe(images, PROMPTS)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers) and len(set(answers)) > 1
    assert answers == [cap.describe([im], [p])[0] for im, p in zip(images, PROMPTS)]   # left padding is right
    cap.decoding = "static"
    assert cap.describe(images, PROMPTS) == answers                                    # the static cache changes nothing
    folder = Path(models[family])
    assert cap.model_id == f"{folder.name}@{model_fingerprint(folder)}:transformers-auto:fp32:max{HF_MAX_PIXELS}px"
    assert cap.stats.answers == 9 and str(folder.parent) not in cap.model_id


def test_qwen_images_are_bounded(models, images):
    # Qwen2.5-VL's dynamic resolution: one 28x28 block per token; the 1000x800 image is bounded to 448x448 pixels
    full, bounded = HFCaptioner(models["qwen"], max_pixels=0), HFCaptioner(models["qwen"])
    pad = full.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    count = lambda cap: int((cap.inputs(images[2:], PROMPTS[2:])["input_ids"] == pad).sum())
    w, h = bound_pixels(images[2]).size
    assert count(full) == round(1000 / 28) * round(800 / 28)                          # 36 x 29 blocks, as they are
    assert count(bounded) == round(w / 28) * round(h / 28) <= HF_MAX_PIXELS // 28**2  # at most 256
    assert full.model_id.endswith(":fullres") and full.model_id != bounded.model_id  # never the same store key


def test_a_run_trains_on_their_captions_and_the_dry_run_counts_them(models, tmp_path, capsys):
    from latteclip_nb.captions import main as caption_main
    from latteclip_nb.caption_store import CaptionStore
    from latteclip_nb.experiment import main as train_main
    qwen, store, out = models["qwen"], tmp_path / "captions", tmp_path / "run"
    assert caption_main(["shapes", "--captioner", "hf", "--captioner-model", str(qwen), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["images"] == 1600 and plan["calls"] == plan["images"] + plan["groups"]
    args = ["--dataset", "shapes", "--captioner", "hf", "--captioner-model", str(qwen), "--data-fraction", "0.01",
            "--max-steps", "2", "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--captions-dir", str(store),
            "--out-dir", str(out), "--no-report"]
    assert train_main(args) in (0, None), capsys.readouterr().err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    want = f"{qwen.name}@{model_fingerprint(qwen)}:transformers-auto:fp32:max{HF_MAX_PIXELS}px"
    assert metrics["captioner"] == want
    with CaptionStore(store, shard=None) as s:
        models_seen = {k[3] for k in s.records}
    assert models_seen == {want}                                                       # 16 images and their groups

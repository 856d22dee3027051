"""Tests of latteclip_nb.captioners on the tiny offline LLaVA-NeXT (llava-hf's folder layout) and a live `transformers serve`."""
import json, os, shutil, socket, subprocess, sys, time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import httpx
import openai
import pytest
import torch
from PIL import Image

from latteclip_nb.captioners import (CaptionerError, LlavaCaptioner, OpenAICaptioner, build_tiny_llava, clean_answer,
                                     checkpoint_ref, llava_precision, llava_zero_shot, load_llava, match_answer,
                                     model_fingerprint, nf4_config, transformers_server, with_retries)
from latteclip_nb.data import Split
from latteclip_nb.prompts import llava_chat

PROMPTS = ["Describe the texture in the photo concisely, less than 20 words.", "Describe the scene.", "Write red."]


def noise(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(autouse=True, scope="module")
def own_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LATTECLIP_CACHE", str(tmp_path_factory.mktemp("cache")))  # the file-hash memo goes here
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, own_cache):
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="module")
def images():
    return [noise(90, 140, 0), noise(336, 336, 1), noise(200, 60, 2)]


@pytest.fixture(scope="module")
def server(tiny):
    with transformers_server(tiny, device="cpu", env={"OMP_NUM_THREADS": "1"}) as url:
        yield url


def test_tiny_llava_is_built_once(tiny):
    stamp = (tiny / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llava(tiny) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_llava_refuses_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir(); (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes|not a tiny LLaVA"):
        build_tiny_llava(tmp_path / "x")


def test_chat_template_matches_llava_chat(tiny):
    from transformers import LlavaNextProcessor
    proc = LlavaNextProcessor.from_pretrained(tiny)
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    assert proc.apply_chat_template(msg, add_generation_prompt=True, tokenize=False) == llava_chat("Describe it.")  # no <s>


def test_single_view_is_llava_next_global_view(tiny, images):
    sv_model, sv_proc = load_llava(tiny, single_view=True)
    ax_model, ax_proc = load_llava(tiny, single_view=False)
    image_id = sv_proc.tokenizer.image_token_id
    sv = sv_proc(images=images, text=[llava_chat("Hi.")] * 3, return_tensors="pt", padding=True)
    ax = ax_proc(images=images, text=[llava_chat("Hi.")] * 3, return_tensors="pt", padding=True)
    assert (sv.input_ids == image_id).sum(1).tolist() == [576] * 3          # one 24x24 view, no newline token
    assert (ax.input_ids == image_id)[1].sum() == 576 + 24 * 25             # square: global + 2 tiles unpadded to 24x24
    assert all((ax.input_ids == image_id)[i].sum() > 576 for i in range(3))
    assert torch.equal(sv.pixel_values, ax.pixel_values[:, 0])               # the squashed global view
    with torch.no_grad():
        f_sv = sv_model.model.get_image_features(pixel_values=sv.pixel_values, return_dict=True).pooler_output
        f_ax = ax_model.model.get_image_features(pixel_values=ax.pixel_values, image_sizes=ax.image_sizes,
                                                 return_dict=True).pooler_output
    assert all(torch.allclose(a, b[:576], atol=1e-6) for a, b in zip(f_sv, f_ax))
    ax_weights = ax_model.state_dict()
    assert set(ax_weights) - set(sv_model.state_dict()) == {"model.image_newline"}
    assert all(torch.equal(w, ax_weights[k]) for k, w in sv_model.state_dict().items())


@pytest.mark.parametrize("single_view", [True, False])
def test_batch_equals_one_at_a_time(tiny, images, single_view):
    cap = LlavaCaptioner(tiny, single_view=single_view, batch_size=3, max_new_tokens=5)
    batched = cap.describe(images, PROMPTS)
    tok = cap.processor.tokenizer
    assert len(batched) == 3 and all(a and tok.unk_token_id not in tok(a, add_special_tokens=False).input_ids for a in batched)
    assert batched == [cap.describe([im], [p])[0] for im, p in zip(images, PROMPTS)]
    assert cap.model_id.endswith(":transformers:single_view:fp32:bos" if single_view else ":transformers:anyres:fp32:bos")


def test_empty_and_over_long_are_kept_and_counted(tiny, images):
    cap = LlavaCaptioner(tiny, max_new_tokens=4)
    answers = cap.describe(images, PROMPTS)
    cut = cap.stats.over_long
    assert cap.stats.answers == 3 and cap.stats.empty == 0 and cut >= 1  # random weights rarely stop in 4 tokens
    cap.max_new_tokens = 10
    longer = cap.describe(images, PROMPTS)
    assert all(l.startswith(a) for l, a in zip(longer, answers))  # greedy: more budget only extends the cut answers
    assert sum(l != a for l, a in zip(longer, answers)) <= cut
    cap.max_new_tokens = 4
    eos, n = cap.processor.tokenizer.eos_token_id, cap.model.get_output_embeddings().weight.shape[0]
    cap.generate_kwargs = {"suppress_tokens": [i for i in range(n) if i != eos]}  # only </s> allowed: empty answers
    before = cap.stats.over_long
    assert cap.describe(images[:2], PROMPTS[:2]) == ["", ""]
    assert (cap.stats.answers, cap.stats.empty, cap.stats.over_long) == (8, 2, before)


def test_mismatched_lengths_rejected(tiny, images):
    cap = LlavaCaptioner(tiny, max_new_tokens=2)
    with pytest.raises(ValueError, match="3 images and 1 prompts"):
        cap.describe(images, PROMPTS[:1])


def test_missing_weights_error_is_clear(tmp_path):
    with pytest.raises(OSError, match="build_tiny_llava") as e:
        LlavaCaptioner(str(tmp_path / "missing"), device="cpu")
    assert str(tmp_path / "missing") in str(e.value)


def test_precision():
    name, dtype, bnb = llava_precision("auto", "cuda")
    assert (name, dtype) == ("nf4", torch.float16)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.float16 and "model.vision_tower" in bnb.llm_int8_skip_modules
    assert llava_precision("auto", "cpu") == ("fp32", torch.float32, None)
    assert llava_precision("bf16", "cpu") == ("bf16", torch.bfloat16, None)
    with pytest.raises(ValueError, match="CUDA"):
        llava_precision("nf4", "cpu")
    with pytest.raises(ValueError, match="int3"):
        llava_precision("int3", "cpu")


def test_clean_answer():
    assert clean_answer("  Red\nstripes.\n ") == "Red stripes."


def test_retry_policy():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3: raise openai.APIConnectionError(request=httpx.Request("POST", "http://127.0.0.1/v1"))
        return "ok"
    assert with_retries(flaky, retries=2, backoff=0.001) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(openai.APIConnectionError):
        with_retries(flaky, retries=1, backoff=0.001)
    assert len(calls) == 2

    def wrong():
        calls.append(1); raise ValueError("bad request")
    calls.clear()
    with pytest.raises(ValueError):
        with_retries(wrong, retries=5, backoff=0.001)
    assert len(calls) == 1


def test_server_down_names_url_and_fix(images):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    cap = OpenAICaptioner(f"http://127.0.0.1:{port}", "m", retries=2, backoff=0.01, concurrency=3)
    with pytest.raises(CaptionerError) as e:
        cap.describe(images, PROMPTS)
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/v1" in msg and "vllm serve" in msg and "transformers serve" in msg
    assert e.value.answers == [None] * 3 and cap.stats.failed == 3


def test_openai_captioner_matches_in_process_anyres(tiny, images, server):
    served = OpenAICaptioner(server, str(tiny), max_tokens=6, concurrency=3, retries=1, timeout=60, bos="server")
    got = served.describe(images, PROMPTS)
    local = LlavaCaptioner(tiny, single_view=False, max_new_tokens=6)
    want = local.describe(images, PROMPTS)
    assert got == want  # same model, same prompt ids (BOS included), greedy: the server path changes nothing
    assert served.stats.answers == 3 and served.stats.failed == 0 and served.stats.over_long == local.stats.over_long
    assert served.model_id == f"tiny-llava@{model_fingerprint(tiny)}:served:anyres:server-bos" != local.model_id


def test_openai_failure_keeps_finished_answers(tiny, images, server):
    class OneBad(OpenAICaptioner):
        def _ask(self, image, prompt, stop):
            if prompt == "boom": raise ValueError("boom")
            return super()._ask(image, prompt, stop)
    cap = OneBad(server, str(tiny), max_tokens=3, concurrency=2, retries=0, bos="server")
    with pytest.raises(CaptionerError, match="1 of 3 requests") as e:
        cap.describe(images, [PROMPTS[0], "boom", PROMPTS[2]])
    answers = e.value.answers
    assert answers[1] is None and isinstance(answers[0], str) and isinstance(answers[2], str)
    assert cap.stats.answers == 2 and cap.stats.failed == 1


def test_match_answer():
    classes = ["car", "sports car", "Sunflower", "cheese_cake", "bus", "van"]
    assert match_answer("Sports Car.", classes) == 1
    assert match_answer("cheese-cake!", classes) == 3
    assert match_answer("The image shows a sports car.", classes) == 1  # longest contained
    assert match_answer("a car", classes) == 0
    assert match_answer("a bus or a van", classes) is None              # ambiguous
    assert match_answer("sunflowers", classes) == 2                     # close spelling
    assert match_answer("carpet", ["car", "pet"]) is None
    assert match_answer("", classes) is None and match_answer("?!", classes) is None


class Scripted:
    """Fixed answers in order: a stand-in for the captioner interface in bookkeeping tests."""
    model_id = "scripted"

    def __init__(self, answers): self.answers, self.asked = list(answers), 0

    def describe(self, images, prompts):
        self.asked += len(images)
        out, self.answers = self.answers[:len(images)], self.answers[len(images):]
        return out


def test_llava_zero_shot_scores_and_resumes(tmp_path):
    for k in range(4): Image.new("RGB", (8, 8), (50 * k, 0, 0)).save(tmp_path / f"{k}.png")
    (tmp_path / "4.png").write_bytes(b"not a png")
    split = Split(tmp_path, [f"{k}.png" for k in range(5)], [0, 1, 1, 0, 1], ["circle", "square"])
    cache = tmp_path / "zs.jsonl"
    res = llava_zero_shot(Scripted(["Circle.", "a red square", "circle", "no idea"]), split, batch_size=3, cache_file=cache)
    assert res["preds"].tolist() == [0, 1, 0, -1, -1]                  # the unreadable image is unmatched
    assert res["top1"] == pytest.approx(2 / 5) and res["match_rate"] == pytest.approx(3 / 5)
    assert len(cache.read_text().splitlines()) == 4                   # the unreadable one is not cached
    with open(cache, "a") as f: f.write('{"id": "0.png", "ans')         # torn record from a crash
    again = Scripted([])
    assert llava_zero_shot(again, split, cache_file=cache)["preds"].tolist() == [0, 1, 0, -1, -1] and again.asked == 0
    other = Scripted(["square"] * 4)
    other.model_id = "another-model"                                   # cached answers of another model are not reused
    assert llava_zero_shot(other, split, cache_file=cache)["preds"].tolist() == [1, 1, 1, 1, -1] and other.asked == 4
    assert all(json.loads(l)["model"] in ("scripted", "another-model") for l in cache.read_text().splitlines()[-4:])


def test_llava_zero_shot_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="labeled"):
        llava_zero_shot(Scripted([]), Split(tmp_path, ["a.png"], None, ["x", "y"]))


def test_llava_zero_shot_on_tiny_model(tiny, tmp_path):
    for k in range(3): noise(40, 50, k).save(tmp_path / f"{k}.png")
    split = Split(tmp_path, [f"{k}.png" for k in range(3)], [0, 1, 0], ["red", "green"])
    cap = LlavaCaptioner(tiny, max_new_tokens=3)
    res = llava_zero_shot(cap, split, batch_size=2)
    assert len(res["answers"]) == 3 and res["preds"].shape == (3,)
    assert res["preds"].tolist() == [-1 if (c := match_answer(a, split.classnames)) is None else c for a in res["answers"]]


# ------------------------------------------------------------------ the real checkpoint layout and a first GPU run
def test_tiny_llava_has_the_llava_hf_layout(tiny):
    from safetensors import safe_open
    from transformers import AutoTokenizer
    with safe_open(tiny / "model.safetensors", "pt") as f: names = list(f.keys())
    assert {n.split(".")[0] for n in names} == {"language_model", "vision_tower", "multi_modal_projector", "image_newline"}
    assert any(n.startswith("language_model.model.layers.") for n in names) and "language_model.lm_head.weight" in names
    tok = AutoTokenizer.from_pretrained(tiny)
    assert json.loads((tiny / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok.convert_ids_to_tokens([len(tok) - 2, len(tok) - 1]) == ["<image>", "<pad>"]
    assert tok("Describe the photo.").input_ids[0] == 1 and tok.convert_ids_to_tokens(tok("a photo").input_ids)[1].startswith("▁")
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] % 64 == 0 and cfg["image_token_index"] == len(tok) - 2
    pre = json.loads((tiny / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaNextImageProcessor" and pre["resample"] == 3
    assert pre["image_grid_pinpoints"] == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert json.loads((tiny / "processor_config.json").read_text())["num_additional_image_tokens"] == 1
    assert "<s>" not in json.loads((tiny / "chat_template.json").read_text())["chat_template"]
    assert sum(p.stat().st_size for p in tiny.iterdir()) < 1_000_000


def test_nf4_quantises_language_model_and_projector_not_vision_tower(tiny):
    """Defect: llm_int8_skip_modules=['vision_tower'] matched nothing under transformers 5's `model.` names."""
    pytest.importorskip("bitsandbytes")
    model, _ = load_llava(tiny, single_view=False, dtype=torch.float16, quantization_config=nf4_config(), device="cpu")
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    part = lambda n: n.split(".")[1] if n.startswith("model.") else n
    assert {part(n) for n in kinds} == {"language_model", "multi_modal_projector", "vision_tower", "lm_head"}
    for n, k in kinds.items():
        assert k == ("Linear4bit" if part(n) in ("language_model", "multi_modal_projector") else "Linear"), (n, k)
    assert "accelerate" in sys.modules  # device_map/4-bit loading needs it: it must be a core requirement


def test_single_view_nf4_loads_every_weight(tiny):
    pytest.importorskip("bitsandbytes")
    model, _ = load_llava(tiny, single_view=True, dtype=torch.float16, quantization_config=nf4_config(), device="cpu")
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.startswith("model.vision_tower.") and isinstance(m, torch.nn.Linear)}
    assert kinds == {"Linear"} and type(model.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(model.model.multi_modal_projector.linear_1).__name__ == "Linear4bit"


def test_anyres_on_an_older_snapshot_without_num_additional_image_tokens(tiny, images, tmp_path):
    """Defect: the processor's default 0 gave one <image> token per view too few ("features and tokens do not match")."""
    old = build_tiny_llava(tmp_path / "tiny-llava", older_snapshot=True)
    assert "num_additional_image_tokens" not in json.loads((old / "processor_config.json").read_text())
    got = LlavaCaptioner(old, single_view=False, max_new_tokens=3).describe(images[:2], PROMPTS[:2])
    assert got == LlavaCaptioner(tiny, single_view=False, max_new_tokens=3).describe(images[:2], PROMPTS[:2])


def test_model_id_names_content_not_path(tiny, tmp_path):
    cap = LlavaCaptioner(tiny, max_new_tokens=2)
    assert str(tiny.parent) not in cap.model_id and len(cap.model_id) < 80
    moved = shutil.copytree(tiny, tmp_path / "elsewhere" / "tiny-llava")
    assert LlavaCaptioner(moved, max_new_tokens=2).model_id == cap.model_id     # same files, another machine's path
    assert LlavaCaptioner(tiny, single_view=False, max_new_tokens=2).model_id != cap.model_id
    w = moved / "model.safetensors"
    data = bytearray(w.read_bytes()); data[-1] ^= 1; w.write_bytes(bytes(data))  # one weight bit changed
    assert model_fingerprint(moved) != model_fingerprint(tiny)
    assert checkpoint_ref("llava-hf/llava-v1.6-mistral-7b-hf", "a" * 40) == "llava-hf/llava-v1.6-mistral-7b-hf@" + "a" * 12
    assert checkpoint_ref("llava-hf/llava-v1.6-mistral-7b-hf", None, "v2") == "llava-hf/llava-v1.6-mistral-7b-hf@v2"


def test_fingerprint_memo_skips_rehashing(tiny, monkeypatch):
    import latteclip_nb.core as core
    first = model_fingerprint(tiny)
    def no_rehash(path): raise AssertionError(f"{path} is unchanged and was hashed again")
    monkeypatch.setattr(core, "_file_digest", no_rehash)
    assert model_fingerprint(tiny) == first                    # the unchanged folder is not read again
    monkeypatch.undo()
    cfg = Path(tiny) / "config.json"
    original = cfg.read_bytes()
    try:
        cfg.write_bytes(original.replace(b"{", b"{ ", 1))        # other bytes, same meaning: another fingerprint
        assert model_fingerprint(tiny) != first
    finally: cfg.write_bytes(original)
    assert model_fingerprint(tiny) == first


def test_served_and_in_process_ids_differ_and_bos_is_requested(tiny):
    served = OpenAICaptioner("http://127.0.0.1:9/v1", "llava-hf/llava-v1.6-mistral-7b-hf")
    assert served.model_id == "llava-hf/llava-v1.6-mistral-7b-hf:served:anyres:bos"
    sent = []

    def create(**kw):
        sent.append(kw)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=" A cat.\n"), finish_reason="stop")])
    served.client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    assert served.describe([noise(8, 8, 0)], ["Hi."]) == ["A cat."]
    assert sent[0]["extra_body"] == {"add_special_tokens": True} and sent[0]["model"] == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert OpenAICaptioner("http://127.0.0.1:9/v1", "m", bos="server").model_id == "m:served:anyres:server-bos"
    with pytest.raises(ValueError, match="bos="):
        OpenAICaptioner("http://127.0.0.1:9/v1", "m", bos="maybe")


def test_transformers_serve_builds_the_in_process_prompt(tiny, images):
    """The template emits no <s>: the server's tokenization must still start with BOS, as LlavaCaptioner's does."""
    from transformers import LlavaNextProcessor
    proc = LlavaNextProcessor.from_pretrained(tiny)
    msg = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": PROMPTS[0]}]}]
    served = proc.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=True)
    local = proc(images=[images[0]], text=[llava_chat(PROMPTS[0])])
    assert served["input_ids"][0] == local["input_ids"][0] and local["input_ids"][0][0] == proc.tokenizer.bos_token_id


def test_transformers_serve_rejects_add_special_tokens_with_a_clear_message(tiny, images, server):
    cap = OpenAICaptioner(server, str(tiny), max_tokens=2, retries=0)  # bos="request" is vLLM's field
    with pytest.raises(CaptionerError, match="bos='server'"):
        cap.describe(images[:1], PROMPTS[:1])


def test_import_without_openai_and_papermill():
    code = ("import sys; sys.modules['openai'] = None; sys.modules['papermill'] = None\n"
            "import latteclip_nb.captioners, latteclip_nb.train, latteclip_nb.clip, latteclip_nb.captions, latteclip_nb.experiment\n"
            "from latteclip_nb.captioners import with_retries\n"
            "assert with_retries(lambda: 3, transient=(OSError,)) == 3\n"
            "try: latteclip_nb.captioners.OpenAICaptioner('http://127.0.0.1:9', 'm')\n"
            "except ImportError: print('needs openai')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "needs openai"


def test_compiled_decoding_gives_the_eager_answers(tiny, images, monkeypatch):
    # the compiled path as a GPU takes it (static KV cache, the decode step compiled by torch.compile), forced onto the
    # CPU: the same greedy answers as eager decoding, in the same store key; a short last batch runs padded
    import latteclip_nb.llava as llava
    eager = LlavaCaptioner(str(tiny), batch_size=3, max_new_tokens=8, decoding="eager")
    want = eager.describe(images, PROMPTS)
    monkeypatch.setattr(llava, "compile_support", lambda model: "")
    fast = LlavaCaptioner(str(tiny), batch_size=2, max_new_tokens=8)   # auto: compiled where it can be
    assert fast.decoding == "compiled" and fast.model_id == eager.model_id
    assert fast.describe(images, PROMPTS) == want      # one batch of 2, one of 1 (padded to 1: a power of two)
    assert getattr(fast.model, "_compiled_call", None) is not None   # generate did compile its decode step


def test_auto_batch_on_cuda_fits_the_free_memory(tiny, monkeypatch):
    # the CUDA rule with a fake free-memory figure and a fake probe: the batch is what fits, and it is said once
    import latteclip_nb.llava as llava
    cap = LlavaCaptioner(str(tiny), batch_size=1)
    cap.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(LlavaCaptioner, "probe_item_bytes", lambda self: (100 * 2**20, 650))
    b, why = cap.auto_batch()
    assert b == 87 and "10.0 GiB free" in why and "100 MiB a caption" in why   # floor(0.85 * 10240 / 100)


def test_served_captioner_keeps_its_concurrency_in_flight(tmp_path):
    # a stand-in for the server's client that counts the requests in flight: the default keeps 64 of them waiting
    # on the server through describe_dataset's own batching, whatever --batch-size the in-process captioner would use
    import threading
    from latteclip_nb.captions import run_captioner
    from latteclip_nb.caption_store import CaptionStore, WorkItem
    class Client:
        def __init__(self): self.now, self.peak, self.lock = 0, 0, threading.Lock()
        def create(self, **kw):
            with self.lock: self.now += 1; self.peak = max(self.peak, self.now)
            time.sleep(0.05)
            with self.lock: self.now -= 1
            msg = SimpleNamespace(content="a red circle")
            return SimpleNamespace(choices=[SimpleNamespace(message=msg, finish_reason="stop")])
    cap = OpenAICaptioner("http://127.0.0.1:9/v1", "m")
    client = Client()
    cap.client = SimpleNamespace(chat=SimpleNamespace(completions=client))
    assert (cap.concurrency, cap.batch_size) == (64, 256)
    root = tmp_path / "imgs"; root.mkdir()
    noise(8, 8, 0).save(root / "a.png")
    split = Split(root, ["a.png"] * 300, None, ["x"])
    items = [WorkItem("image", f"k{i}", "Describe.", (i,)) for i in range(300)]
    with CaptionStore(tmp_path / "store", shard=0) as store:
        counts = run_captioner(cap, split, items, store, batch_size=cap.batch_size)
    assert counts["done"] == 300 and client.peak == 64
    assert OpenAICaptioner("http://127.0.0.1:9/v1", "m", concurrency=8).batch_size == 32

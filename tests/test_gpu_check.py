"""bench/gpu_check.py --tiny on CPU: the GPU check runs end to end and writes every field, so it cannot rot between GPU runs."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "x.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LATTECLIP_CACHE": str(tmp_path_factory.mktemp("cache"))}
    p = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text()), p.stdout


def test_environment_and_bookkeeping(report):
    res, stdout = report
    assert res["schema"] == gpu_check.SCHEMA and res["mode"] == "tiny" and res["errors"] == [] and res["finished"] is True
    env = res["environment"]
    import torch, transformers, open_clip
    assert env["device"] == "cpu" and env["gpu"] is None and env["gpu_memory_gib"] is None
    assert (env["torch"], env["transformers"], env["open_clip"]) == (torch.__version__, transformers.__version__, open_clip.__version__)
    assert env["cpu_cores"] >= 1 and env["python"].count(".") == 2
    assert "git_commit" in env and (env["git_commit"] is None or len(env["git_commit"]) == 40)
    assert 0 < res["wall_s"] < res["budget_s"]
    assert set(res["section_s"]) == {"startup", "train", "loader", "caption"}
    # NF4 needs CUDA: on a CPU it is skipped, and the skip is recorded with its reason
    assert any("NF4" in s["what"] and s["why"] for s in res["skipped"])
    # targets are GPU targets: listed with the measured value, never judged on a CPU run
    assert set(res["targets"]) == set(gpu_check.TARGETS)
    assert all(t["met"] is None for t in res["targets"].values())
    assert res["targets"]["latteclip_exact_images_per_s"]["measured"] == res["train"]["methods"]["latteclip_exact"]["images_per_s"]
    assert "training step" in stdout and "captions" in stdout and "targets:" in stdout


def test_train_section(report):
    tr = report[0]["train"]
    assert tr["model"] == "latte-tiny" and tr["batch"] == 16 and tr["precision"] == "fp32" and tr["reps"] == 3
    assert 15 <= tr["description_words"] <= 25          # descriptions of realistic length (~20 words)
    assert tr["description_tokens"] > 20
    m = tr["methods"]
    assert set(m) == {"flyp_pl", "latteclip_exact", "latteclip_fast"}
    for name, r in m.items():
        assert len(r["steps_s"]) == tr["reps"] and all(t > 0 for t in r["steps_s"])
        assert r["min_step_s"] <= r["median_step_s"] <= r["max_step_s"]
        assert math.isclose(r["images_per_s"], tr["batch"] / r["median_step_s"], rel_tol=2e-3)
        # the ratio comes from the medians of this same run
        assert math.isclose(r["ratio_to_flyp_pl"], r["median_step_s"] / m["flyp_pl"]["median_step_s"], rel_tol=2e-3)
        assert r["peak_mem_gib"] is None                  # no GPU: null, not a made-up number
    assert m["flyp_pl"]["ratio_to_flyp_pl"] == 1.0
    # online flyp_pl encodes every class text for its pseudo-labels; latteclip at least one description per image
    assert m["flyp_pl"]["texts_encoded"] >= tr["classes"]
    assert m["latteclip_exact"]["texts_encoded"] >= tr["batch"] and m["latteclip_fast"]["texts_encoded"] >= tr["batch"]
    # distinct text-tower shapes of a 200-step run: padding can only merge shapes
    ts = tr["text_shapes"]
    assert ts["steps"] == 200 and 1 <= ts["padded"] <= ts["unpadded"] and ts["pad"] == [64, 8]


def test_loader_section(report):
    res = report[0]
    ld = res["loader"]
    assert ld["files"] == 32 and ld["num_workers"] == 1 and ld["batch"] == 16
    assert ld["split_images"] == ld["steps_per_epoch"] * ld["batch"]
    for k in ("loader_images_per_s", "fed_images_per_s", "decode_ms_per_image", "augment_ms_per_image", "view_ms_per_image",
              "workers_bound_images_per_s", "jpeg_mib"):
        assert ld[k] > 0, k
    # fed and resident throughputs of the same latteclip exact step, from the same run
    assert ld["resident_images_per_s"] == res["train"]["methods"]["latteclip_exact"]["images_per_s"]
    assert math.isclose(ld["fed_over_resident"], ld["fed_images_per_s"] / ld["resident_images_per_s"], rel_tol=1e-2)
    assert isinstance(ld["keeps_up"], bool) and ld["statement"]
    # the workers' shared memory: what one batch takes (16 float32 views of 3 x side x side), what they keep in flight
    side = res["train"]["image_size"]
    assert math.isclose(ld["batch_mib"], 16 * 3 * side * side * 4 / 2**20, rel_tol=1e-2)
    if ld["shm_free_gib"] is not None:
        assert ld["shm_need_gib"] <= 0.8 * ld["shm_free_gib"] and ld["num_workers"] == ld["num_workers_asked"] == 1
    # the loader with uint8 workers and the augmentation on the device, without and with the image cache
    for name, cached in (("device_augment", False), ("device_augment_image_cache", True)):
        d = ld[name]
        assert d["image_cache"] is cached and d["loader_images_per_s"] > 0 and d["fed_images_per_s"] > 0, name
        assert math.isclose(d["batch_mib"], 16 * 3 * side * side / 2**20, rel_tol=1e-2)   # uint8: a quarter of the float32 batch
    d = ld["device_augment_image_cache"]
    assert d["cache_side"] == -(-256 * side // 224) and d["cache_mib"] > 0   # 32 JPEGs of 160x120, shorter side capped


def test_caption_section(report):
    cap = report[0]["caption"]
    assert cap["answer_tokens"] == 30 and cap["checkpoint_mib"] > 0
    # the checkpoint's content hash is timed apart from the loads
    assert len(cap["fingerprint"]) == 12 and cap["fingerprint_s"] >= 0
    assert cap["vocab_size"] % 64 == 0   # the tiny model pads its embedding to 64 rows (the 7B build: 32064)
    rows = {(r["view"], r["image"], r["batch"], r["decoding"]): r for r in cap["runs"]}
    # single view as a user gets it (the automatic batch: 8 on a CPU) and at the fixed batches, on the fast path (on a
    # CPU the static cache alone: compile needs CUDA) and eagerly; anyres eagerly at the fixed batches
    assert cap["auto"]["fp32 single"] == dict(batch=8, decoding="eager", compile_unavailable="no CUDA device (cpu)")
    assert set(rows) == ({("single", "photo", b, d) for b in (8, 2, 1) for d in ("static", "eager")}
                         | {("anyres", k, b, "eager") for k in ("photo", "collage") for b in (2, 1)}
                         | {("hf-448px", "photo", 8, d) for d in ("static", "eager")})   # the other describer: its auto batch
    assert {r["model"] for r in cap["runs"] if r["view"] == "hf-448px"} == {"qwen2.5-vl-3b"} and "Qwen2.5-VL" in cap["hf_model"]
    assert cap["auto"]["qwen2.5-vl-3b fp32"]["batch"] == 8
    assert {r["batch_rule"] for r in cap["runs"] if r["batch"] == 8} == {"auto"}
    for (view, kind, b, d), r in rows.items():
        # the eager row follows the fast one on the same images: how many answers differ (here none: same arithmetic)
        assert r["answers_differ"] == (0 if view != "anyres" and d == "eager" else None)
        assert r["projected_food101_h"] == (round(141_400 / r["captions_per_s"] / 3600, 2) if view != "anyres" else None)
    for r in rows.values():
        assert r["precision"] == "fp32" and r["peak_mem_gib"] is None
        assert math.isclose(r["captions_per_s"], r["batch"] / r["median_batch_s"], rel_tol=2e-3)
        assert r["prefill_s"] > 0 and r["decode_s_per_token"] > 0 and r["mean_words"] > 0
        # decode time per token: the median of every later token's own interval, from every timed batch
        assert r["decode_samples"] == r["batches"] * (r["answer_tokens"] - 1)
        assert r["decode_p10_p90_s"][0] <= r["decode_s_per_token"] <= r["decode_p10_p90_s"][1]
        assert r["prefill_s"] + (r["answer_tokens"] - 1) * r["decode_p10_p90_s"][0] <= r["median_batch_s"] * 1.05
    # LLaVA-1.6 geometry: single view (336/14)^2 = 576 tokens; anyres adds the tiles of the best grid with one newline
    # per row: a 672x672 collage -> 2x2 tiles = 48x48 patches + 48 newlines -> 576 + 2352 = 2928; a 500x375 photo -> 2340
    assert {k[:3]: r["image_tokens"] for k, r in rows.items() if k[2] == 1} == {
        ("single", "photo", 1): 576, ("anyres", "photo", 1): 2340, ("anyres", "collage", 1): 2928}


def test_budget_skips_and_records():
    b = gpu_check.Budget(100.0, {"a": 1, "b": 3})
    assert b.ends == {"a": 25.0, "b": 100.0}             # cumulative: what "a" leaves unused goes to "b"
    b.start("a")
    assert b.fits("small", 1.0) and not b.fits("huge", 1e6)
    assert b.skipped == [dict(section="a", what="huge", why=b.skipped[0]["why"], estimate_s=1e6)]
    assert "left of the a budget" in b.skipped[0]["why"]


def test_texts_are_realistic():
    c_zs, texts = gpu_check.make_texts(256, 8)
    assert len(set(texts.image)) == 256 and len(set(texts.group)) == len(texts.group) == 64
    assert all(15 <= len(s.split()) <= 25 for s in texts.image + texts.group)
    # every image's own group is a group of its zero-shot class (groups are shared per class)
    assert (texts.group_label[texts.group_of] == c_zs).all()


def test_refuses_to_replace_a_result(tmp_path):
    f = tmp_path / "x.json"
    f.write_text("{}")
    assert gpu_check.main(["--tiny", "--out", str(f)]) == 2
    assert f.read_text() == "{}"


def test_needs_neither_openai_nor_papermill(tmp_path):
    # a GPU machine may lack both: with their imports blocked, the training and loader sections still run and the
    # JSON is written
    out = tmp_path / "y.json"
    code = ("import sys, runpy; sys.modules['openai'] = None; sys.modules['papermill'] = None; "
            f"sys.argv = ['gpu_check.py', '--tiny', '--sections', 'train,loader', '--reps', '1', '--out', {str(out)!r}]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LATTECLIP_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["train"]["methods"]["latteclip_exact"]["images_per_s"] > 0
    assert res["loader"]["fed_images_per_s"] > 0 and "caption" not in res


def test_7b_config_has_the_real_vocabulary():
    # the tokenizer is trained on a few lines (a few hundred tokens); the embedding and output rows are the real 32064
    from caption_throughput import LLAVA_7B_VOCAB, llava_7b_config
    from latteclip_nb.captioners import tiny_llava_tokenizer
    tok = tiny_llava_tokenizer(vocab_size=32064)
    cfg = llava_7b_config(tok, text_layers=1, vision_layers=1)
    assert len(tok) < 1000 and LLAVA_7B_VOCAB == 32064 and cfg.text_config.vocab_size == 32064
    assert cfg.text_config.hidden_size == 4096 and cfg.text_config.num_key_value_heads == 8


class _Cut(BaseException):
    """A run stopped from outside (a time limit), after the train section."""


def test_json_written_after_every_section(tmp_path, monkeypatch):
    def cut(*a, **kw): raise _Cut()
    monkeypatch.setattr(gpu_check, "loader_section", cut)
    out = tmp_path / "cut.json"
    with pytest.raises(_Cut):
        gpu_check.main(["--tiny", "--sections", "train,loader", "--reps", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["finished"] is False and res["train"]["methods"]["latteclip_exact"]["images_per_s"] > 0
    assert "loader" not in res and res["section_s"]["train"] > 0


def test_bitsandbytes_status_off_cuda():
    import torch
    version, line = gpu_check.bitsandbytes_status(torch.device("cpu"))
    assert line and (version is None) == line.startswith("bitsandbytes does not import")


# ------------------------------------------------------------------ the GPU machine, simulated on this CPU
# The machine has torch, transformers, timm and the rest, but open_clip, ftfy, wcwidth and bitsandbytes only as the
# carried folder (bench/wheels/site, from bench/fetch_wheels.sh), and neither openai nor papermill. Where that folder
# has not been fetched, a stand-in is copied from this environment's packages (their Python files: the mechanism is
# the same).
_ONLY_CARRIED = """
import importlib.machinery, runpy, sys
carried, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
NAMES = {"open_clip", "ftfy", "wcwidth", "bitsandbytes"}
class OnlyCarried:
    def find_spec(self, name, path=None, target=None):
        if name not in NAMES: return None
        spec = importlib.machinery.PathFinder.find_spec(name, [carried])
        if spec is None: raise ModuleNotFoundError(f"No module named {name!r} (not carried)", name=name)
        return spec
sys.meta_path.insert(0, OnlyCarried())
sys.modules["openai"] = None; sys.modules["papermill"] = None
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def _carried(tmp_path) -> Path:
    if (gpu_check.CARRIED / "open_clip").is_dir() and (gpu_check.CARRIED / "bitsandbytes").is_dir(): return gpu_check.CARRIED
    import importlib.util, shutil
    site = tmp_path / "site"
    for name in ("open_clip", "ftfy", "wcwidth", "bitsandbytes"):
        src = importlib.util.find_spec(name).submodule_search_locations[0]
        shutil.copytree(src, site / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return site


def test_simulated_gpu_machine_runs_every_section(tmp_path):
    carried = _carried(tmp_path)
    out = tmp_path / "box.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LATTECLIP_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", _ONLY_CARRIED, str(carried), str(SCRIPT), "--tiny", "--reps", "1",
                        "--carried", str(carried), "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["finished"] is True
    # every package the machine lacks came from the carried folder
    assert res["environment"]["carried"] == ["bitsandbytes", "ftfy", "open_clip", "wcwidth"]
    assert res["environment"]["bitsandbytes"] and res["environment"]["open_clip"]
    assert res["train"]["methods"]["latteclip_exact"]["images_per_s"] > 0 and res["loader"]["fed_images_per_s"] > 0
    assert len(res["caption"]["runs"]) == 12 and any("NF4" in s["what"] for s in res["skipped"])

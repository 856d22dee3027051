"""End-to-end runs of the whole pipeline through `latteclip-train` and `run_experiment`, on tiny generated data."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

from latteclip_nb.data import make_fake_dataset
from latteclip_nb.experiment import ExperimentConfig, run_experiment

TINY = ["--model", "latte-tiny", "--pretrained", "none", "--num-workers", "0", "--batch-size", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dtd-layout dataset and a private cache folder shared by the tests of this module."""
    root = tmp_path_factory.mktemp("exp")
    make_fake_dataset(root / "data", "dtd", n_train=3, n_val=1, n_test=2)
    env = {**os.environ, "LATTECLIP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    return root, env


BIN = Path(sys.executable).parent


def _cli(args, env, cwd):
    return subprocess.run([str(BIN / "latteclip-train"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_cli_latteclip_with_tiny_llava_then_skip(world):
    root, env = world
    out = root / "run-latte"
    args = ["--dataset", "dtd", "--data-root", str(root / "data"), "--method", "latteclip", "--captioner", "tiny",
            "--max-steps", "2", "--out-dir", str(out), *TINY]
    r = _cli(args, env, root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "latteclip" and m["dataset"] == "dtd" and m["n_train"] == 12 and m["n_test"] == 6
    assert 0 <= m["top1"] <= 100 and len(m["per_class"]) == 3 and m["captioner"].startswith("tiny-llava@") and str(root) not in m["captioner"]
    assert m["history"] and m["history"][-1]["step"] == 2 and m["config"]["max_steps"] == 2
    assert (out / "figures" / "confusion.png").exists() and Path(m["classifier_path"]).exists()
    # the captions of every training image and group are in the store, one each
    lines = [json.loads(l) for f in (root / "cache" / "captions" / "dtd").glob("*.jsonl") for l in f.read_text().splitlines()]
    assert sum(l["kind"] == "image" for l in lines) == 12 and len({(l["kind"], l["item_id"]) for l in lines}) == len(lines)
    stamp = (out / "metrics.json").stat().st_mtime
    r2 = _cli(args, env, root)                                   # finished: read back, not rerun
    assert r2.returncode == 0 and (out / "metrics.json").stat().st_mtime == stamp
    assert json.loads(r2.stdout.strip().splitlines()[-1])["top1"] == m["top1"]


def test_cli_bad_dataset_is_one_line(world):
    root, env = world
    r = _cli(["--dataset", "nonesuch", *TINY], env, root)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert "unknown dataset 'nonesuch'" in err and "eurosat" in err


@pytest.mark.parametrize("method", ["zeroshot", "flyp_pl", "oracle", "reclip", "llava_zs"])
def test_every_method_runs(world, method, monkeypatch):
    root, env = world
    monkeypatch.setenv("LATTECLIP_CACHE", env["LATTECLIP_CACHE"])
    cfg = ExperimentConfig(dataset="dtd", data_root=str(root / "data"), method=method, model="latte-tiny", pretrained="none",
                           captioner="tiny", max_steps=2, batch_size=4, num_workers=0, out_dir=str(root / f"run-{method}"))
    m = run_experiment(cfg)
    assert 0 <= m["top1"] <= 100 and 0 <= m["zeroshot_top1"] <= 100 and m["n_classes"] == 3
    if method == "zeroshot": assert m["top1"] == m["zeroshot_top1"]
    if method == "llava_zs": assert 0 <= m["match_rate"] <= 1
    assert json.loads((root / f"run-{method}" / "metrics.json").read_text())["top1"] == m["top1"]


def test_torchrun_two_processes(world):
    """`torchrun --nproc_per_node 2 latteclip-train` (gloo on CPU): one result, written once, by rank 0."""
    root, env = world
    out = root / "run-ddp"
    r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--no-python", str(BIN / "latteclip-train"),
                        "--dataset", "dtd", "--data-root", str(root / "data"), "--method", "flyp_pl", "--max-steps", "2",
                        "--out-dir", str(out), *TINY], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "flyp_pl" and m["history"][-1]["step"] == 2 and 0 <= m["top1"] <= 100

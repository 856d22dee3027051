"""Around a run, as a user types it: one run per out-dir, one writer per caption shard, experiment tracking,
plain progress lines in logs, and the classifier folder as a model card and a Hugging Face hub repository."""
import importlib.util, json, os, shutil, signal, socket, subprocess, sys, time, types
from pathlib import Path

import pytest

from latteclip_nb.data import make_fake_dataset

BIN = Path(sys.executable).parent
TINY = ["--model", "latte-tiny", "--pretrained", "none", "--num-workers", "0", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dtd-layout dataset and a private cache folder shared by the tests of this module."""
    root = tmp_path_factory.mktemp("runs")
    make_fake_dataset(root / "data", "dtd", n_train=3, n_val=1, n_test=2)
    env = {**os.environ, "LATTECLIP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return root, env


def _train(args, env, cwd, **kw):
    return subprocess.run([str(BIN / "latteclip-train"), *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600, **kw)


def _wait_for_holder(lock: Path, proc, limit: float = 300):
    "Wait until the process `proc` has written itself into the lock file `lock` (it holds the lock then)."
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if json.loads(lock.read_text()).get("pid") == proc.pid: return
        except (OSError, ValueError): pass
        time.sleep(0.5)
    raise AssertionError(f"{proc.args} did not take {lock} within {limit} s")


# ---------------------------------------------------------------- one run per out-dir

def test_second_train_into_the_same_out_dir_is_refused_and_a_killed_run_frees_it(world):
    root, env = world
    out = root / "busy"
    base = ["--dataset", "dtd", "--data-root", root / "data", "--method", "flyp_pl", "--out-dir", out, *TINY]
    first = subprocess.Popen([str(BIN / "latteclip-train"), *map(str, base), "--epochs", "5000", "--ckpt-every", "5"],
                             env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(out / "run.lock", first)
        second = _train([*base, "--epochs", "5000", "--ckpt-every", "5", "--max-steps", "2"], env, root)
        assert first.poll() is None                                    # the first run is still working
    finally:
        os.kill(first.pid, signal.SIGKILL); first.communicate()
    assert second.returncode != 0
    err = second.stderr.strip().splitlines()[-1]
    assert err.startswith(f"latteclip-train: error: out-dir {out} is in use by pid {first.pid} on host {socket.gethostname()}")
    assert "latteclip-train" in err and err.endswith("or give another out-dir")
    assert "Traceback" not in second.stderr and not (out / "metrics.json").exists()
    steps = [json.loads(l)["step"] for l in (out / "train" / "steps.jsonl").read_text().splitlines()] \
        if (out / "train" / "steps.jsonl").exists() else []
    assert len(steps) == len(set(steps))                               # no step written twice
    # the kernel dropped the killed run's lock: the next run into the folder works (here: a short one, started over)
    third = _train([*base, "--epochs", "1", "--max-steps", "1", "--overwrite"], env, root)
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["config"]["max_steps"] == 1


# ---------------------------------------------------------------- one writer per caption shard

def test_second_captioner_on_the_same_shard_is_refused(world, tmp_path):
    root, env = world
    silent = socket.socket(); silent.bind(("127.0.0.1", 0)); silent.listen(16)   # a server that never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    store = tmp_path / "store"
    args = ["dtd", "--root", root / "data", "--backend", "openai", "--server-url", url, "--model", "served-llava",
            "--clip-model", "latte-tiny", "--pretrained", "none", "--device", "cpu", "--out", store, "--workers", "1",
            "--cache-dir", tmp_path / "c_zs"]
    cmd = [str(BIN / "latteclip-caption"), *map(str, args)]
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(store / "captions-000.lock", first)
        second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGKILL); first.communicate(); silent.close()
    assert second.returncode != 0 and "Traceback" not in second.stderr
    err = second.stderr.strip().splitlines()[-1]
    assert err.startswith(f"latteclip-caption: error: caption shard 0 of {store} is in use by pid {first.pid} on host ")
    assert "--shard" in err and "--wait" in err
    from latteclip_nb.captions import CaptionStore
    CaptionStore(store, shard=0).close()                               # the killed writer's lock is gone


# ---------------------------------------------------------------- tracking, progress lines, the classifier folder

@pytest.fixture(scope="module")
def tracked(world):
    """One LatteCLIP run (tiny LLaVA captions) logged to TensorBoard, with a progress line at every update."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard, or the [track] extra)")
    root, env = world
    out = root / "tracked"
    r = _train(["--dataset", "dtd", "--data-root", root / "data", "--method", "latteclip", "--captioner", "tiny",
                "--max-steps", "4", "--epochs", "2", "--out-dir", out, "--report-to", "tensorboard", *TINY], {**env, "LATTECLIP_PROGRESS_SECONDS": "0"}, root)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_report_to_tensorboard_writes_steps_epochs_and_the_result(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = tracked
    ea = EventAccumulator(str(out / "tensorboard")).Reload()
    steps = [json.loads(l) for l in (out / "train" / "steps.jsonl").read_text().splitlines()]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("loss", "lr", "agreement"):
        got = [(e.step, e.value) for e in ea.Scalars(f"train/{key}")]
        assert [s for s, _ in got] == [r["step"] for r in steps]
        assert all(abs(v - r[key]) <= 1e-6 * max(1, abs(r[key])) for (_, v), r in zip(got, steps))
    assert [e.step for e in ea.Scalars("epoch/loss")] == [h["step"] for h in m["history"]] and len(m["history"]) == 2
    assert abs(ea.Scalars("eval/top1")[-1].value - m["top1"]) < 1e-3 and "eval/zeroshot_top1" in ea.Tags()["scalars"]


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tracked):
    _, r = tracked
    assert "\r" not in r.stderr                                        # no bar redrawn in the log
    lines = [l for l in r.stderr.splitlines() if l.startswith("latteclip epoch 1/2: ")]
    assert lines and any("(100%) it" in l and "loss=" in l for l in lines), r.stderr[-2000:]


def test_classifier_folder_has_a_model_card_and_no_local_path(tracked, world):
    root, _ = world
    out, _ = tracked
    folder = out / "train" / "classifier"
    meta, m = json.loads((folder / "classifier.json").read_text()), json.loads((out / "metrics.json").read_text())
    def strings(x):
        if isinstance(x, dict): return [s for v in x.values() for s in strings(v)]
        if isinstance(x, list): return [s for v in x for s in strings(v)]
        return [x] if isinstance(x, str) else []
    assert not [s for s in strings(meta) if s.startswith("/") or str(root) in s]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "\nlibrary_name: open_clip\n" in card.split("\n---\n")[0] and "# CLIP classifier for dtd" in card
    assert ", ".join(meta["classnames"]) in card and m["captioner"] in card and "| recipe | reference |" in card
    assert f"| top-1, this model | {m['top1']:.2f} % |" in card and f"| test images | {m['n_test']} |" in card


def test_classifier_folder_loads_from_a_hub_cache_with_open_clip_alone(tracked, tmp_path):
    out, _ = tracked
    folder = out / "train" / "classifier"
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--latte-dtd"
    shutil.copytree(folder, repo / "snapshots" / rev)                  # the folder as uploaded, in the hub's cache layout
    (repo / "refs").mkdir(); (repo / "refs" / "main").write_text(rev)
    image = next(p for p in sorted((out.parent / "data").rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    card = (folder / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace('repo_id, image = "ORG/NAME", "photo.jpg"', f'repo_id, image = "someone/latte-dtd", {str(image)!r}')
    assert "someone/latte-dtd" in snippet
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HOME")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    guard = "import sys; sys.modules['latteclip_nb'] = None\n"   # the card's snippet must not need this package
    r = subprocess.run([sys.executable, "-c", guard + snippet], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from latteclip_nb.train import load_classifier
    clf = load_classifier(folder, device="cpu")
    assert r.stdout.strip().splitlines()[-1] == clf.classnames[int(clf.predict([str(image)])[0])]


# ---------------------------------------------------------------- report_to without its package, W&B offline

def test_report_to_a_missing_tracker_is_one_line_before_any_work(world, tmp_path):
    if importlib.util.find_spec("wandb") is not None: pytest.skip("wandb is installed here")
    root, env = world
    r = _train(["--dataset", "dtd", "--data-root", root / "data", "--out-dir", tmp_path / "o", "--report-to", "wandb", *TINY], env, root)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert "--report-to wandb needs the wandb package" in err and "pip install wandb" in err
    assert not (tmp_path / "o").exists()


def test_report_to_wandb_is_offline_unless_configured(world, tmp_path, monkeypatch):
    root, env = world
    calls = []
    class Run:
        id = "run1"
        def log(self, vals, step): calls.append(("log", step, dict(vals)))
        def finish(self): calls.append(("finish",))
    fake = types.ModuleType("wandb"); fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for k in ("WANDB_MODE", "WANDB_API_KEY"): monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                          # no ~/.netrc: W&B is not configured
    monkeypatch.setenv("LATTECLIP_CACHE", env["LATTECLIP_CACHE"])
    from latteclip_nb.experiment import main
    main(["--dataset", "dtd", "--data-root", str(root / "data"), "--method", "flyp_pl", "--max-steps", "2",
          "--out-dir", str(tmp_path / "o"), "--report-to", "wandb", *TINY])
    init = [c for c in calls if c[0] == "init"]
    assert len(init) == 1 and init[0][1]["mode"] == "offline" and init[0][1]["dir"] == str(tmp_path / "o")
    logged = {k for c in calls if c[0] == "log" for k in c[2]}
    assert {"train/loss", "train/lr", "train/agreement", "epoch/loss", "eval/top1"} <= logged and calls[-1] == ("finish",)

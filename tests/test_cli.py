"""The four commands as a user types them: the "Your own domain, end to end" page (nbs/own_domain.md) against a live `transformers serve`,
one spelling and one meaning per flag, and one line (no traceback) for every mistake, damaged file and Ctrl-C."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from helpers import CLASSES, write_images as _images
BIN = Path(sys.executable).parent

TINY_CLIP = ["--clip-model", "latte-tiny", "--pretrained", "none"]


def _cmd(name, args, env, cwd, timeout=600):
    return subprocess.run([str(BIN / name), *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _last(r) -> str:
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def _one_line_failure(r, *words):
    err = _last(r)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all(w in err for w in words), err
    return err


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """A user's domain: /birds/unlabeled, classes.txt, /birds/test (labeled), and a private cache."""
    root = tmp_path_factory.mktemp("user")
    _images(root / "birds" / "unlabeled", 9)
    _images(root / "birds" / "test", 6, seed=1, labeled=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    env = {**os.environ, "LATTECLIP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return root, env


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from latteclip_nb.captioners import build_tiny_llava
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="module")
def server(tiny_llava):
    from latteclip_nb.captioners import transformers_server
    with transformers_server(tiny_llava, device="cpu", env={"OMP_NUM_THREADS": "1"}) as url:
        yield url


# ---------------------------------------------------------------- 1. the walkthrough, from the command line

def test_walkthrough_against_transformers_serve(domain, tiny_llava, server):
    root, env = domain
    data = ["--dataset", root / "birds" / "unlabeled", "--classes-file", root / "classes.txt", "--domain", "bird"]
    lmm = ["--captioner", "openai", "--server-url", server, "--captioner-model", tiny_llava, "--bos", "server"]
    store, out = root / "runs" / "birds-captions", root / "runs" / "birds"

    # 1. size the job: no model, no weights; an upper bound until c_zs is cached
    r = _cmd("latteclip-caption", [*data, *TINY_CLIP, "--dry-run"], env, root)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    assert plan["exact"] is False and plan["images"] == 9 and plan["groups"] == 9 and plan["calls"] == 18
    assert plan["dataset"] == "birds-unlabeled" and "at most 18 LMM calls" in r.stderr
    assert not (root / "cache" / "pseudo_labels").exists()                       # nothing was computed

    # vLLM's default (ask for <s>) is refused by transformers serve: the line names the flag that fixes it
    r = _cmd("latteclip-caption", [*data, *TINY_CLIP, *lmm[:-2], "--captions-dir", root / "refused", "--device", "cpu"], env, root)
    _one_line_failure(r, "--bos server")

    # 2. caption with the served LMM
    r = _cmd("latteclip-caption", [*data, *TINY_CLIP, *lmm, "--captions-dir", store, "--device", "cpu", "--batch-size", 4], env, root)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["images"] == 9 and summary["model"].endswith(":served:anyres:server-bos")
    lines = sum(len(f.read_text().splitlines()) for f in store.glob("*.jsonl"))

    # the dry run is now exact (c_zs is cached), and says so
    r = _cmd("latteclip-caption", [*data, *TINY_CLIP, "--dry-run"], env, root)
    exact = json.loads(r.stdout.strip().splitlines()[-1])
    assert exact["exact"] is True and exact["calls"] == summary["images"] + summary["groups"]
    assert f"this run needs {exact['calls']} LMM calls:" in r.stderr and "an upper bound" not in r.stderr

    # 3. train with the same flags: the store is read, not one new LMM call
    r = _cmd("latteclip-train", [*data, *lmm, *TINY_CLIP, "--test-root", root / "birds" / "test", "--captions-dir", store,
                                 "--out-dir", out, "--max-steps", 2, "--batch-size", 4, "--num-workers", 0, "--device", "cpu"], env, root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum(len(f.read_text().splitlines()) for f in store.glob("*.jsonl")) == lines
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "birds-unlabeled" and m["captioner"] == summary["model"] and m["n_test"] == 6 and 0 <= m["top1"] <= 100
    clf = out / "train" / "classifier"

    # 4. predict and 5. evaluate: results.json in percent, as metrics.json
    r = _cmd("latteclip-predict", [clf, root / "birds" / "unlabeled", "--out", root / "preds.csv", "--num-workers", 0, "--quiet"], env, root)
    assert r.returncode == 0 and len((root / "preds.csv").read_text().splitlines()) == 10, r.stderr[-3000:]
    r = _cmd("latteclip-eval", [clf, "--test-root", root / "birds" / "test", "--out", root / "eval", "--num-workers", 0], env, root)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((root / "eval" / "results.json").read_text())
    assert abs(res["top1"] - m["top1"]) < 1e-9 and f"top-1 {m['top1']:.2f}%" in r.stdout

    # the exported folder is a CLIP model for every command: local-dir: needs no --pretrained
    r = _cmd("latteclip-train", [*data, "--method", "zeroshot", "--clip-model", f"local-dir:{clf}", "--test-root", root / "birds" / "test",
                                 "--out-dir", root / "runs" / "zs-local", "--num-workers", 0, "--device", "cpu"], env, root)
    assert r.returncode == 0 and "ignor" not in r.stderr.lower(), r.stderr[-3000:]        # no warning that a tag was ignored
    r = _cmd("latteclip-train", [*data, "--clip-model", f"local-dir:{clf}", "--pretrained", "laion2b_s34b_b79k",
                                 "--out-dir", root / "runs" / "bad"], env, root)
    _one_line_failure(r, "drop --pretrained laion2b_s34b_b79k")


def test_old_spellings_work_with_a_note(domain):
    root, env = domain
    r = _cmd("latteclip-train", ["--dataset", "shapes", "--model", "latte-tiny", "--print-config"], env, root)
    assert r.returncode == 0 and json.loads(r.stdout)["train"]["model_name"] == "latte-tiny", r.stderr[-2000:]
    assert "--model is deprecated" in r.stderr and "use --clip-model" in r.stderr
    r = _cmd("latteclip-caption", ["--folder", root / "birds" / "unlabeled", "--classes", root / "classes.txt", "--root", root,
                                   "--backend", "tiny", "--model", "x", *TINY_CLIP, "--dry-run"], env, root)
    assert r.returncode == 0, r.stderr[-2000:]
    for old, new in (("--classes", "--classes-file"), ("--root", "--data-root"), ("--backend", "--captioner"), ("--model", "--captioner-model")):
        assert f"{old} is deprecated and will be removed; use {new}" in r.stderr


def test_every_command_takes_the_shipped_models(domain, tmp_path, monkeypatch):
    """latte-shapes (and the shapes world's default CLIP) in latteclip-caption, as in latteclip-train; nothing is downloaded."""
    root, env = domain
    r = _cmd("latteclip-caption", ["--dataset", root / "birds" / "unlabeled", "--classes-file", root / "classes.txt",
                                   "--clip-model", "latte-shapes", "--captioner", "tiny", "--dry-run"], env, root)
    assert r.returncode == 0, r.stderr[-2000:]
    from latteclip_nb import data, shapes
    from latteclip_nb.captions import _clip_choice, caption_parser, main
    assert _clip_choice(data.get_spec("shapes"), caption_parser().parse_args(["shapes"])) == (shapes.SHAPES_MODEL, str(shapes.SHAPES_CHECKPOINT))
    name = "shapes-cli-models-test"
    shapes.register_shapes(name, shapes.World(seed=1, n_train=12, n_test=3))
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert main(list(map(str, [name, "--data-root", tmp_path / "data", "--captioner", "simulated", "--clip-model", "latte-shapes",
                                   "--device", "cpu", "--captions-dir", tmp_path / "store"]))) == 0
    finally: data.DATASETS.pop(name, None); getattr(data, "_LOADERS", {}).pop(name, None)


def test_default_names_differ_and_name_sets_one(domain, tmp_path):
    root, env = domain
    for d in ("a", "b"): _images(tmp_path / d / "unlabeled", 3, seed=ord(d))
    def dataset(*extra):
        r = _cmd("latteclip-caption", [*extra, "--classes-file", root / "classes.txt", *TINY_CLIP, "--dry-run"], env, tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])["dataset"]
    assert dataset("--dataset", tmp_path / "a" / "unlabeled") == "a-unlabeled" != dataset("--dataset", tmp_path / "b" / "unlabeled")
    assert dataset("--dataset", tmp_path / "a" / "unlabeled", "--name", "birds") == "birds"
    r = _cmd("latteclip-train", ["--dataset", tmp_path / "a" / "unlabeled", "--classes-file", root / "classes.txt", "--name", "birds",
                                 "--print-config"], env, tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["dataset"] == "birds", r.stderr[-2000:]


def test_train_without_test_root_and_a_refused_command_leaves_nothing_in_the_way(domain, tmp_path):
    root, env = domain
    data = ["--dataset", root / "birds" / "unlabeled", "--classes-file", root / "classes.txt", "--domain", "bird", *TINY_CLIP,
            "--num-workers", 0, "--batch-size", 4, "--max-steps", 1, "--device", "cpu", "--out-dir", tmp_path / "out"]
    r = _cmd("latteclip-train", [*data, "--captioner", "openai", "--server-url", "http://127.0.0.1:9/v1"], env, tmp_path)
    _one_line_failure(r, "127.0.0.1:9")                                     # refused: the server is down
    r = _cmd("latteclip-train", [*data, "--method", "flyp_pl"], env, tmp_path)   # the corrected command runs
    assert r.returncode == 0, r.stderr[-3000:]
    assert "without evaluation" in r.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["top1"] is None and m["n_test"] == 0 and (tmp_path / "out" / "train" / "classifier" / "classifier.json").exists()


# ---------------------------------------------------------------- 2. every failure is one line

def test_caption_shards_and_counts_are_checked(domain):
    root, env = domain
    data = ["--dataset", root / "birds" / "unlabeled", "--classes-file", root / "classes.txt", *TINY_CLIP, "--dry-run"]
    _one_line_failure(_cmd("latteclip-caption", [*data, "--num-shards", 0], env, root), "--num-shards 0")
    _one_line_failure(_cmd("latteclip-caption", [*data, "--shard", 3, "--num-shards", 2], env, root), "--shard 3", "0..1")
    _one_line_failure(_cmd("latteclip-caption", [*data, "--batch-size", 0], env, root), "--batch-size 0")


def test_corrupt_checkpoint_on_resume_is_one_line(domain, tmp_path):
    root, env = domain
    from dataclasses import asdict
    from latteclip_nb.experiment import ExperimentConfig, config_parser
    args = ["--dataset", root / "birds" / "unlabeled", "--classes-file", root / "classes.txt", "--method", "flyp_pl", *TINY_CLIP,
            "--num-workers", 0, "--batch-size", 4, "--max-steps", 1, "--device", "cpu", "--out-dir", tmp_path / "out"]
    cfg = vars(config_parser().parse_args(list(map(str, args)))); [cfg.pop(k) for k in ("overwrite", "print_config", "report")]
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "config.json").write_text(json.dumps(asdict(ExperimentConfig(**cfg))))
    (tmp_path / "out" / "train" / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    err = _one_line_failure(_cmd("latteclip-train", args, env, tmp_path), "checkpoint.pt", "--no-resume", "--overwrite")
    assert "weights_only" not in err


def test_predict_and_eval_device_and_damaged_files(domain, tmp_path):
    root, env = domain
    clf = root / "runs" / "birds" / "train" / "classifier"
    if not clf.exists(): pytest.skip("needs the walkthrough's classifier")
    img = next((root / "birds" / "unlabeled").glob("*.png"))
    if not torch.cuda.is_available():
        _one_line_failure(_cmd("latteclip-predict", [clf, img, "--device", "cuda", "--out", tmp_path / "p.csv"], env, tmp_path), "cuda", "--device cpu")
        _one_line_failure(_cmd("latteclip-eval", [clf, "--test-root", root / "birds" / "test", "--device", "cuda", "--out", tmp_path / "e"],
                               env, tmp_path), "cuda", "--device cpu")
    for name in ("classifier.safetensors", "open_clip_model.safetensors"):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(clf, bad)
        (bad / name).write_bytes((bad / name).read_bytes()[:100])
        _one_line_failure(_cmd("latteclip-predict", [bad, img, "--out", tmp_path / "p.csv"], env, tmp_path), name, "damaged")
        _one_line_failure(_cmd("latteclip-eval", [bad, "--test-root", root / "birds" / "test", "--out", tmp_path / "e"], env, tmp_path),
                          name, "damaged")


def _wait(cond, proc, timeout=300):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None: raise AssertionError(f"exited early: {proc.communicate()[1][-3000:]}")
        if time.monotonic() - t0 > timeout: proc.kill(); raise AssertionError("timed out")
        time.sleep(0.2)


def _ctrl_c_reaches_it():
    "The child's SIGINT as in a terminal: a shell starts background jobs with SIGINT ignored, and the child inherits that."
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(proc, timeout=120) -> str:
    "Send Ctrl-C to `proc`; its stderr once it exits (killed, with its stderr's tail in the failure, when it does not)."
    proc.send_signal(signal.SIGINT)
    try: return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.kill(); err = proc.communicate()[1]
        raise AssertionError(f"still running {timeout} s after Ctrl-C; its stderr ends:\n{err[-3000:]}") from None


def test_ctrl_c_during_captioning_is_one_line(domain, tiny_llava, tmp_path):
    root, env = domain
    store, many = tmp_path / "store", tmp_path / "many"
    _images(many, 60)   # about 120 LMM calls: far more than are done before the first batch is in the store, on a loaded machine too
    args = ["--dataset", many, "--classes-file", root / "classes.txt", *TINY_CLIP, "--captioner", "tiny",
            "--captioner-model", tiny_llava, "--device", "cpu", "--batch-size", 1, "--workers", 1, "--captions-dir", store]
    proc = subprocess.Popen([str(BIN / "latteclip-caption"), *map(str, args)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_reaches_it)
    _wait(lambda: any(f.stat().st_size for f in store.glob("*.jsonl")), proc)
    err = _interrupt(proc)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"latteclip-caption: interrupted: every finished batch of captions is kept in {store}; "
                                            "rerun the same command to continue from there")


def test_ctrl_c_during_training_is_one_line(domain, tmp_path):
    root, env = domain
    out = tmp_path / "out"
    args = ["--dataset", root / "birds" / "unlabeled", "--classes-file", root / "classes.txt", "--method", "flyp_pl", *TINY_CLIP,
            "--num-workers", 0, "--batch-size", 2, "--epochs", 10000, "--ckpt-every", 1, "--device", "cpu", "--out-dir", out]
    proc = subprocess.Popen([str(BIN / "latteclip-train"), *map(str, args)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_reaches_it)
    _wait(lambda: (out / "train" / "checkpoint.pt").exists(), proc)
    err = _interrupt(proc)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    last = last[last.find("latteclip-train: "):]      # after the progress bar's unfinished line
    assert last.startswith("latteclip-train: interrupted:") and str(out / "train" / "checkpoint.pt") in last and "rerun" in last


def test_full_disk_names_the_folders(domain, tmp_path, monkeypatch):
    """A library's own write (a figure) hits a full disk and says only [Errno 28]: the line names where the run writes."""
    import errno
    import matplotlib.figure
    from latteclip_nb.experiment import main
    root, env = domain
    monkeypatch.setenv("LATTECLIP_CACHE", env["LATTECLIP_CACHE"])
    def full(*a, **k): raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(SystemExit) as e:
        main(list(map(str, ["--dataset", root / "birds" / "unlabeled", "--classes-file", root / "classes.txt", "--method", "zeroshot",
                            "--test-root", root / "birds" / "test", *TINY_CLIP, "--num-workers", 0, "--device", "cpu",
                            "--out-dir", tmp_path / "out"])))
    msg = str(e.value.code)
    assert msg.startswith("latteclip-train: error:") and str(tmp_path / "out") in msg and "free some space" in msg

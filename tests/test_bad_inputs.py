"""Bad inputs, round three (issue 35): every case as a user types it, with the exit code and a fragment of the one line.

Most cases fail before any model is loaded and run in-process (`main(argv)` of each command, the environment set by
monkeypatch); the few that need a classifier share one run of a single training step on a tiny folder."""
import errno, json, os, shutil, socket, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CLASSES, write_images as _images
BIN = Path(sys.executable).parent
NB = Path(__file__).resolve().parents[1] / "nbs" / "90_experiment.ipynb"

TINY = ["--clip-model", "latte-tiny", "--pretrained", "none", "--device", "cpu", "--num-workers", "0"]


def _grey(folder: Path):
    """The same grey ramp as an 8-bit PNG, a 16-bit PNG and a float TIFF, and a float TIFF with no 8-bit reading."""
    ramp = np.linspace(0, 1, 36 * 40).reshape(36, 40)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).save(folder / "grey8.png")
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(folder / "grey16.png")
    Image.fromarray(ramp.astype(np.float32)).save(folder / "greyf.tif")
    Image.fromarray((ramp * 1000).astype(np.float32)).save(folder / "hdr.tif")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's folder: birds/unlabeled (with grey high-bit-depth images), birds/test, classes files, damaged weights."""
    root = tmp_path_factory.mktemp("bad")
    _images(root / "birds" / "unlabeled", 9); _grey(root / "birds" / "unlabeled")
    _images(root / "birds" / "test", 6, seed=1, labeled=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "bom.txt").write_bytes(("\ufeff" + "\n".join(CLASSES) + "\n").encode())   # Notepad's "UTF-8 with BOM"
    (root / "junk.txt").write_text("not weights")
    (root / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "junk.bin").write_bytes(np.random.default_rng(1).bytes(300))
    (root / "a-file").write_text("x")
    return root


@pytest.fixture
def env(user, monkeypatch, tmp_path):
    """Each case in its own cache, in the user's folder, with no torchrun variables."""
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"): monkeypatch.delenv(v, raising=False)
    monkeypatch.chdir(user)
    torch.set_num_threads(1)
    return user


def _main(cmd):
    from latteclip_nb import captions, experiment, predict, report
    return {"latteclip-train": experiment.main, "latteclip-caption": captions.main, "latteclip-predict": predict.predict_main,
            "latteclip-eval": predict.eval_main, "latteclip-report": report.main}[cmd]


def run(cmd, args, capsys, caplog=None) -> tuple:
    """(exit code, stderr, stdout) of `cmd args` run in this process, as its console script would exit (with the log in stderr)."""
    capsys.readouterr()
    if caplog is not None: caplog.clear()
    try: rc = _main(cmd)([str(a) for a in args]) or 0
    except SystemExit as e: rc = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
    got = capsys.readouterr()
    return rc, (caplog.text if caplog is not None else "") + got.err, got.out


def _last(err: str) -> str:
    lines = err.strip().splitlines()
    return lines[-1] if lines else ""


def _free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


FOLDER = ["--dataset", "birds/unlabeled", "--classes-file", "classes.txt"]

# (case, command, arguments, environment, exit code, fragments of the one line)
CASES = [
    # silent faults
    ("test-root is the training folder", "latteclip-train", [*FOLDER, "--test-root", "birds/unlabeled", *TINY, "--out-dir", "o"], {}, 1,
     ["--test-root birds/unlabeled is the training folder birds/unlabeled", "scored on"]),
    ("test-root holds the training folder", "latteclip-train", [*FOLDER, "--test-root", "birds", *TINY, "--out-dir", "o"], {}, 1,
     ["--test-root birds holds the training folder"]),
    ("caption: test-root is the folder", "latteclip-caption", [*FOLDER, "--test-root", "birds/unlabeled", *TINY[:4], "--dry-run"], {}, 2,
     ["--test-root birds/unlabeled is the training folder"]),
    # tracebacks
    ("pretrained: a text file", "latteclip-train", [*FOLDER, *TINY[:2], "--pretrained", "junk.txt", "--device", "cpu", "--out-dir", "o"], {}, 1,
     ["--pretrained junk.txt is not an OpenCLIP checkpoint of latte-tiny", "--pretrained none"]),
    ("pretrained: random .safetensors", "latteclip-train", [*FOLDER, *TINY[:2], "--pretrained", "junk.safetensors", "--device", "cpu", "--out-dir", "o"], {}, 1,
     ["--pretrained junk.safetensors is not an OpenCLIP checkpoint"]),
    ("pretrained: random .bin", "latteclip-train", [*FOLDER, *TINY[:2], "--pretrained", "junk.bin", "--device", "cpu", "--out-dir", "o"], {}, 1,
     ["--pretrained junk.bin is not an OpenCLIP checkpoint"]),
    ("predict --out under a file", "latteclip-predict", ["CLF", "birds/unlabeled", "--out", "a-file/p.csv"], {}, 2,
     ["--out", "a-file is a file, not a folder"]),
    ("eval --out under a file", "latteclip-eval", ["CLF", "--test-root", "birds/test", "--out", "a-file/ev"], {}, 2,
     ["--out a-file/ev", "is a file, not a folder"]),
    # unclear messages
    ("folder flags on a named dataset", "latteclip-train", ["--dataset", "shapes", "--classes-file", "classes.txt", "--domain", "bird"], {}, 1,
     ["--classes-file classes.txt and --domain bird describe a custom folder", "--dataset shapes is a named dataset"]),
    ("caption: folder flags on a named dataset", "latteclip-caption", ["shapes", "--test-root", "birds/test", "--dry-run"], {}, 2,
     ["--test-root birds/test describe a custom folder"]),
    ("a CLIP model as the tiny describer", "latteclip-caption", [*FOLDER, *TINY[:4], "--device", "cpu", "--captioner", "tiny", "--model", "latte-shapes",
     "--captions-dir", "store"], {}, 2, ["--captioner-model latte-shapes is a CLIP model", "--clip-model"]),
    ("the old spelling --model for the describer", "latteclip-caption", ["shapes", "--model", "latte-shapes", "--captioner", "tiny"], {}, 2,
     ["--captioner-model latte-shapes is a CLIP model"]),
    ("a missing tiny describer folder", "latteclip-caption", [*FOLDER, *TINY[:4], "--device", "cpu", "--captioner", "tiny", "--captioner-model", "nope",
     "--captions-dir", "store"], {}, 2, ["--captioner-model nope: no such folder"]),
    ("LATTECLIP_CACHE is a file (train)", "latteclip-train", [*FOLDER, *TINY, "--out-dir", "o"], {"LATTECLIP_CACHE": "a-file/cache"}, 1,
     ["LATTECLIP_CACHE=a-file/cache", "is a file, not a folder"]),
    ("LATTECLIP_CACHE is a file (caption)", "latteclip-caption", [*FOLDER, *TINY[:4], "--dry-run"], {"LATTECLIP_CACHE": "a-file"}, 2,
     ["LATTECLIP_CACHE=a-file"]),
    ("WORLD_SIZE=abc", "latteclip-train", [*FOLDER, *TINY, "--out-dir", "o"], {"WORLD_SIZE": "abc"}, 1,
     ["WORLD_SIZE='abc' is not a whole number", "torchrun"]),
    ("RANK=2 WORLD_SIZE=2", "latteclip-train", [*FOLDER, *TINY, "--out-dir", "o"], {"RANK": "2", "WORLD_SIZE": "2"}, 1,
     ["RANK=2 is not in 0..1 (WORLD_SIZE=2)"]),
    ("WORLD_SIZE without the address", "latteclip-train", [*FOLDER, *TINY, "--out-dir", "o"], {"RANK": "0", "WORLD_SIZE": "2"}, 1,
     ["MASTER_ADDR and MASTER_PORT"]),
    ("rank 1 and no rank 0", "latteclip-train", [*FOLDER, *TINY, "--out-dir", "o"],
     {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "PORT", "LATTECLIP_DIST_TIMEOUT": "2"}, 1,
     ["rank 1 of 2", "did not form within 2 s", "LATTECLIP_DIST_TIMEOUT"]),
    ("rank 0 and a missing peer", "latteclip-train", [*FOLDER, *TINY, "--out-dir", "o"],
     {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "PORT", "LATTECLIP_DIST_TIMEOUT": "2"}, 1,
     ["rank 0 of 2", "did not form within 2 s"]),
    ("--mixer released on a split smaller than a batch", "latteclip-train", [*FOLDER, *TINY, "--use-image", "false", "--use-group", "false",
     "--mixer", "released", "--batch-size", "64", "--max-steps", "1", "--out-dir", "o"], {}, 1,
     ["--mixer released needs full batches", "only 13 images", "--mixer eq1"]),
    ("--captions-dir is a file (train)", "latteclip-train", [*FOLDER, *TINY, "--captions-dir", "a-file", "--out-dir", "o"], {}, 1,
     ["--captions-dir a-file is a file"]),
    ("--captions-dir is a file (caption)", "latteclip-caption", [*FOLDER, *TINY[:4], "--captions-dir", "a-file", "--dry-run"], {}, 2,
     ["--captions-dir a-file is a file"]),
    ("--class-names on a folder", "latteclip-train", [*FOLDER, "--class-names", "circle=ring", *TINY, "--out-dir", "o"], {}, 1,
     ["--class-names", "describe the shapes world", "--dataset birds/unlabeled"]),
    ("shapes weights into latte-tiny", "latteclip-train", ["--dataset", "shapes", "--clip-model", "latte-tiny", "--out-dir", "o"], {}, 1,
     ["--clip-model latte-tiny on the shapes world needs its own weights", "--pretrained none", "--clip-model latte-shapes"]),
    ("flags as typed: server url", "latteclip-train", [*FOLDER, *TINY, "--captioner", "openai", "--out-dir", "o"], {}, 1,
     ["--captioner openai needs --server-url"]),
    ("flags as typed: no class names", "latteclip-train", ["--dataset", "birds/unlabeled", *TINY, "--out-dir", "o"], {}, 1,
     ["--classes-file", "--test-root"]),
    ("a mistyped folder lists shapes", "latteclip-train", ["--dataset", "birds/unlabelled"], {}, 1,
     ["no such folder", "caltech101, shapes"]),
    ("flags as typed: split file", "latteclip-train", ["--dataset", "dtd", "--data-root", "dtd-root", *TINY, "--out-dir", "o"], {}, 1,
     ["split_zhou_DescribableTextures.json", "--split-file <path>"]),
]
if not torch.cuda.is_available():
    CASES.append(("flags as typed: device", "latteclip-train", [*FOLDER, *TINY[:4], "--device", "cuda", "--out-dir", "o"], {}, 1,
                  ["--device cuda but no CUDA GPU", "use --device cpu"]))


@pytest.fixture(scope="module")
def trained(user, tmp_path_factory):
    """One training step on birds/unlabeled with the BOM classes file and a test folder; (out dir, its stderr)."""
    out = user / "run"
    env = {**os.environ, "LATTECLIP_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(BIN / "latteclip-train"), "--dataset", "birds/unlabeled", "--classes-file", "bom.txt", "--test-root", "birds/test",
                        "--method", "flyp_pl", *TINY, "--max-steps", "1", "--batch-size", "4", "--out-dir", str(out)],
                       cwd=user, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


@pytest.mark.parametrize("case, cmd, args, extra, code, words", CASES, ids=[c[0] for c in CASES])
def test_one_line(env, capsys, monkeypatch, request, case, cmd, args, extra, code, words):
    if "CLF" in args: args = [str(request.getfixturevalue("trained")[0] / "train" / "classifier") if a == "CLF" else a for a in args]
    port = str(_free_port())
    for k, v in extra.items(): monkeypatch.setenv(k, port if v == "PORT" else v)
    (env / "dtd-root" / "dtd" / "images").mkdir(parents=True, exist_ok=True)   # a named dataset's images, without its split file
    rc, err, _ = run(cmd, args, capsys)
    line = _last(err)
    assert rc == code and "Traceback" not in err, err[-3000:]
    assert all(w in line for w in words), line
    assert not any(f"{f}=" in line for f in ("classes_file", "test_root", "server_url", "base_url", "captioner_model", "split_file")), line


# ---------------------------------------------------------------- the silent faults, by their results

def test_train_reads_a_bom_and_high_bit_depth_images(trained):
    out, err = trained
    m = json.loads((out / "metrics.json").read_text())
    assert m["classnames"] == CLASSES and m["n_train"] == 13                        # not '\ufeffred'
    assert json.loads((out / "train" / "classifier" / "classifier.json").read_text())["classnames"] == CLASSES
    skipped = [l for l in err.splitlines() if "skipping unreadable image" in l]
    assert skipped and all("hdr.tif" in l and "not [0, 1]" in l for l in skipped), skipped   # grey16.png, greyf.tif: read


def test_predict_and_eval_scale_high_bit_depth_images(trained, env, capsys, tmp_path):
    clf = trained[0] / "train" / "classifier"
    grey = env / "birds" / "unlabeled"
    rc, err, _ = run("latteclip-predict", [clf, *(grey / f for f in ("grey8.png", "grey16.png", "greyf.tif", "hdr.tif")),
                                        "--out", tmp_path / "p.jsonl", "--jsonl", "--quiet"], capsys)
    assert rc == 0, err
    rows = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"] and "not [0, 1]" in rows[3]["reason"]
    for r in rows[1:3]:   # the 16-bit and the float image: the 8-bit one's classes and scores (up to rounding), not white or black
        assert [c for c, _ in r["top"]] == [c for c, _ in rows[0]["top"]], (r, rows[0])
        assert max(abs(s - s0) for (_, s), (_, s0) in zip(r["top"], rows[0]["top"])) < 2e-3, (r, rows[0])
    for bits in ("8", "16"):   # a labeled folder of 16-bit images scores as its 8-bit copy
        lab = tmp_path / f"lab{bits}"
        for i, c in enumerate(CLASSES):
            ramp = np.linspace(0, 1, 36 * 40).reshape(36, 40) * (i + 1) / 3
            (lab / c).mkdir(parents=True)
            arr = np.rint(ramp * 255).astype(np.uint8) if bits == "8" else (ramp * 65535).astype(np.uint16)
            Image.fromarray(arr).save(lab / c / "x.png")
        assert run("latteclip-eval", [clf, "--test-root", lab, "--out", tmp_path / f"ev{bits}", "--num-workers", "0"], capsys)[0] == 0
    r8, r16 = (json.loads((tmp_path / f"ev{b}" / "results.json").read_text()) for b in ("8", "16"))
    assert r16["unreadable"] == 0 and [p["prediction"] for p in r16["predictions"]] == [p["prediction"] for p in r8["predictions"]]


def test_caption_store_refuses_another_num_shards(env, capsys, tmp_path, monkeypatch):
    """Two caption processes on one store with --num-shards 2 and 3: the second is refused while the store is unfinished."""
    from latteclip_nb import data, shapes
    name = "shapes-bad-inputs"
    shapes.register_shapes(name, shapes.World(seed=3, n_train=12, n_test=3))
    args = [name, "--data-root", tmp_path / "data", "--captioner", "simulated", "--device", "cpu", "--captions-dir", tmp_path / "store"]
    try:
        rc, err, _ = run("latteclip-caption", [*args, "--shard", "0", "--num-shards", "2"], capsys)
        assert rc == 0, err
        lines = sum(len(f.read_text().splitlines()) for f in (tmp_path / "store").glob("*.jsonl"))
        rc, err, _ = run("latteclip-caption", [*args, "--shard", "1", "--num-shards", "3"], capsys)
        assert rc == 2 and "--num-shards 2" in _last(err) and "--num-shards 3" in _last(err) and "still missing" in _last(err), err
        assert sum(len(f.read_text().splitlines()) for f in (tmp_path / "store").glob("*.jsonl")) == lines   # not one more LMM call
        rc, err, out = run("latteclip-caption", [*args, "--shard", "1", "--num-shards", "2"], capsys)   # the same sharding completes it
        assert rc == 0 and json.loads(out.strip().splitlines()[-1])["complete"] is True, err
        rc, err, _ = run("latteclip-caption", [*args, "--num-shards", "3"], capsys)                   # complete: any count reads it
        assert rc == 0, err
    finally: data.DATASETS.pop(name, None); data._LOADERS.pop(name, None)


# ---------------------------------------------------------------- tracebacks that need a run, a full disk or papermill

def test_train_on_a_torn_local_dir_model(trained, env, capsys, tmp_path):
    bad = tmp_path / "clf"
    shutil.copytree(trained[0] / "train" / "classifier", bad)
    f = bad / "open_clip_model.safetensors"; f.write_bytes(f.read_bytes()[:200])
    rc, err, _ = run("latteclip-train", [*FOLDER, "--method", "zeroshot", "--test-root", "birds/test", "--clip-model", f"local-dir:{bad}",
                                      "--device", "cpu", "--num-workers", "0", "--out-dir", tmp_path / "o"], capsys)
    assert rc == 1 and "Traceback" not in err and "open_clip_model.safetensors is damaged" in _last(err), err[-2000:]


def test_predict_and_eval_on_a_full_disk(trained, env, capsys, tmp_path, monkeypatch):
    import latteclip_nb.core as core, latteclip_nb.predict as predict
    clf = trained[0] / "train" / "classifier"
    def full(*a, **k): raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(core.os, "fsync", full)
        rc, err, _ = run("latteclip-predict", [clf, "birds/unlabeled", "--out", tmp_path / "p.csv", "--quiet", "--num-workers", "0"], capsys)
    assert rc == 2 and "no space left" in _last(err) and "p.csv" in _last(err) and not (tmp_path / "p.csv").exists(), err
    monkeypatch.setattr(predict, "_save_plots", full)
    rc, err, _ = run("latteclip-eval", [clf, "--test-root", "birds/test", "--out", tmp_path / "ev", "--num-workers", "0"], capsys)
    assert rc == 2 and "Traceback" not in err and "free some space" in _last(err) and str(tmp_path / "ev") in _last(err), err


def test_a_full_cache_while_the_tiny_llava_is_built(tmp_path, monkeypatch):
    """safetensors' writer reports a full disk as a RuntimeError that says "os error 28": one OSError line, nothing half-built left."""
    from latteclip_nb import llava
    def full(*a, **k): raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(llava, "_write_tiny_llava", full)
    with pytest.raises(OSError, match="no space left on the device writing .*tiny-llava"): llava.build_tiny_llava(tmp_path / "tiny-llava")
    assert list(tmp_path.iterdir()) == []


def test_caption_store_errors_name_captions_dir():
    from latteclip_nb.caption_store import _store_error
    for code in (errno.ENOSPC, errno.EROFS):
        msg = str(_store_error(Path("/s"), OSError(code, os.strerror(code)), "writing"))
        assert "--captions-dir" in msg and "--out" not in msg


def test_report_on_a_torn_steps_file_and_moved_data(trained, env, capsys, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    steps = run_dir / "train" / "steps.jsonl"
    steps.write_text(steps.read_text() + '{"step": 9, "lo')                           # killed mid-line
    rc, err, _ = run("latteclip-report", [run_dir, "--no-predict"], capsys)
    assert rc == 0 and (run_dir / "report.html").exists(), err
    assert "cut off" in (run_dir / "report.html").read_text()
    shutil.move(env / "birds" / "unlabeled", tmp_path / "moved")
    try: rc, err, _ = run("latteclip-report", [run_dir, "--no-predict"], capsys)
    finally: shutil.move(tmp_path / "moved", env / "birds" / "unlabeled")
    assert rc == 1 and "dataset birds/unlabeled" in _last(err) and "not there any more" in _last(err), err
    assert "give a dataset name" not in _last(err)                                     # not train's advice


def test_symlinked_folder_and_one_folder_name_rule(trained, env, capsys, tmp_path):
    """A symlinked folder of images is followed; train and eval both match Tri-angle-style folder names, and a class with '/'."""
    src = tmp_path / "u"; _images(src, 3, seed=7)
    (tmp_path / "more").mkdir(); _images(tmp_path / "more", 3, seed=8)
    (src / "linked").symlink_to(tmp_path / "more", target_is_directory=True)
    rc, err, out = run("latteclip-caption", ["--dataset", src, "--classes-file", "classes.txt", *TINY[:4], "--dry-run"], capsys)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["images"] == 6, err                 # 3 + the 3 behind the link
    lab = tmp_path / "lab"; _images(lab, 6, seed=9, labeled=True, names=["RE-D", "gre_en", "Blue"])
    (tmp_path / "slash.txt").write_text("re/d\ngreen\nblue\n")
    rc, err, _ = run("latteclip-train", ["--dataset", src, "--classes-file", tmp_path / "slash.txt", "--test-root", lab, "--method", "zeroshot",
                                      *TINY, "--out-dir", tmp_path / "zs"], capsys)
    assert rc == 0, err[-3000:]
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert m["n_train"] == 6 and m["n_test"] == 6 and m["classnames"] == ["re/d", "green", "blue"]
    rc, err, _ = run("latteclip-eval", [trained[0] / "train" / "classifier", "--test-root", lab, "--out", tmp_path / "ev", "--num-workers", "0"], capsys)
    assert rc == 0, err


def test_rank_without_world_size_is_noted(env, capsys, caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    rc, err, _ = run("latteclip-train", [*FOLDER, "--method", "zeroshot", "--test-root", "birds/test", *TINY, "--out-dir", tmp_path / "o"], capsys, caplog)
    assert rc == 0 and "RANK=1 is set but WORLD_SIZE is not: running as one process" in err, err[-2000:]


def test_large_images_name_the_variable_and_print_no_raw_warning(trained, env, capsys, tmp_path, monkeypatch, recwarn):
    from PIL import Image as PILImage
    big = tmp_path / "big.png"; PILImage.new("RGB", (40, 40), (200, 0, 0)).save(big)
    limit = PILImage.MAX_IMAGE_PIXELS
    try:
        monkeypatch.setenv("LATTECLIP_MAX_IMAGE_PIXELS", "1000")     # 1600 pixels: over the limit, under twice it: read, with one log line
        rc, err, _ = run("latteclip-predict", [trained[0] / "train" / "classifier", big, "--out", tmp_path / "a.jsonl", "--jsonl", "--quiet",
                                            "--num-workers", "0"], capsys)
        assert rc == 0 and not [w for w in recwarn if issubclass(w.category, PILImage.DecompressionBombWarning)], err
        monkeypatch.setenv("LATTECLIP_MAX_IMAGE_PIXELS", "100")      # over twice the limit: refused, naming the variable
        rc, err, _ = run("latteclip-predict", [trained[0] / "train" / "classifier", big, "--out", tmp_path / "b.jsonl", "--jsonl", "--quiet",
                                            "--num-workers", "0"], capsys)
        row = json.loads((tmp_path / "b.jsonl").read_text())
        assert rc == 1 and row["status"] == "error" and "LATTECLIP_MAX_IMAGE_PIXELS" in row["reason"] and "DOS attack" not in row["reason"]
    finally: PILImage.MAX_IMAGE_PIXELS = limit


@pytest.mark.parametrize("name", ["clip_model", "model"])
def test_papermill_takes_clip_model_and_the_old_name(tmp_path, name):
    r = subprocess.run([str(BIN / "papermill"), str(NB), str(tmp_path / "out.ipynb"), "-p", name, "nonesuch-clip", "--cwd", str(NB.parent)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "LATTECLIP_CACHE": str(tmp_path / "c")})
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and line.startswith("ValueError: ") and "unknown OpenCLIP model 'nonesuch-clip'" in line, r.stderr[-3000:]
    assert ("parameter model is deprecated" in r.stderr + (tmp_path / "out.ipynb").read_text()) == (name == "model")


def test_a_read_only_cache_or_out_folder(trained, env, capsys, tmp_path, monkeypatch):
    """Read-only folders (tested as root, where chmod does not stop a write): the probe's write is refused."""
    import tempfile
    real = tempfile.mkstemp
    def mkstemp(*a, dir=None, **k):
        if str(dir).startswith(str(tmp_path / "ro")): raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    (tmp_path / "ro").mkdir()
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "ro" / "cache"))
    rc, err, _ = run("latteclip-train", [*FOLDER, *TINY, "--out-dir", tmp_path / "o"], capsys)
    assert rc == 1 and f"LATTECLIP_CACHE={tmp_path / 'ro' / 'cache'} is not writable" in _last(err), err
    rc, err, _ = run("latteclip-caption", [*FOLDER, *TINY[:4], "--dry-run"], capsys)
    assert rc == 2 and "LATTECLIP_CACHE=" in _last(err) and "not writable" in _last(err), err
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    clf = trained[0] / "train" / "classifier"
    rc, err, _ = run("latteclip-predict", [clf, "birds/unlabeled", "--out", tmp_path / "ro" / "p.csv"], capsys)
    assert rc == 2 and "--out" in _last(err) and "is not writable" in _last(err), err
    rc, err, _ = run("latteclip-eval", [clf, "--test-root", "birds/test", "--out", tmp_path / "ro" / "ev"], capsys)
    assert rc == 2 and "--out" in _last(err) and "is not writable" in _last(err), err


def test_the_served_captioners_url_is_named_as_the_flag():
    from latteclip_nb.captions import _as_typed as caption_line
    from latteclip_nb.experiment import _as_typed as train_line
    msg = "no OpenAI-compatible server answers at http://h:9/v1: start one, and pass base_url='http://HOST:8000/v1'."
    assert "--server-url http://HOST:8000/v1" in train_line(msg) and "--server-url http://HOST:8000/v1" in caption_line(msg)

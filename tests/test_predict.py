"""`latteclip-predict`, `latteclip-eval` and the open_clip-only snippet of the walkthrough (nbs/own_domain.md) on a shapes-world
classifier trained a few steps."""
import csv, json, os, re, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

from latteclip_nb.predict import eval_main, predict_main
from latteclip_nb.train import load_classifier

BIN = Path(sys.executable).parent
WALKTHROUGH = Path(__file__).resolve().parents[1] / "nbs" / "own_domain.md"   # "Your own domain, end to end"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small shapes world, LatteCLIP trained 2 steps on it with the shipped tiny CLIP by `run_experiment`."""
    from latteclip_nb import data
    from latteclip_nb.experiment import ExperimentConfig, run_experiment
    from latteclip_nb.shapes import World, register_shapes
    root = tmp_path_factory.mktemp("predict")
    old = os.environ.get("LATTECLIP_CACHE")
    os.environ["LATTECLIP_CACHE"] = str(root / "cache")
    register_shapes("shapes-predict", World(seed=5, n_train=40, n_test=30))
    try:
        cfg = ExperimentConfig(dataset="shapes-predict", data_root=str(root / "data"), method="latteclip", captioner="simulated",
                               max_steps=2, batch_size=20, num_workers=0, out_dir=str(root / "run"),
                               captions_dir=str(root / "captions"))
        m = run_experiment(cfg)
        test = data.splits("shapes-predict", root / "data")["test"]
        yield dict(root=root, metrics=m, clf=Path(m["classifier_path"]), test=test,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        data.DATASETS.pop("shapes-predict", None); data._LOADERS.pop("shapes-predict", None)
        if old is None: os.environ.pop("LATTECLIP_CACHE", None)
        else: os.environ["LATTECLIP_CACHE"] = old


def _cli(name, args, env, cwd):
    return subprocess.run([str(BIN / name), *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_export_is_an_open_clip_folder(run):
    """The export holds open_clip's folder format: local-dir: builds the fine-tuned latte-shapes model (guards the old export without it)."""
    import open_clip
    d = run["clf"]
    assert {"open_clip_config.json", "open_clip_model.safetensors", "classifier.safetensors", "classifier.json"} <= {f.name for f in d.iterdir()}
    cfg = json.loads((d / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["width"] == 96 and cfg["preprocess_cfg"]["size"] == [32, 32]
    model, _, tf = open_clip.create_model_and_transforms(f"local-dir:{d}")
    clf = load_classifier(d)
    ours = clf.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())
    assert clf.classnames == run["test"].classnames


def test_legacy_export_still_loads(run, tmp_path):
    """An export of the older layout (weights in model.safetensors, no open_clip_config.json) loads and predicts the same."""
    old = tmp_path / "old"
    shutil.copytree(run["clf"], old)
    (old / "open_clip_model.safetensors").rename(old / "model.safetensors")
    (old / "open_clip_config.json").unlink()
    paths = run["test"].paths[:8]
    assert torch.equal(load_classifier(old).predict(paths), load_classifier(run["clf"]).predict(paths))


def test_eval_dataset_reproduces_the_experiment(run, tmp_path):
    """latteclip-eval --dataset gives the top-1 and per-class accuracy that run_experiment wrote to metrics.json."""
    m = run["metrics"]
    assert eval_main([run["clf"], "--dataset", "shapes-predict", "--data-root", run["root"] / "data", "--out", tmp_path / "ev",
                      "--num-workers", "0", "--device", "cpu"]) == 0
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert r["n"] == m["n_test"] == 30 and abs(r["top1"] - m["top1"]) < 1e-9      # percent in both files
    assert all(abs(r["per_class"][c] - a) < 1e-9 for c, a in zip(m["classnames"], m["per_class"]) if a is not None)


def test_cli_eval_on_a_folder_with_a_corrupt_image(run, tmp_path):
    """latteclip-eval --test-root: sub-folder names matched ignoring case/punctuation, a corrupt image counted wrong, not fatal."""
    test, m = run["test"], run["metrics"]
    lab = tmp_path / "labeled"
    odd = lambda c: c.upper() if len(c) % 2 else f"{c.capitalize()}_"       # CIRCLE, Square_, ...
    for i, (p, y) in enumerate(zip(test.paths, test.labels)):
        (lab / odd(test.classnames[y])).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, lab / odd(test.classnames[y]) / f"{i:03d}.png")
    (lab / odd(test.classnames[0]) / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r = _cli("latteclip-eval", [run["clf"], "--test-root", lab, "--out", tmp_path / "ev", "--num-workers", "0"], run["env"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["n"] == 31 and res["unreadable"] == 1 and abs(res["top1"] - m["top1"] * 30 / 31) < 1e-9
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 1000 and (tmp_path / "ev" / "per_class.png").exists()
    assert json.loads(r.stdout.strip().splitlines()[-1])["top1"] == res["top1"]
    (lab / "blob").mkdir(); shutil.copy(test.paths[0], lab / "blob")
    r = _cli("latteclip-eval", [run["clf"], "--test-root", lab, "--out", tmp_path / "ev2"], run["env"], tmp_path)
    assert r.returncode != 0 and "['blob']" in r.stderr and "circle" in r.stderr and not (tmp_path / "ev2").exists()


def test_cli_predict_matches_classifier_predict(run, tmp_path):
    """latteclip-predict on a folder (nested, one corrupt image) and path lists: the rows give Classifier.predict's classes."""
    test = run["test"]
    imgs = tmp_path / "imgs"
    (imgs / "a" / "b").mkdir(parents=True)
    files = []
    for i, p in enumerate(test.paths[:12]):
        f = imgs / ("a/b" if i % 3 == 0 else "a" if i % 3 == 1 else "") / f"x{i:02d}.png"
        shutil.copy(p, f); files.append(f)
    (imgs / "a" / "corrupt.png").write_bytes(b"GIF89a nonsense")
    for i, p in enumerate(test.paths[12:16]): shutil.copy(p, tmp_path / f"listed{i}.png")
    (tmp_path / "list.txt").write_text("listed0.png\nlisted1.png\n")
    (tmp_path / "list.csv").write_text("path,note\nlisted2.png,x\nlisted3.png,y\n")
    r = _cli("latteclip-predict", [run["clf"], imgs, "list.txt", "list.csv", "--out", "preds.csv", "--topk", "3",
                                   "--batch-size", "5", "--num-workers", "0"], run["env"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"classified 16 of 17 images .* images/s\); 1 unreadable", r.stderr), r.stderr[-1000:]
    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    bad = [x for x in rows if x["status"] == "error"]
    assert len(rows) == 17 and len(bad) == 1 and bad[0]["path"].endswith("corrupt.png") and bad[0]["reason"]
    ok = [x for x in rows if x["status"] == "ok"]
    clf = load_classifier(run["clf"])
    expected = [clf.classnames[i] for i in clf.predict([x["path"] if os.path.isabs(x["path"]) else tmp_path / x["path"] for x in ok])]
    assert [x["prediction"] for x in ok] == expected
    for x in ok:
        s = [float(x[f"score_{j}"]) for j in (1, 2, 3)]
        assert x["class_1"] == x["prediction"] and float(x["score"]) == s[0] and s[0] >= s[1] >= s[2] and sum(s) <= 1 + 1e-5
    # JSON lines from the same classifier, in-process, give the same rows
    assert predict_main([run["clf"], imgs, tmp_path / "list.txt", tmp_path / "list.csv", "--jsonl", "--out", tmp_path / "p.jsonl",
                         "--topk", "3", "--num-workers", "0", "--quiet"]) == 0
    js = [json.loads(l) for l in open(tmp_path / "p.jsonl")]
    assert [j["prediction"] for j in js] == [x["prediction"] or None for x in rows] and len(js[0]["top"]) == 3


def test_predict_exit_codes(run, tmp_path):
    """Non-zero only for a wrong classifier folder (naming the missing file) or when no image could be read."""
    broken = tmp_path / "clf"
    shutil.copytree(run["clf"], broken)
    (broken / "classifier.safetensors").unlink()
    img = tmp_path / "x.png"; shutil.copy(run["test"].paths[0], img)
    r = _cli("latteclip-predict", [broken, img, "--out", tmp_path / "p.csv"], run["env"], tmp_path)
    assert r.returncode == 2 and "classifier.safetensors" in r.stderr.strip().splitlines()[-1] and not (tmp_path / "p.csv").exists()
    (tmp_path / "bad.jpg").write_bytes(b"no image here")
    assert predict_main([run["clf"], tmp_path / "bad.jpg", tmp_path / "missing.png", "--out", tmp_path / "q.csv", "--quiet"]) == 1
    assert [x["status"] for x in csv.DictReader(open(tmp_path / "q.csv"))] == ["error", "error"]
    assert predict_main([run["clf"], img, "--out", tmp_path / "q.csv", "--quiet"]) == 2           # an existing result is kept
    assert predict_main([run["clf"], img, "--out", tmp_path / "q.csv", "--quiet", "--overwrite"]) == 0


def _readme_snippet() -> str:
    text = WALKTHROUGH.read_text()
    assert text.startswith("# Your own domain, end to end")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = [b for b in blocks if "local-dir:" in b]
    assert len(code) == 1, "the walkthrough (nbs/own_domain.md) must hold one open_clip-only python snippet"
    return code[0]


def test_readme_snippet_uses_open_clip_alone(run, tmp_path):
    """The walkthrough's snippet, run where latteclip_nb is never imported, prints the package's predictions."""
    snippet = _readme_snippet()
    assert len(snippet.strip().splitlines()) <= 8
    m = re.search(r'^folder, image = "([^"]+)", "([^"]+)"$', snippet, flags=re.M)
    assert m, snippet
    paths = run["test"].paths[:4]
    folder = str(run["clf"])
    runs = "".join(f"exec(SNIPPET.replace({m.group(0)!r}, {f'folder, image = {folder!r}, {str(p)!r}'!r}))\n" for p in paths)
    script = f"import sys\nSNIPPET = {snippet!r}\n{runs}print('imported:', 'latteclip_nb' in sys.modules)\n"
    r = subprocess.run([sys.executable, "-c", script], env=run["env"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip().splitlines()
    clf = load_classifier(run["clf"])
    assert out[-1] == "imported: False" and out[:-1] == [clf.classnames[i] for i in clf.predict(paths)]

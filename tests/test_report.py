"""The per-run report page: content on a tiny shapes run, a custom folder without a labeled split, the command line,
and the page as a real browser renders it (headless Chromium)."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import private_cache
from latteclip_nb.experiment import ExperimentConfig, run_experiment
from latteclip_nb.report import load_run, main

MAX_BYTES = 1_000_000   # the page of a 10-class run, 4 images and 2 collages per class, with its figures
HEADINGS = ["Summary", "Accuracy", "Training curves", "Classes"]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A LatteCLIP run of 2 steps on the shapes world, in a private cache; its folder."""
    root = tmp_path_factory.mktemp("report")
    with private_cache(root):
        out = root / "run"
        run_experiment(ExperimentConfig(dataset="shapes", epochs=1, max_steps=2, batch_size=64, groups_per_class=2,
                                        num_workers=0, out_dir=str(out)))
        yield out, root / "cache"


def _sections(page):
    return re.findall(r'<section class="cls" data-cls="(\d+)"><h3>([^<]+)</h3>', page)


def test_report_content(shapes_run, monkeypatch):
    out, cache = shapes_run
    monkeypatch.setenv("LATTECLIP_CACHE", str(cache))
    page = (out / "report.html").read_text()        # written by the run itself
    run = load_run(out)
    counts = torch.bincount(run.c_zs, minlength=10).tolist()
    sections = _sections(page)
    assert [int(c) for c, _ in sections] == sorted(range(10), key=lambda c: (-counts[c], c))   # by size, largest first
    assert [n for _, n in sections] == [run.classnames[int(c)] for c, _ in sections]
    assert page.count('class="thumb"') == sum(min(4, n) for n in counts)
    assert page.count('class="collage"') == 2 * sum(n > 0 for n in counts)
    shown = re.findall(r'<img class="thumb" alt="([^"]+)"', page)
    texts = dict(zip(run.split.ids, run.texts.image))
    assert all(f"&ldquo;{_esc(texts[i])}&rdquo;" in page for i in shown)          # each image beside its own description
    assert all(f"&ldquo;{_esc(t)}&rdquo;" in page for g, t in zip(run.work.groups, run.texts.group) if g.label == int(sections[0][0]))
    assert "LMM calls" in page and "1620 (1600 images, 20 groups)" in page and "simulated-describer" in page
    assert "zero-shot top-1" in page and "no labeled split" not in page and 'alt="confusion matrix"' in page
    assert page.count("fine-tuned:") == len(shown) and "prototype drift" in page and page.count("<svg") >= 2
    assert "<script src" not in page and "http" not in page.split("<body>")[1]          # nothing to fetch
    assert (out / "report.html").stat().st_size < MAX_BYTES
    m = json.loads((out / "metrics.json").read_text())
    assert f"{m['top1']:.2f} %" in page and f"{m['zeroshot_top1']:.2f} %" in page


def _esc(s):
    import html
    return html.escape(s)


def test_cli_main_and_subprocess(shapes_run, monkeypatch, tmp_path, capsys):
    out, cache = shapes_run
    monkeypatch.setenv("LATTECLIP_CACHE", str(cache))
    main([str(out), "--out", str(tmp_path / "small.html"), "--images-per-class", "1", "--groups-per-class", "0", "--no-predict"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "small.html")
    page = (tmp_path / "small.html").read_text()
    assert page.count('class="thumb"') == 10 and 'class="collage"' not in page and "fine-tuned:" not in page
    env = {**os.environ, "LATTECLIP_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    code = "from latteclip_nb.report import main; main()"
    r = subprocess.run([sys.executable, "-c", code, str(out), "--out", str(tmp_path / "p.html")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(tmp_path / "p.html") and _sections((tmp_path / "p.html").read_text())
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and "metrics.json is missing" in err[0] and "Traceback" not in r.stderr


def test_custom_folder_without_labeled_split(tmp_path, monkeypatch):
    """A custom domain with no test folder trains, and its page says there is no labeled split."""
    from latteclip_nb.shapes import SHAPES_CHECKPOINT, TARGET, render_image, sample_scene, save_png
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    folder, names = tmp_path / "mine", ["circle", "square", "star"]
    folder.mkdir()
    for i in range(12):
        sc = sample_scene(np.random.default_rng([7, i]), TARGET, shape=names[i % 3])
        save_png(render_image(sc), folder / f"im{i:02d}.png", sc)
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "run"
    m = run_experiment(ExperimentConfig(dataset=str(folder), classes_file=str(tmp_path / "classes.txt"), domain="shape",
                                        method="flyp_pl", model="latte-shapes", pretrained=str(SHAPES_CHECKPOINT),
                                        epochs=1, batch_size=4, num_workers=0, out_dir=str(out)))
    assert m["top1"] is None and m["zeroshot_top1"] is None and m["n_test"] == 0 and m["history"]
    page = (out / "report.html").read_text()
    assert "There is no labeled split" in page and "zero-shot top-1" not in page and "test accuracy" not in page
    counts = torch.bincount(load_run(out).c_zs, minlength=3).tolist()
    assert len(_sections(page)) == sum(n > 0 for n in counts) and page.count('class="thumb"') == sum(min(4, n) for n in counts)
    assert "captioner</td><td>none" in page and page.count("fine-tuned:") == page.count('class="thumb"')
    with pytest.raises(ValueError, match="test_root"):   # methods that only evaluate still need one
        run_experiment(ExperimentConfig(dataset=str(folder), classes_file=str(tmp_path / "classes.txt"), method="zeroshot",
                                        model="latte-shapes", pretrained=str(SHAPES_CHECKPOINT), num_workers=0,
                                        out_dir=str(tmp_path / "zs")))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_page_renders_in_headless_chromium(shapes_run, tmp_path):
    from PIL import Image
    out, _ = shapes_run
    url = (out / "report.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    r = subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180)
    assert shot.is_file(), r.stderr[-2000:]
    im = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert im.shape == (1600, 1200) and im.std() > 10 and (im < 128).mean() > 0.005   # not blank: text, images, charts
    r = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    dom = r.stdout
    assert re.search(r"<h1>LatteCLIP run report: shapes, latteclip</h1>", dom), dom[:500]
    assert all(f"<h2>{h}</h2>" in dom for h in HEADINGS)
    assert len(re.findall(r'<section class="cls"', dom)) == 10 and 'id="filter"' in dom

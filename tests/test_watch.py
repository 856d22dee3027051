"""Issue 34: a run a researcher can watch, read afterwards and share: evaluation while training, run.log, the hub card,
plain progress, the report's answers, WiSE-FT and image lists, on tiny shapes runs."""
import json, re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import private_cache
from latteclip_nb.experiment import ExperimentConfig, run_experiment

TINY = dict(dataset="shapes", epochs=1, max_steps=4, batch_size=64, groups_per_class=2, num_workers=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with private_cache(tmp_path_factory.mktemp("watch")) as root:
        yield root


@pytest.fixture(scope="module")
def evaluated(cache):
    """A LatteCLIP run of 4 steps evaluated every 2 steps, keeping its last checkpoint; (folder, metrics)."""
    out = cache / "evaluated"
    m = run_experiment(ExperimentConfig(**TINY, eval_every=2, keep_checkpoints=1, out_dir=str(out)))
    return out, m


def test_eval_history_has_one_point_per_evaluation_and_ends_at_the_export(evaluated):
    out, m = evaluated
    ev = m["eval_history"]
    assert [r["step"] for r in ev] == [2, 4]                       # every 2 steps of 4
    assert ev[-1]["top1"] == pytest.approx(m["top1"])              # the last point is the exported (last) model
    assert m["history"][-1]["top1"] == pytest.approx(m["top1"])    # step 4 ends the epoch: its record carries it
    assert [json.loads(l)["step"] for l in (out / "train" / "evals.jsonl").read_text().splitlines()] == [2, 4]
    assert (out / "train" / "checkpoint.pt").is_file() and len(list((out / "train").glob("checkpoint-*.pt"))) == 1
    page = (out / "report.html").read_text()
    chart = re.search(r'<svg[^>]*>(?:(?!</svg>).)*test top-1 \(%\) while training(?:(?!</svg>).)*</svg>', page, re.S)
    assert chart and chart.group(0).count("<circle") >= 2             # the curve is drawn, one mark per evaluation


def test_evaluating_while_training_changes_nothing_trained(evaluated, cache):
    out, m = evaluated
    plain = run_experiment(ExperimentConfig(**TINY, eval_every=0, out_dir=str(cache / "plain")))
    assert "eval_history" not in plain
    assert [r["loss"] for r in plain["history"]] == [r["loss"] for r in m["history"]]
    a, b = (load_file(str(d / "train" / "classifier" / "classifier.safetensors"))["classifier"] for d in (out, cache / "plain"))
    assert torch.equal(a, b) and plain["top1"] == m["top1"]


def test_run_log_holds_the_command_config_progress_and_closing_lines(evaluated):
    out, m = evaluated
    text = (out / "run.log").read_text()
    config = json.loads(re.search(r"^config: (.*)$", text, re.M).group(1))
    assert config["eval_every"] == 2 and config["max_steps"] == 4
    assert "the same run: latteclip-train --dataset shapes" in text and "training config (resolved): " in text
    assert re.search(r"^latteclip epoch 1/1: 4/4 \(100%\) it", text, re.M)             # a plain progress line, not a bar
    assert "\r" not in text and "step 2 (epoch 1): test top-1" in text
    lines = text.rstrip().splitlines()
    assert "report: " in lines[-2] and lines[-1].split(": ", 1)[1].startswith(f"finished latteclip on shapes in ")
    assert f"top-1 {m['top1']:.2f} %" in lines[-1]
    info = [l for l in lines if " INFO " in l]
    assert info and all(" INFO latteclip_nb" in l for l in info)                        # no other library's INFO lines


def test_model_card_round_trips_through_huggingface_hub(evaluated):
    from huggingface_hub import ModelCard
    out, m = evaluated
    card = ModelCard.load(out / "train" / "classifier" / "README.md")
    d = card.data
    assert d.library_name == "open_clip" and d.license and d.base_model is None          # shapes: local starting weights
    assert d.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == round(m["top1"], 2)
    assert d.eval_results[0].metric_type == "accuracy" and d.eval_results[0].dataset_split == "test"
    assert "| training length | 4 optimizer steps of 64 images (0.16 epochs of 25 steps), of a cosine schedule of 4 steps (max_steps 4 compressed it) |" in card.text
    from latteclip_nb.checkpoints import base_model_id, card_data
    assert base_model_id("ViT-B-32", "laion2b_s34b_b79k") == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert card_data(dict(model="ViT-B-32", pretrained="laion2b_s34b_b79k", dataset="food101")).to_dict()["datasets"] == ["ethz/food101"]


def test_export_push_uploads_the_folder_without_network(evaluated, monkeypatch, capsys):
    import huggingface_hub
    from latteclip_nb.checkpoints import export_main
    out, _ = evaluated
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))
    export_main([str(out), "--push", "someone/latte-shapes"])
    assert calls == [("create", "someone/latte-shapes", {"exist_ok": True, "private": False}),
                     ("upload", "someone/latte-shapes", str(out / "train" / "classifier"))]
    assert capsys.readouterr().out.split() == [str(out / "train" / "classifier"), "https://huggingface.co/someone/latte-shapes"]


def test_wise_ft_ends_are_the_starting_and_the_fine_tuned_model(evaluated, cache):
    from latteclip_nb.checkpoints import export_main, load_classifier
    from latteclip_nb.evaluate import evaluate
    from latteclip_nb.experiment import resolve_data
    out, m = evaluated
    zero = run_experiment(ExperimentConfig(**TINY, eval_every=0, wise_alpha=0.0, out_dir=str(cache / "wise0")))
    assert zero["top1"] == pytest.approx(m["zeroshot_top1"]) and zero["finetuned_top1"] == pytest.approx(m["top1"])
    assert zero["classifier_path"].endswith("wise") and zero["config"]["wise_alpha"] == 0
    export_main([str(out), "--wise-alpha", "1", "--out", str(cache / "wise1")])      # the command, at A = 1
    test = resolve_data(ExperimentConfig(**TINY))[1]["test"]
    clf = load_classifier(cache / "wise1", device="cpu")
    assert 100 * evaluate(clf.model, clf.transform, test, clf.weights)["top1"] == pytest.approx(m["top1"])


def test_report_answers_did_it_help(evaluated):
    out, m = evaluated
    page = (out / "report.html").read_text()
    d = m["top1"] - m["zeroshot_top1"]
    assert f'<span class="{"neg" if d < 0 else "pos"} delta">{d:+.2f} points</span>' in page
    table = page.split('id="per-class"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'<tr><td data-v="[^"]*">([^<]+)</td><td data-v="([^"]*)">[^<]*</td><td data-v="([^"]*)">[^<]*</td><td data-v="([^"]*)"', table)
    assert [r[0] for r in rows] == m["classnames"]
    assert [float(r[1]) for r in rows] == pytest.approx(m["zeroshot_per_class"])       # the zero-shot column is metrics.json's
    assert [float(r[2]) for r in rows] == pytest.approx(m["per_class"])
    assert [float(r[3]) for r in rows] == pytest.approx([f - z for f, z in zip(m["per_class"], m["zeroshot_per_class"])])
    assert "learning rate per logged step" in page and ">optimizer step</text>" in page and "rotate(-90)" in page
    assert '<select id="show">' in page and page.count("data-changed=") == page.count('class="thumb"')
    assert re.search(r"prototype drift \(angle between start and end\)</td><td>\d+\.\d\d°", page)
    assert "Prompts sent to the LMM" in page and 'class="prompt"' in page
    # per class, the images training changed come before the unchanged ones
    for sec in re.findall(r'<section class="cls".*?</section>', page, re.S):
        flags = [int(f) for f in re.findall(r'data-changed="(\d)"', sec)]
        assert flags == sorted(flags, reverse=True)


def test_papermill_run_stores_plain_progress_lines_not_widgets(cache, tmp_path):
    import os, subprocess, sys
    nb = Path(__file__).resolve().parents[1] / "nbs" / "90_experiment.ipynb"
    params = dict(epochs=1, max_steps=2, batch_size=64, groups_per_class=2, num_workers=0, out_dir=str(tmp_path / "run"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env.update(OMP_NUM_THREADS="1", LATTECLIP_CACHE=str(cache / "cache"))
    r = subprocess.run([str(Path(sys.executable).parent / "papermill"), str(nb), str(tmp_path / "out.ipynb"), "--cwd", str(nb.parent),
                        *[a for k, v in params.items() for a in ("-p", k, str(v))]], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    stored = json.loads((tmp_path / "out.ipynb").read_text())
    outputs = [o for c in stored["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert "widgets" not in stored["metadata"]
    text = "".join("".join(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")
    assert re.search(r"latteclip epoch 1/1: 2/2 \(100%\) it", text) and "\r" not in text   # how far training got, as a line


def test_csv_image_lists_train_and_evaluate(evaluated, cache, tmp_path):
    from latteclip_nb.experiment import resolve_data
    from latteclip_nb.shapes import SHAPES_CHECKPOINT
    sp = resolve_data(ExperimentConfig(**TINY))[1]
    train, test = sp["train"], sp["test"]
    (tmp_path / "train.csv").write_text("".join(f"{train.root / i}\n" for i in train.ids[:96]))
    (tmp_path / "test.csv").write_text("path,label\n" + "".join(f"{test.root / i},{test.classnames[y]}\n" for i, y in zip(test.ids[:60], test.labels[:60])))
    m = run_experiment(ExperimentConfig(dataset=str(tmp_path / "train.csv"), test_root=str(tmp_path / "test.csv"), method="flyp_pl",
                                        model="latte-shapes", pretrained=str(SHAPES_CHECKPOINT), epochs=1, max_steps=2, batch_size=32,
                                        num_workers=0, out_dir=str(tmp_path / "run")))
    assert m["n_train"] == 96 and m["n_test"] == 60 and m["top1"] is not None and len(m["eval_history"]) == 1
    assert sorted(m["classnames"]) == sorted({test.classnames[y] for y in test.labels[:60]})
    (tmp_path / "bad.csv").write_text(f"{train.root / train.ids[0]}\nnowhere/x.png\n")
    import subprocess, sys
    r = subprocess.run([sys.executable, "-c", "from latteclip_nb.experiment import main; main()", "--dataset", str(tmp_path / "bad.csv"),
                        "--test-root", str(tmp_path / "test.csv"), "--clip-model", "latte-shapes", "--method", "flyp_pl",
                        "--out-dir", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and "line 2: nowhere/x.png does not exist" in err[0], r.stderr[-2000:]


def test_stop_after_stops_inside_the_full_schedule_and_max_steps_says_it_compresses(evaluated, cache):
    from latteclip_nb.experiment import config_parser
    from latteclip_nb.run_config import cosine_lr
    m = run_experiment(ExperimentConfig(**{**TINY, "max_steps": None}, eval_every=0, stop_after=12, out_dir=str(cache / "stopped")))
    tc = m["train_config"]
    assert m["history"][-1]["step"] == 12 and tc["stop_after"] == 12 and tc["max_steps"] is None
    full = 25 * tc["epochs"]                                           # 1600 images / 64: the schedule keeps all 25 steps
    assert m["history"][-1]["lr"] == pytest.approx(tc["lr"] * cosine_lr(12, tc["warmup_steps"], full))   # past the warm-up of 10
    assert m["history"][-1]["lr"] != pytest.approx(tc["lr"] * cosine_lr(12, tc["warmup_steps"], 12))
    helps = {a.dest: a.help for a in config_parser()._actions}
    assert "schedule is compressed" in helps["max_steps"] and "stop" in helps["stop_after"]

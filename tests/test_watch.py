"""Issue 34: a run a researcher can watch, read afterwards and share: evaluation while training, run.log, the hub card,
plain progress, the report's answers, WiSE-FT and image lists, on tiny shapes runs."""
import json, re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latteclip_nb.experiment import ExperimentConfig, run_experiment

TINY = dict(dataset="shapes", epochs=1, max_steps=4, batch_size=64, groups_per_class=2, num_workers=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATTECLIP_CACHE", str(root / "cache"))
        torch.set_num_threads(1)
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

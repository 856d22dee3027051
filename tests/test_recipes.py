"""The two recipes: `--print-config` for every dataset and recipe, and both recipes end to end offline."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

from latteclip_nb.data import make_fake_dataset
from latteclip_nb.experiment import ExperimentConfig, main, run_experiment

# hand-derived from the CoOp train+val sizes, the released scripts' epochs and batch 512:
# dataset: (n_train, reference template, epochs, ceil(n / 512))
DATASETS = {
    "eurosat": (18900, "a photo of a {}.", 15, 37), "sun397": (19850, "a photo of a {}.", 15, 39),
    "food101": (70700, "a photo of a {}, a type of food.", 15, 139), "flowers102": (5726, "a photo of a {}, a type of flower.", 50, 12),
    "dtd": (3948, "{} texture.", 100, 8), "fgvc_aircraft": (6667, "a photo of a {}, a type of aircraft.", 50, 14),
    "oxford_pets": (3680, "a photo of a {}.", 100, 8), "stanford_cars": (8144, "a photo of a {}.", 50, 16),
    "ucf101": (9537, "a photo of a person doing {}", 50, 19), "caltech101": (5777, "a photo of a {}.", 50, 12),
}
# the paper: min{2000 iterations, 50 epochs}
PAPER_TOTAL = {"eurosat": 1850, "sun397": 1950, "food101": 2000, "flowers102": 600, "dtd": 400, "fgvc_aircraft": 700,
               "oxford_pets": 400, "stanford_cars": 800, "ucf101": 950, "caltech101": 600}


@pytest.mark.parametrize("recipe", ["reference", "paper"])
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_print_config(dataset, recipe, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    main(["--dataset", dataset, "--recipe", recipe, "--data-root", str(tmp_path / "nothing-here"), "--print-config"])
    r = json.loads(capsys.readouterr().out)
    n, template, epochs, spe = DATASETS[dataset]
    assert {"recipe", "template", "steps_per_epoch", "total_steps", "n_train", "train"} <= set(r)
    assert (r["recipe"], r["n_train"], r["steps_per_epoch"]) == (recipe, n, spe)
    t = r["train"]
    assert t["batch_size"] == 512 and t["drop_last"] is False and t["alpha"] == 0.99 and t["momentum"] == 0.0
    if recipe == "reference":
        assert (r["template"], t["lr"], t["epochs"], t["max_steps"], r["total_steps"]) == (template, 1e-7, epochs, None, epochs * spe)
    else:
        lr = 1e-6 if dataset in ("food101", "sun397") else 1e-7
        assert (r["template"], t["lr"], t["epochs"], t["max_steps"], r["total_steps"]) == ("a photo of a {}.", lr, 50, 2000, PAPER_TOTAL[dataset])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "nothing-here").exists()   # no data, no weights, no cache


def test_print_config_command_overrides(tmp_path):
    """The installed command: explicit flags override the recipe; nothing is read or written."""
    env = {**os.environ, "LATTECLIP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "latteclip-train"), "--dataset", "sun397", "--recipe", "paper",
                        "--lr", "5e-7", "--max-steps", "100", "--print-config"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert (out["train"]["lr"], out["total_steps"], out["train"]["epochs"], out["template"]) == (5e-7, 100, 50, "a photo of a {}.")
    assert not (tmp_path / "cache").exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def coop(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    make_fake_dataset(root / "data", "dtd", n_train=3, n_val=1, n_test=2)
    return root


@pytest.mark.parametrize("recipe", ["reference", "paper"])
def test_recipes_end_to_end_coop(coop, recipe, monkeypatch):
    monkeypatch.setenv("LATTECLIP_CACHE", str(coop / "cache"))
    cfg = ExperimentConfig(dataset="dtd", data_root=str(coop / "data"), recipe=recipe, model="latte-tiny", pretrained="none",
                           captioner="tiny", max_steps=2, batch_size=4, num_workers=0, out_dir=str(coop / f"run-{recipe}"))
    m = run_experiment(cfg)
    template = "{} texture." if recipe == "reference" else "a photo of a {}."
    assert m["recipe"] == recipe and m["template"] == template and m["config"]["recipe"] == recipe
    assert m["train_config"]["lr"] == 1e-7 and m["train_config"]["batch_size"] == 4
    assert m["train_config"]["epochs"] == (100 if recipe == "reference" else 50) and m["history"][-1]["step"] == 2
    assert m["paper_row"] == ["Table 1", "LatteCLIP"] and m["paper_top1"] == 56.26
    saved = json.loads((coop / f"run-{recipe}" / "metrics.json").read_text())
    assert saved["recipe"] == recipe and saved["template"] == template
    # each recipe computed its own zero-shot labels with its own template (the cache is keyed by it)
    if recipe == "paper":
        metas = [json.loads(p.read_text()) for p in (coop / "cache" / "pseudo_labels").rglob("*.json")]
        assert {d.get("key", d).get("template") for d in metas} >= {"{} texture.", "a photo of a {}."}, metas


@pytest.mark.parametrize("recipe", ["reference", "paper"])
def test_recipes_end_to_end_shapes(tmp_path, recipe, monkeypatch):
    cfg = ExperimentConfig(dataset="shapes", recipe=recipe, max_steps=2, data_fraction=0.05, num_workers=0,
                           out_dir=str(tmp_path / "run"))
    m = run_experiment(cfg)
    assert m["recipe"] == recipe and m["template"] == "a photo of a {}." and m["history"][-1]["step"] == 2
    assert m["train_config"]["epochs"] == (10 if recipe == "reference" else 50) and m["paper_top1"] is None
    assert m["train_config"]["max_steps"] == 2 and m["train_config"]["drop_last"] is True   # the shapes world keeps its recorded 120-step schedule

"""The two recipes: `--print-config` for every dataset and recipe, and both recipes end to end offline."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest

from latteclip_nb.data import make_fake_dataset
from latteclip_nb.experiment import ExperimentConfig, main, run_experiment

# from the CoOp train+val sizes and the released training scripts (scripts/unsupervised/*_fine_tune_multiclass.sh of
# astra-vision/LatteCLIP): dataset: (n_train, reference template, --epochs, --workers)
DATASETS = {
    "eurosat": (18900, "a photo of a {}.", 15, 3), "sun397": (19850, "a photo of a {}.", 15, 3),
    "food101": (70700, "a photo of a {}, a type of food.", 15, 3), "flowers102": (5726, "a photo of a {}, a type of flower.", 50, 4),
    "dtd": (3948, "{} texture.", 100, 3), "fgvc_aircraft": (6667, "a photo of a {}, a type of aircraft.", 50, 3),
    "oxford_pets": (3680, "a photo of a {}.", 100, 3), "stanford_cars": (8144, "a photo of a {}.", 50, 3),
    "ucf101": (9537, "a photo of a person doing {}", 50, 3), "caltech101": (5777, "a photo of a {}.", 50, 3),
}


def released_batches(n, workers, batch=512):
    """The released loader's batches an epoch (src/training/data.py, get_wds_dataset with floor=False): full batches
    (partial=False) of `batch`, ceil(n / batch) of them, then ceil again per data-loading worker, times the workers."""
    per_worker = math.ceil(math.ceil(n / batch) / workers)
    return per_worker * workers


# the released runs' totals written out once by hand, a check on released_batches itself
RELEASED_TOTAL = {"eurosat": 585, "sun397": 585, "food101": 2115, "flowers102": 600, "dtd": 900, "fgvc_aircraft": 750,
                  "oxford_pets": 900, "stanford_cars": 900, "ucf101": 1050, "caltech101": 600}
# the paper: min{2000 iterations, 50 epochs}, an epoch of ceil(n / 512) steps
PAPER_TOTAL = {"eurosat": 1850, "sun397": 1950, "food101": 2000, "flowers102": 600, "dtd": 400, "fgvc_aircraft": 700,
               "oxford_pets": 400, "stanford_cars": 800, "ucf101": 950, "caltech101": 600}


def test_released_formula_by_hand():
    assert {d: e * released_batches(n, w) for d, (n, _, e, w) in DATASETS.items()} == RELEASED_TOTAL
    # 7 of the 10 datasets run more steps than ceil(n / 512) an epoch
    assert sorted(d for d, (n, _, _, w) in DATASETS.items() if released_batches(n, w) != math.ceil(n / 512)) == [
        "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_pets", "stanford_cars", "ucf101"]


@pytest.mark.parametrize("recipe", ["reference", "paper"])
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_print_config(dataset, recipe, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    main(["--dataset", dataset, "--recipe", recipe, "--data-root", str(tmp_path / "nothing-here"), "--print-config"])
    r = json.loads(capsys.readouterr().out)
    n, template, epochs, workers = DATASETS[dataset]
    assert {"recipe", "template", "steps_per_epoch", "total_steps", "steps_rule", "n_train", "train"} <= set(r)
    t = r["train"]
    assert t["batch_size"] == 512 and t["drop_last"] is False and t["alpha"] == 0.99 and t["momentum"] == 0.0
    assert t["mixer"] == "eq1"
    if recipe == "reference":
        spe = released_batches(n, workers)
        assert (r["recipe"], r["n_train"], r["steps_per_epoch"], t["released_workers"]) == (recipe, n, spe, workers)
        assert (r["template"], t["lr"], t["epochs"], t["max_steps"], r["total_steps"]) == (template, 1e-7, epochs, None, epochs * spe)
        assert r["total_steps"] == RELEASED_TOTAL[dataset] and f"= {spe} full batches" in r["steps_rule"]
    else:
        lr = 1e-6 if dataset in ("food101", "sun397") else 1e-7
        assert (r["recipe"], r["n_train"], r["steps_per_epoch"], t["released_workers"]) == (recipe, n, math.ceil(n / 512), 0)
        assert (r["template"], t["lr"], t["epochs"], t["max_steps"], r["total_steps"]) == ("a photo of a {}.", lr, 50, 2000, PAPER_TOTAL[dataset])
        assert r["steps_rule"].endswith(f"= {PAPER_TOTAL[dataset]} steps")
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


def test_print_config_mixer_and_epoch_rule(capsys, tmp_path, monkeypatch):
    """--mixer and --released-workers are flags like every field; --released-workers 0 gives ceil(N / 512) on reference."""
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    main(["--dataset", "pets", "--mixer", "released", "--released-workers", "0", "--print-config"])
    r = json.loads(capsys.readouterr().out)
    assert (r["train"]["mixer"], r["train"]["released_workers"], r["steps_per_epoch"], r["total_steps"]) == ("released", 0, 8, 800)
    with pytest.raises(SystemExit):
        main(["--dataset", "pets", "--mixer", "eq2", "--print-config"])
    assert "invalid choice: 'eq2'" in capsys.readouterr().err

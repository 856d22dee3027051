"""End-to-end runs of the whole pipeline through `latteclip-train` and `run_experiment`, on tiny generated data."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

from latteclip_nb.data import make_fake_dataset
from latteclip_nb.experiment import ExperimentConfig, run_experiment

TINY = ["--clip-model", "latte-tiny", "--pretrained", "none", "--num-workers", "0", "--batch-size", "4"]


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
    assert "unknown dataset 'nonesuch'" in err and "eurosat" in err and "shapes" in err


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


# ------------------------------------------------------------------ nothing replaced silently, mistakes in one line
def _last_line(r):
    return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def test_cli_finished_run_is_not_replaced_by_another_config(world):
    root, env = world
    out = root / "run-finished"
    base = ["--dataset", "dtd", "--data-root", str(root / "data"), "--method", "zeroshot", "--out-dir", str(out), *TINY]
    assert _cli(base, env, root).returncode == 0
    before = (out / "metrics.json").read_bytes()
    r = _cli(base + ["--alpha", "0.5"], env, root)                       # another config into the finished folder
    err = _last_line(r)
    assert r.returncode != 0 and "alpha: 0.99 -> 0.5" in err and "new --out-dir" in err and "--overwrite" in err, r.stderr[-2000:]
    assert (out / "metrics.json").read_bytes() == before
    assert _cli(base + ["--num-workers", "1"], env, root).returncode == 0   # workers do not change the numbers: same run
    assert (out / "metrics.json").read_bytes() == before
    r = _cli(base + ["--alpha", "0.5", "--overwrite"], env, root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["config"]["alpha"] == 0.5


def test_interrupted_run_with_another_config_and_no_resume(world):
    root, env = world
    out = root / "run-interrupted"
    args = ["--dataset", "dtd", "--data-root", str(root / "data"), "--method", "flyp_pl", "--max-steps", "1", "--out-dir", str(out), *TINY]
    out.mkdir()
    cfg = ExperimentConfig(dataset="dtd", data_root=str(root / "data"), method="flyp_pl", max_steps=1, alpha=0.5, out_dir=str(out),
                           model="latte-tiny", pretrained="none", num_workers=0, batch_size=4)
    (out / "config.json").write_text(json.dumps(__import__("dataclasses").asdict(cfg)))   # as an interrupted alpha=0.5 run leaves it
    (out / "train").mkdir(); (out / "train" / "checkpoint.pt").write_bytes(b"of the old run")
    r = _cli(args, env, root)
    err = _last_line(r)
    assert r.returncode != 0 and "interrupted run" in err and "alpha: 0.5 -> 0.99" in err and "--no-resume" in err, r.stderr[-2000:]
    r = _cli(args + ["--no-resume", "--ckpt-every", "1"], env, root)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["alpha"] == 0.99 and m["config"]["resume"] is False and m["history"][-1]["step"] == 1


@pytest.mark.parametrize("extra, words", [
    (["--lr", "-1"], ["--lr -1.0", "> 0"]),
    (["--epochs", "0"], ["--epochs 0", ">= 1", "recipe"]),
    (["--max-steps", "-3"], ["--max-steps -3"]),
    (["--dataset", "./no/such/folder"], ["no such folder", "no/such/folder"]),
    (["--data-root", "/no/such/root"], ["--data-root /no/such/root", "no such folder"]),
    (["--device", "cuda:7"], ["cuda:7"]),
])
def test_cli_bad_config_fails_in_one_line_before_any_work(world, tmp_path, extra, words):
    root, env = world
    if extra[:2] == ["--device", "cuda:7"]:
        import torch
        if torch.cuda.device_count() > 7: pytest.skip("this machine has 8 GPUs")
    env = {**env, "LATTECLIP_CACHE": str(tmp_path / "cache")}
    args = ["--dataset", "dtd", "--data-root", str(root / "data"), "--out-dir", str(tmp_path / "out"), *TINY]
    r = _cli(args + extra, env, root)
    err = _last_line(r)
    assert r.returncode != 0 and err.startswith("latteclip-train: error:") and all(w in err for w in words), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache" / "pseudo_labels").exists() and not (tmp_path / "out").exists()   # nothing was computed


def test_cli_unreadable_classes_file_is_one_line(world, tmp_path):
    root, env = world
    (tmp_path / "classes.txt").write_bytes("caf\xe9\nbar\n".encode("latin-1"))
    r = _cli(["--dataset", str(root / "data" / "dtd" / "images"), "--classes-file", str(tmp_path / "classes.txt"),
              "--out-dir", str(tmp_path / "out"), *TINY], env, root)
    err = _last_line(r)
    assert r.returncode != 0 and "classes.txt" in err and "UTF-8" in err and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_cli_server_down_is_one_line(world, tmp_path):
    """The captioner's server does not answer: the same line latteclip-caption prints, not a traceback."""
    root, env = world
    r = _cli(["--dataset", "dtd", "--data-root", str(root / "data"), "--captioner", "openai", "--server-url",
              "http://127.0.0.1:9/v1", "--max-steps", "1", "--out-dir", str(tmp_path / "out"), *TINY], env, root)
    err = _last_line(r)
    assert r.returncode != 0 and err.startswith("latteclip-train: error:") and "127.0.0.1:9" in err, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_help_describes_every_flag():
    r = subprocess.run([str(BIN / "latteclip-train"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for flag in ("--resume, --no-resume", "--ckpt-every", "--overwrite", "--world-seed", "--describer-errors", "{true,false}",
                 "{zeroshot,latteclip,flyp_pl,oracle,llava_zs,reclip}", "{exact,fast}", "--use-mixer false"):
        assert flag in r.stdout, flag


def test_shapes_world_variant_is_recorded(world, monkeypatch, tmp_path):
    root, env = world
    monkeypatch.setenv("LATTECLIP_CACHE", env["LATTECLIP_CACHE"])
    cfg = ExperimentConfig(dataset="shapes", method="zeroshot", world_seed=1, describer_errors="q_shape=0.1", num_workers=0,
                           out_dir=str(tmp_path / "out"))
    assert "world_seed=1" in cfg.run_name() and "describer_errors=q_shape=0.1" in cfg.run_name()
    m = run_experiment(cfg)
    assert m["dataset"] == "shapes-world1-q_shape0.1" and m["world"]["seed"] == 1 and m["world"]["describer_errors"]["q_shape"] == 0.1
    assert m["config"]["world_seed"] == 1 and 0 <= m["top1"] <= 100


NB = Path(__file__).resolve().parents[1] / "nbs" / "90_experiment.ipynb"


@pytest.mark.parametrize("params, words", [(["lerning_rate", "0.1"], ["unknown parameter", "lerning_rate", "valid parameters", "lr"]),
                                           (["epochs", "abc"], ["epochs='abc'", "integer"]),
                                           (["dataset", "nonesuch"], ["unknown dataset 'nonesuch'", "shapes"])])
def test_papermill_bad_parameter_stops_the_notebook(tmp_path, params, words):
    r = subprocess.run([str(BIN / "papermill"), str(NB), str(tmp_path / "out.ipynb"), "-p", *params, "--cwd", str(NB.parent)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and all(w in r.stderr for w in words), r.stderr[-3000:]
    assert "Unable to parse" not in r.stderr        # the parameters cell parses without papermill warnings
    line = r.stderr.strip().splitlines()[-1]        # the notebook's error is the one line, not a trace through the package
    assert line.startswith("ValueError: ") and all(w in line for w in words) and "experiment.py" not in r.stderr


def test_cli_custom_folder_without_weights_offline_fails_at_once(world, tmp_path):
    """A custom folder with the default (downloaded) weights, and no network: one line up front, no hub retries."""
    root, env = world
    env = {**env, "HF_HUB_OFFLINE": "1"}   # no network, said the way a user says it (the TCP probe is tested in 02_clip)
    (tmp_path / "classes.txt").write_text("banded\ndotted_lines\nzig.zag\n")
    r = _cli(["--dataset", str(root / "data" / "dtd" / "images"), "--classes-file", str(tmp_path / "classes.txt"),
              "--out-dir", str(tmp_path / "out"), "--num-workers", "0"], env, root)
    err = _last_line(r)
    assert r.returncode != 0 and "offline" in err and "--pretrained" in err and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_cli_class_names_rename_the_task_and_rare_names_resolves_without_weights(world, tmp_path):
    """--class-names renames classes as a user types it; --pretrained rare-names names a cache file and --print-config builds nothing."""
    root, env = world
    from latteclip_nb.shapes import SHAPES, SHAPES_CHECKPOINT
    r = _cli(["--dataset", "shapes", "--method", "zeroshot", "--class-names", "ring=annulus,diamond=lozenge", "--pretrained",
              str(SHAPES_CHECKPOINT), "--num-workers", "0", "--out-dir", str(tmp_path / "out")], env, root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["classnames"] == [{"ring": "annulus", "diamond": "lozenge"}.get(c, c) for c in SHAPES] and m["dataset"].startswith("shapes-names")
    r = _cli(["--dataset", "shapes", "--pretrained", "rare-names", "--print-config"], env, root)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = Path(json.loads(r.stdout)["train"]["pretrained"])
    assert ck.name.startswith("latte-shapes-rare-") and ck.parent == Path(env["LATTECLIP_CACHE"]) / "models" and not ck.exists()
    err = _last_line(_cli(["--dataset", "shapes", "--class-names", "ring=circle", "--out-dir", str(tmp_path / "bad")], env, root))
    assert err.startswith("latteclip-train: error:") and "'circle'" in err and not (tmp_path / "bad").exists()


def test_deterministic_flag_reaches_the_training_config():
    """--deterministic takes no value, is a papermill parameter and a TrainConfig field, and does not change a run's identity."""
    from latteclip_nb.data import get_spec
    from latteclip_nb.experiment import config_diff, config_from_params, config_parser, train_config
    p = config_parser()
    assert p.parse_args(["--deterministic"]).deterministic is True and p.parse_args([]).deterministic is False
    assert p.parse_args(["--deterministic", "--no-deterministic"]).deterministic is False
    cfg = config_from_params({"dataset": "dtd", "deterministic": "True"})
    assert cfg.deterministic is True and train_config(cfg, get_spec("dtd")).deterministic is True
    assert "deterministic" in ExperimentConfig.FREE_FIELDS and cfg.run_name() == ExperimentConfig(dataset="dtd").run_name()
    assert config_diff({**ExperimentConfig(dataset="dtd").__dict__}, cfg) == []


def test_one_definition_per_knob_reaches_every_front_door(tmp_path):
    """The CLI, the papermill parameters and --print-config are all made from ExperimentConfig: every field, each with its help."""
    import dataclasses, json, subprocess, sys
    from latteclip_nb.experiment import config_parser, papermill_parameters, flag_of
    from latteclip_nb.run_config import TrainKnobs, field_help
    names = [f.name for f in dataclasses.fields(ExperimentConfig)]
    flags = {a.dest: a for a in config_parser()._actions}
    assert set(names) <= set(flags) and {"grad_accum", "grad_checkpointing", "log_every", "keep_checkpoints"} <= set(flags)
    helps = field_help(ExperimentConfig)
    assert set(helps) == set(names) and not [n for n, h in helps.items() if "=" in h]   # papermill reads no comment with '='
    cell = papermill_parameters()
    assert [l.split(" = ")[0] for l in cell.splitlines()] == [flag_of(f.name)[2:].replace("-", "_") for f in
                                                                 __import__("latteclip_nb.experiment", fromlist=["x"]).config_fields()] + ["overwrite"]
    # the stored notebook holds exactly the generated cell
    r = subprocess.run([sys.executable, "scripts/write_parameters.py", "--check"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    # a schedule knob given as none is the recipe's; --print-config shows every field with the recipe's values filled in
    a = config_parser().parse_args(["--lr", "none", "--epochs", "3", "--grad-accum", "2", "--batch-size", "64"])
    assert (a.lr, a.epochs, a.grad_accum) == (None, 3, 2)
    out = subprocess.run([str(BIN / "latteclip-train"), "--dataset", "dtd", "--epochs", "3", "--grad-accum", "2", "--print-config"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = json.loads(out.stdout)
    assert set(run["config"]) == set(names) and run["config"]["epochs"] == 3 and run["config"]["lr"] == 1e-7   # dtd's lr, filled
    assert run["config"]["route"] == "pseudo" and run["train"]["grad_accum"] == 2
    assert {f.name: f.default for f in dataclasses.fields(TrainKnobs)}.items() <= {f.name: f.default for f in dataclasses.fields(ExperimentConfig)}.items()

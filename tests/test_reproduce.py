"""The written record follows from the code: every generated block (on the home page README.md or a page nbs/*.md)
names its command and commit and keeps its runs in docs/results, and `scripts/reproduce.py` (make reproduce) reruns
a recorded run and fails when it moved."""
import csv, os, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT/"scripts"/"reproduce.py"
BLOCKS = ("shapes-results", "shapes-worlds", "shapes-ablations", "shapes-groups", "shapes-augment", "shapes-wise", "premise", "descriptions-map")


def _reproduce(args, tmp_path):
    env = {**os.environ, "LATTECLIP_CACHE": str(tmp_path/"cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900)


def _page(name: str) -> Path:
    """The one page (README.md or nbs/*.md) that holds the block."""
    pages = [p for p in [ROOT/"README.md", *sorted((ROOT/"nbs").glob("*.md"))] if f"<!-- {name}:start -->" in p.read_text(encoding="utf-8")]
    assert len(pages) == 1, f"{name}: the block stands in {len(pages)} pages: {pages}"
    return pages[0]


def _block(name: str) -> str:
    text = _page(name).read_text(encoding="utf-8")
    return text.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]


@pytest.mark.parametrize("name", BLOCKS)
def test_block_names_command_commit_and_runs(name):
    body = _block(name)
    m = re.search(r"Written by `(papermill nbs/\d\d_\w+\.ipynb \w+\.ipynb(?: -p \w+ \S+)*)` from runs made at commit `([0-9a-f]{10})`", body)
    assert m, f"{name}: the block does not name the command and the commit that made it"
    assert (ROOT/m.group(1).split()[1]).is_file()
    path = ROOT/"docs"/"results"/f"{name}.csv"
    assert f"docs/results/{name}.csv" in body and path.is_file()
    link = re.search(rf"\[docs/results/{name}\.csv\]\(([^)]+)\)", body)
    assert link and (_page(name).parent/link.group(1)).resolve() == path.resolve(), f"{name}: the link to its runs does not lead there from its page"
    with open(path, newline="", encoding="utf-8") as f: rows = list(csv.DictReader(f))
    assert rows and all(r["command"].startswith("latteclip-train ") and r["seed"] != "" and r["git_commit"] for r in rows)
    assert sum(r["reproduce"] == "True" for r in rows) == 1
    n = re.search(r"one row per (?:run \((\d+):|table row \((\d+) rows of (\d+) distinct runs)", body)
    assert n and int(n.group(1) or n.group(2)) == len(rows)
    assert int(n.group(3) or n.group(1)) == len({r["command"] for r in rows})   # a run shared by tables counted once


def test_default_world_block_reproduces(tmp_path):
    r = _reproduce(["shapes-results"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "shapes-results: recorded" in r.stdout and ": ok" in r.stdout


def test_a_moved_result_fails(tmp_path):
    results = tmp_path/"results"; results.mkdir()
    cmd = "latteclip-train --dataset shapes --method zeroshot --seed 0"
    (results/"toy.csv").write_text(f"label,seed,top1,git_commit,command,reproduce\nzero-shot,0,58.0,abc,{cmd},True\n")
    r = _reproduce(["--results", str(results)], tmp_path)
    assert r.returncode != 0 and "toy: recorded 58.00, now 55.00" in r.stdout and "MOVED" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("reproduce: 1 of 1 blocks no longer follow from the code: toy")
    (results/"toy.csv").write_text(f"label,seed,top1,git_commit,command,reproduce\nzero-shot,0,55.2,abc,{cmd},True\n")
    assert _reproduce(["--results", str(results), "toy"], tmp_path).returncode == 0


def test_unknown_block_is_one_line(tmp_path):
    r = _reproduce(["shapes-resluts"], tmp_path)
    assert r.returncode != 0 and "shapes-resluts.csv" in r.stderr and "the blocks are" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_rerun_takes_one_thread_as_the_sweeps_did(tmp_path, monkeypatch):
    """The recorded runs were made one thread each; a rerun is too, whatever the caller's OMP_NUM_THREADS."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("reproduce_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    seen = {}
    def run(cmd, env=None, **kw):
        seen.update(env or {}); (tmp_path/"metrics.json").write_text('{"top1": 1.5}')
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(mod.subprocess, "run", run)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert mod.rerun({"command": "latteclip-train --dataset shapes"}, tmp_path) == 1.5
    assert seen.get("OMP_NUM_THREADS") == "1" and seen.get("MKL_NUM_THREADS") == "1"

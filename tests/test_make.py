"""`make test` runs every part (export check, notebooks, pytest) even when one fails, and fails if any did."""
import os, subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_venv(tmp_path, nbdev_test_rc, pytest_rc):
    "A venv stand-in whose tools record that they ran and exit with the given codes."
    venv = tmp_path / "venv"; (venv / "bin").mkdir(parents=True)
    tools = {"nbdev_export": 0, "nbdev_test": nbdev_test_rc, "pytest": pytest_rc}
    for name, rc in tools.items():
        f = venv / "bin" / name
        f.write_text(f"#!/bin/sh\necho {name} >> {tmp_path / 'ran'}\nexit {rc}\n"); f.chmod(0o755)
    (venv / ".installed").touch()
    os.utime(venv / ".installed", (4102444800, 4102444800))   # newer than settings.ini and setup.py: no reinstall
    return venv


@pytest.mark.parametrize("nb_rc, py_rc", [(1, 0), (0, 1), (0, 0)])
def test_make_test_runs_pytest_after_a_failed_notebook(tmp_path, nb_rc, py_rc):
    venv = _fake_venv(tmp_path, nb_rc, py_rc)
    r = subprocess.run(["make", "--no-print-directory", "test", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    ran = (tmp_path / "ran").read_text().split()
    assert ran == ["nbdev_export", "nbdev_test", "pytest"], r.stdout + r.stderr   # pytest runs although nbdev_test failed
    failed = r.stdout.split("FAILED:")[1].split() if "FAILED:" in r.stdout else []   # sync-check may fail in a dirty tree
    assert ("nbtest" in failed) == bool(nb_rc) and ("pytest" in failed) == bool(py_rc)
    assert (r.returncode != 0) == bool(failed) and (failed or "passed" in r.stdout)


def test_wheel_builds_without_packaging_warnings(tmp_path):
    """The package builds with no setuptools warning about its own metadata, and ships its assets."""
    import sys, zipfile
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-v",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stdout + r.stderr
    assert "latteclip_nb.assets" not in log and "License classifiers are deprecated" not in log
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert {"latteclip_nb/assets/latte-tiny.json", "latteclip_nb/assets/latte-shapes.safetensors"} <= set(names)


def test_make_docs_without_quarto_fails_with_its_one_line(tmp_path):
    venv = _fake_venv(tmp_path, 0, 0)
    (venv / "bin" / "pip").write_text("#!/bin/sh\nexit 1\n"); (venv / "bin" / "pip").chmod(0o755)   # no quarto-cli either
    env = {**os.environ, "PATH": "/usr/bin:/bin"}   # no quarto on the PATH
    r = subprocess.run(["make", "--no-print-directory", "docs", f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "make docs needs Quarto" in r.stdout + r.stderr

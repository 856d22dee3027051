"""Smoke test of bench/scale.py: it runs at a tiny size and reports every stage (numbers are not checked)."""
import subprocess, sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


def test_bench_scale_reports_every_stage(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--sizes", "120,240", "--caption-base", "60", "--markdown",
                          "--threads", "1", "--work-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    table = [l for l in out.splitlines() if l.startswith("| ")]
    assert table[0].startswith("| stage | N=60 | N=120 | N=240 | per-item ratio |")
    stages = [l.split(" | ")[0][2:] for l in table[1:]]
    assert stages == ["caption", "rerun", "texttable", "texttable, fresh strings", "views", "table4", "knn", "knn reuse"], stages
    caption = table[1].split(" | ")
    assert all("/item" in c for c in caption[1:4]) and caption[4].rstrip(" |").endswith("x")   # measured at all three sizes


def test_bench_scale_rejects_unknown_stage():
    r = subprocess.run([sys.executable, str(BENCH), "--stages", "views,nope"], capture_output=True, text=True)
    assert r.returncode != 0 and "nope" in r.stderr


def test_bench_shapes_render_reports_a_line():
    """bench/shapes_render.py (where the shapes world's render time is reported, not asserted) runs at a tiny size."""
    out = subprocess.run([sys.executable, str(BENCH.parent / "shapes_render.py"), "--n-train", "20", "--n-test", "10", "--runs", "1"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    assert out.startswith("shapes world render: 30 images in ") and "ms/image" in out, out

"""Rerun one recorded run of every generated block and check that the current code still gives its top-1.

Each generated block (the shapes results on the home page README.md; the other worlds, the ablations, the premise
study and the map of when descriptions help on nbs/results.md) keeps its runs in `docs/results/<block>.csv`, one row
per run with the `latteclip-train` line that reruns it; one row is marked `reproduce`. This script reruns that row
(into a temporary folder, with the user's cache for zero-shot labels, captions and rendered worlds, which are keyed
by content; one CPU thread, as the sweeps made every recorded run: a near-chance run such as the map's can land a
point apart under another thread count) and fails when its top-1 moved by more than the tolerance.

    python scripts/reproduce.py                       # every block under docs/results (make reproduce)
    python scripts/reproduce.py shapes-results        # one block (make reproduce BLOCKS=shapes-results)
    python scripts/reproduce.py --tolerance 0.25 premise
"""
import argparse, csv, json, shlex, subprocess, sys, tempfile, time
from pathlib import Path

from latteclip_nb.sweep import _TRAIN as TRAIN, threads_env   # latteclip-train in this interpreter, as the sweeps run it

REPO = Path(__file__).resolve().parents[1]


def recorded_row(csv_path: Path) -> dict:
    """The row of `csv_path` marked `reproduce` (a one-line error when the file has none, or no command)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    marked = [r for r in rows if r.get("reproduce", "").strip().lower() == "true"]
    if not marked or not marked[0].get("command") or not marked[0].get("top1"):
        raise SystemExit(f"reproduce: {csv_path}: no row marked reproduce with a command and a top-1; regenerate the block with its notebook")
    return marked[0]


def rerun(row: dict, out: Path, threads: int = 1) -> float:
    """Run the row's `latteclip-train` line into `out` with `threads` CPU threads; its top-1."""
    args = shlex.split(row["command"])
    if not args or args[0] != "latteclip-train":
        raise SystemExit(f"reproduce: the recorded command is not a latteclip-train line: {row['command']!r}")
    cmd = [sys.executable, "-c", TRAIN, *args[1:], "--out-dir", str(out), "--no-report"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=threads_env(threads))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise SystemExit(f"reproduce: {row['command']} failed: {last}")
    return float(json.loads((out/"metrics.json").read_text())["top1"])


def main(argv=None):
    p = argparse.ArgumentParser(prog="reproduce", description="Rerun one recorded run per generated block and compare its top-1.")
    p.add_argument("blocks", nargs="*", help="block names (docs/results/<block>.csv); default: all")
    p.add_argument("--results", default=str(REPO/"docs"/"results"), help="folder of the blocks' CSV files")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the rerun (the sweeps record their runs with one)")
    p.add_argument("--tolerance", type=float, default=0.5, help="largest accepted |rerun - recorded| in top-1 points")
    a = p.parse_args(argv)
    folder = Path(a.results)
    paths = [folder/f"{b}.csv" for b in a.blocks] if a.blocks else sorted(folder.glob("*.csv"))
    missing = [str(x) for x in paths if not x.is_file()]
    if missing or not paths:
        raise SystemExit(f"reproduce: no such block file: {', '.join(missing) or folder/'*.csv'}; the blocks are "
                         f"{', '.join(x.stem for x in sorted(folder.glob('*.csv'))) or 'none'}")
    failed = []
    for path in paths:
        row = recorded_row(path)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            got = rerun(row, Path(tmp)/"run", a.threads)
        want = float(row["top1"])
        ok = abs(got - want) <= a.tolerance
        print(f"{path.stem}: recorded {want:.2f}, now {got:.2f} ({got - want:+.2f}; {time.time() - t0:.0f} s): "
              f"{'ok' if ok else 'MOVED'}  [{row['command']}]", flush=True)
        if not ok: failed.append(path.stem)
    if failed:
        raise SystemExit(f"reproduce: {len(failed)} of {len(paths)} blocks no longer follow from the code: {', '.join(failed)}; "
                         "rerun their notebooks to regenerate them")
    print(f"reproduce: {len(paths)} block{'s' if len(paths) > 1 else ''} within {a.tolerance} points")


if __name__ == "__main__":
    main()

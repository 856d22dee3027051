"""How long rendering the shapes world takes (the offline dataset of `nbs/12_shapes.ipynb`).

Not a test: it prints one line per run. The world is rendered into a fresh temporary folder each time (no cache),
so the number is the cost a first `make demo` pays. Timings move with the machine's load; the default world
rendered in a few seconds on one free core of the 2-core development VM.

    .venv/bin/python bench/shapes_render.py                      # the default world (1600 + 800 images), 3 runs
    .venv/bin/python bench/shapes_render.py --n-train 40 --n-test 20 --runs 1    # seconds: checks the harness
"""
import argparse, platform, statistics, tempfile, time

import torch

from latteclip_nb.shapes import World, make_world


def main(argv=None):
    ap = argparse.ArgumentParser(description="Time rendering the shapes world into a fresh folder.")
    ap.add_argument("--n-train", type=int, default=World().n_train, help="unlabeled training images")
    ap.add_argument("--n-test", type=int, default=World().n_test, help="labeled test images")
    ap.add_argument("--runs", type=int, default=3, help="repetitions (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.n_train < 10 or a.n_test < 10: ap.error("--runs must be >= 1 and --n-train/--n-test >= 10 (one image per class)")
    torch.set_num_threads(a.threads)
    world, secs = World(n_train=a.n_train, n_test=a.n_test), []
    for _ in range(a.runs):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter(); make_world(world, d, progress=False); secs.append(time.perf_counter() - t0)
    n, med = a.n_train + a.n_test, statistics.median(secs)
    print(f"shapes world render: {n} images in {med:.2f} s (median of {a.runs}; {1e3 * med / n:.2f} ms/image), "
          f"{a.threads} torch thread(s), {platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()

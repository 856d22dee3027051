"""Dataset-size scaling of the package's own CPU-side stages, on a fake food101-sized split.

Not a test: it prints numbers. No model, no image decoding: image loading and collage tiling are replaced by
functions that return a prepared tiny picture, and the captioner is a fake one that returns distinct ~20-word
descriptions instantly, so only the package's own overhead is timed. Each stage runs at every size of --sizes;
the captioning loop also runs at --caption-base (1k) so that its per-item cost can be compared with the largest
size. The last column is per-item cost at the largest size over the one at the smallest (1.0 = linear in N; the
exact kNN search is O(N^2) by nature, so its ratio is the size ratio).

    .venv/bin/python bench/scale.py                                 # N = 10k and 70.7k (several minutes)
    .venv/bin/python bench/scale.py --sizes 500                     # seconds: checks the harness
    .venv/bin/python bench/scale.py --stages views,table4,knn --markdown

Stages (budgets at 70.7k on a 2-core CPU in brackets):
  caption   captioning loop overhead per item, images and one group per image (<= 2 ms, flat in N)
  rerun     rerun of the finished captioning step, nothing left to do (<= 10 s)
  texttable TextTable.build of the 2N distinct descriptions, as at every training start (<= 10 s)
  views     SeededViews per image through the training DataLoader, identity-cost transform (<= 50 us)
  table4    Table 4 ground-truth group sampling, 2 of 4 correct (linear)
  knn       ReCLIP kNN graph build, k = 20, D = 512, on the CPU (exact, O(N^2 D)), and its reuse
"""
import argparse, gc, inspect, platform, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import latteclip_nb.captions as captions
import latteclip_nb.data as data
from latteclip_nb.captions import Texts, describe_dataset
from latteclip_nb.collage import sample_groups_gt
from latteclip_nb.data import Split, get_spec
from latteclip_nb.reclip import knn_graph
from latteclip_nb.train import EpochBatches, SeededViews, TextTable, collate_views

STAGES = ("caption", "rerun", "texttable", "views", "table4", "knn")
C = 101  # food101's classes
WORDS = ("a", "plate", "of", "golden", "crispy", "fried", "chicken", "with", "fresh", "green", "herbs", "served",
         "on", "white", "ceramic", "dish", "beside", "creamy", "sauce", "and", "sliced", "lemon", "wedges", "grilled",
         "salmon", "fillet", "topped", "sesame", "seeds", "bowl", "noodle", "soup", "rich", "broth", "tender", "beef",
         "chunks", "scattered", "spring", "onions", "chocolate", "cake", "dusted", "powdered", "sugar", "wooden",
         "table", "rustic", "background", "steaming", "rice", "colorful", "vegetables", "glossy", "glaze")


def description(n: int, words: int = 19) -> str:
    """A distinct ~20-word food description for integer `n` (its words and a number from n)."""
    rng = np.random.default_rng(n)
    return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words)) + f" number {n}"


class FakeCaptioner:
    """A captioner that answers instantly with a distinct ~20-word description per picture."""
    model_id = "bench-fake-captioner"

    def __init__(self): self.n = 0

    def describe(self, images, prompts):
        out = [description(self.n + j) for j in range(len(images))]
        self.n += len(images)
        return out


_PICTURE = Image.new("RGB", (4, 4))
_VIEW = torch.zeros(3, 4, 4)


def no_decoding():
    """Replace image loading (and collage tiling) in the package's modules by instant stand-ins."""
    for mod in (data, captions):
        if hasattr(mod, "load_image"): mod.load_image = lambda path: _PICTURE.copy()
    if hasattr(captions, "make_collage"): captions.make_collage = lambda images, *a, **k: _PICTURE.copy()


def fake_split(n: int, seed: int = 0):
    """(Split of n fake food images in C classes, zero-shot labels c_zs (70% right), ground truth y)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % C)                      # every class as often as possible
    c_zs = np.where(rng.random(n) < 0.7, y, y[rng.permutation(n)])  # wrong ones: the label of another image
    ids = [f"class_{c:03d}/{i:06d}.jpg" for i, c in enumerate(y)]
    return Split(Path("/nonexistent/food-101/images"), ids, y.tolist(), [f"food {c}" for c in range(C)]), c_zs, y


def timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def fake_texts(n: int) -> Texts:
    """Texts with 2n distinct descriptions (one per image, one group per image), without the caption store."""
    return Texts([description(i) for i in range(n)], [description(n + i) for i in range(n)],
                 torch.randint(0, C, (n,)), torch.arange(n))


def run_size(n: int, stages, args) -> dict:
    """Seconds and per-item cost of each selected stage at size n: {stage: (seconds, items)}."""
    split, c_zs, y = fake_split(n)
    res, texts = {}, None
    spec = get_spec("food101")
    if {"caption", "rerun", "texttable"} & set(stages) and ("caption" in stages or "rerun" in stages):
        with tempfile.TemporaryDirectory(dir=args.work_dir) as d:
            kw = dict(kinds=("image", "group"), batch_size=args.caption_batch, workers=2)
            if "image_keys" in inspect.signature(describe_dataset).parameters:   # content keys: the fake files cannot be hashed
                kw["image_keys"] = [f"fake-image-{i:08d}" for i in range(n)]
            s, texts = timed(lambda: describe_dataset(spec, split, c_zs, FakeCaptioner(), Path(d)/"captions", **kw))
            items = len(texts.image) + len(texts.group)
            if "caption" in stages: res["caption"] = (s, items)
            if "rerun" in stages:
                s, texts = timed(lambda: describe_dataset(spec, split, c_zs, FakeCaptioner(), Path(d)/"captions", **kw))
                res["rerun"] = (s, items)
            if "texttable" in stages: res["texttable"] = texttable(texts, n, spec)   # the store's texts (token ids kept)
    if "texttable" in stages:
        res["texttable, fresh strings"] = texttable(fake_texts(n), n, spec)   # texts never tokenized before
    if "views" in stages:
        views = SeededViews(split, lambda im: _VIEW, seed=0)
        bs = min(512, n)
        loader = torch.utils.data.DataLoader(views, batch_sampler=EpochBatches(n, bs, seed=0), collate_fn=collate_views)
        s, seen = timed(lambda: sum(len(b[1]) for b in loader))
        res["views"] = (s, seen)
    if "table4" in stages:
        s, groups = timed(lambda: sample_groups_gt(c_zs, y, k=4, n_correct=2, seed=0))
        res["table4"] = (s, len(groups))
    if "knn" in stages:
        g = torch.Generator().manual_seed(0)
        feats = F.normalize(torch.randn(n + C, 512, generator=g), dim=1)   # C class nodes + n image nodes
        s, _ = timed(lambda: knn_graph(feats, 20))
        res["knn"] = (s, n + C)
        try:
            from latteclip_nb.reclip import GraphCache
        except ImportError: GraphCache = None
        if GraphCache is not None:
            cache = GraphCache()
            cache.get(feats, 20)
            s, _ = timed(lambda: cache.get(feats.clone(), 20))
            res["knn reuse"] = (s, n + C)
    return res


def texttable(texts, n, spec):
    import open_clip
    tok = open_clip.get_tokenizer("ViT-B-32")
    class_texts = [spec.template.format(f"food {c}") if hasattr(spec, "template") else f"a photo of food {c}."
                   for c in range(C)]
    s, table = timed(lambda: TextTable.build(tok, class_texts, texts, n_images=n))
    return (s, len(texts.image) + len(texts.group))


def fmt_per(s, items):
    per = s / max(items, 1)
    return f"{per * 1e6:.1f} us" if per < 1e-3 else f"{per * 1e3:.2f} ms" if per < 1 else f"{per:.2f} s"


def fmt_s(s): return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,70700", help="comma-separated dataset sizes N")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--caption-base", type=int, default=1000, help="extra size for the captioning loop (0: none)")
    ap.add_argument("--caption-batch", type=int, default=32, help="items per captioner call")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--work-dir", default=None, help="folder for the temporary caption stores")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    stages = [s for s in args.stages.split(",") if s]
    bad = set(stages) - set(STAGES)
    if bad: ap.error(f"unknown stage(s) {sorted(bad)}; choose from {','.join(STAGES)}")
    torch.set_num_threads(args.threads)
    no_decoding()
    import logging; logging.getLogger("latteclip_nb").setLevel(logging.ERROR)
    print(f"# {platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"python {platform.python_version()}", flush=True)
    results = {}
    if "caption" in stages and args.caption_base and args.caption_base not in sizes:
        results[args.caption_base] = run_size(args.caption_base, ["caption"], args)
        print(f"N={args.caption_base}: caption {fmt_s(results[args.caption_base]['caption'][0])}", flush=True)
    for n in sizes:
        results[n] = run_size(n, stages, args)
        print(f"N={n}: " + ", ".join(f"{k} {fmt_s(s)}" for k, (s, _) in results[n].items()), flush=True)
    cols = sorted(results)
    order = [x for k in STAGES for x in ([k, "texttable, fresh strings"] if k == "texttable" else [k])] + ["knn reuse"]
    names = [k for k in order if any(k in results[n] for n in cols)]
    head = ["stage"] + [f"N={n}" for n in cols] + ["per-item ratio"]
    rows = []
    for k in names:
        have = [n for n in cols if k in results[n]]
        cells = [f"{fmt_s(results[n][k][0])} ({fmt_per(*results[n][k])}/item)" if k in results[n] else "-" for n in cols]
        per = [results[n][k][0] / results[n][k][1] for n in have]
        ratio = f"{per[-1] / per[0]:.2f}x" if len(have) > 1 and per[0] > 0 else "-"
        rows.append([k] + cells + [ratio])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print()
    for r in [head] + rows: print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.markdown:
        print()
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for r in rows: print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time per training step of LatteCLIP (text_grad exact / fast) against FLYP + pseudo-labels, side by side.

Same model (the real ViT-B-32 architecture with random weights: speed does not depend on the values), same batch,
same optimizer; the methods take turns (the order rotates every repetition) and the medians are compared. The
ratios are printed last. Targets: exact <= 1.45 x flyp_pl, fast <= 1.0 x flyp_pl.

    .venv/bin/python bench/step_cost.py                 # batch 8, 5 repetitions, 1 thread: ~2 minutes on a CPU
    .venv/bin/python bench/step_cost.py --batch 32 --device cuda --reps 20
    .venv/bin/python bench/step_cost.py --accuracy --seeds 0 1 2   # top-1 of exact vs fast on the offline demo (shapes)

Texts have the lengths of real ones: class descriptions from a template (~8 tokens), image and group descriptions
of 12-20 words (~20-30 tokens), one description per image and many groups per class (so a batch rarely repeats one).
"""
import argparse, statistics, sys, time

import torch

from latteclip_nb.captions import Texts
from latteclip_nb.train import TrainConfig, Trainer

CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
           "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed",
           "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley", "perforated"]
SUBJECTS = ["A close-up of", "A photo showing", "An image of", "A detailed view of", "A picture of"]
THINGS = ["woven fabric", "a stone wall", "tree bark", "a ceramic tile", "a knitted scarf", "dry cracked soil",
          "a honeycomb", "a marble floor", "a metal grate", "a lace curtain"]
DETAILS = ["with thin parallel stripes in muted brown and beige tones",
           "covered in small irregular dark spots on a pale background",
           "showing a dense repeating pattern of tiny hexagonal cells",
           "with rough uneven ridges running diagonally across the surface",
           "featuring bright alternating squares of black and white color",
           "with soft fuzzy fibers tangled together in loose curls"]


def description(i: int) -> str:
    "A 14-20 word description, different for every i (the length of a real LLaVA answer under the 20-word prompt)."
    return f"{SUBJECTS[i % 5]} {THINGS[(i // 5) % 10]} {DETAILS[(i // 50) % 6]}, sample {i}."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=len(CLASSES))
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per method (after one warm-up each)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: the 2 shared cores of the dev machine time best single-threaded)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--online", action="store_true", help="also time flyp_pl with online pseudo-labels")
    p.add_argument("--accuracy", action="store_true", help="instead: top-1 of text_grad exact vs fast on the shapes demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="runs/step_cost", help="--accuracy: training runs go here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.accuracy: return accuracy(args)
    torch.manual_seed(0)
    import open_clip
    model, _, _ = open_clip.create_model_and_transforms(args.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(args.model)
    device = torch.device(args.device)
    B, C = args.batch, args.classes
    N = G = 64 * B                                      # enough images and groups that a batch rarely repeats a group
    classes = (CLASSES * (C // len(CLASSES) + 1))[:C]
    class_texts = [f"{c} texture." if i < len(CLASSES) else f"{c} texture {i}." for i, c in enumerate(classes)]
    c_zs = torch.arange(N) % C
    texts = Texts(image=[description(i) for i in range(N)], group=[description(N + g) for g in range(G)],
                  group_label=torch.arange(G) % C, group_of=torch.arange(N) % G)
    ntok = lambda s: int(tokenizer([s]).argmax(-1)) + 1
    print(f"{args.model} (random weights), batch {B}, {C} classes, {torch.get_num_threads()} threads, {device}; "
          f"tokens: class text {ntok(class_texts[0])}, description {min(map(ntok, texts.image[:50]))}-{max(map(ntok, texts.image[:50]))}")

    runs = {"latteclip exact": dict(method="latteclip", text_grad="exact"),
            "latteclip fast": dict(method="latteclip", text_grad="fast"),
            "flyp_pl": dict(method="flyp_pl", pseudo="fixed")}
    if args.online: runs["flyp_pl online"] = dict(method="flyp_pl", pseudo="online")
    trainers = {name: Trainer(model, tokenizer, class_texts, TrainConfig(epochs=1, warmup_steps=1, batch_size=B, **kw),
                              total_steps=10_000, c_zs=c_zs, texts=texts, device=device) for name, kw in runs.items()}
    shared = next(iter(trainers.values()))
    for t in trainers.values(): t.optimizer, t.scheduler = shared.optimizer, shared.scheduler   # one optimizer state in memory
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 224, 224, generator=g)
    idx = torch.randperm(N, generator=g)[:B]

    def step(name):
        if device.type == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainers[name].step([(images, idx)], epoch=0)
        if device.type == "cuda": torch.cuda.synchronize()
        return time.perf_counter() - t0

    names = list(runs)
    for name in names: step(name)                       # warm-up (allocations, the optimizer state)
    times = {name: [] for name in names}
    for r in range(args.reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(step(name))
            print(f"  rep {r + 1}/{args.reps} {name:16s} {times[name][-1]:7.2f} s  (texts encoded: {trainers[name].texts_encoded})",
                  flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print("\nmedian seconds per step:")
    for name in names: print(f"  {name:16s} {med[name]:7.2f} s   (min {min(times[name]):.2f}, max {max(times[name]):.2f})")
    print("\nratios to flyp_pl (fixed pseudo-labels):")
    for name in names:
        if name != "flyp_pl": print(f"  {name:16s} {med[name] / med['flyp_pl']:.2f}x")
    return 0


def accuracy(args):
    "Train LatteCLIP on the offline shapes world with text_grad exact and fast (same seeds) and compare test top-1."
    from pathlib import Path
    from latteclip_nb import shapes
    from latteclip_nb.captions import describe_dataset
    from latteclip_nb.clip import load_clip, text_classifier, zero_shot_pseudo_labels
    from latteclip_nb.core import cache_root
    from latteclip_nb.evaluate import evaluate
    from latteclip_nb.prompts import class_description
    from latteclip_nb.train import train
    spec, sp = shapes.SHAPES_SPEC, shapes.load_shapes()
    model, _, eval_tf, tok = load_clip(shapes.SHAPES_MODEL, str(shapes.SHAPES_CHECKPOINT))
    key = dict(model=shapes.SHAPES_MODEL, pretrained=str(shapes.SHAPES_CHECKPOINT), dataset=spec.name, split="train")
    c_zs = zero_shot_pseudo_labels(model, eval_tf, tok, sp["train"], spec.template, cache_root() / "pseudo_labels", key).c_zs
    texts = describe_dataset(spec, sp["train"], c_zs, shapes.describer_for(spec), cache_root() / "captions" / spec.name)
    class_texts = [class_description(spec, c) for c in sp["train"].classnames]
    top1 = {}
    for seed in args.seeds:
        for mode in ("exact", "fast"):
            model, train_tf, eval_tf, tok = load_clip(shapes.SHAPES_MODEL, str(shapes.SHAPES_CHECKPOINT))
            cfg = TrainConfig(epochs=spec.epochs, warmup_steps=spec.warmup_steps, lr=spec.lr, batch_size=spec.batch_size,
                              weight_decay=spec.weight_decay, text_grad=mode, seed=seed, model_name=shapes.SHAPES_MODEL)
            t0 = time.perf_counter()
            res = train(model, tok, train_tf, sp["train"], class_texts, cfg, Path(args.out) / f"{mode}-seed{seed}", c_zs=c_zs, texts=texts)
            top1[mode, seed] = 100 * evaluate(res.model, eval_tf, sp["test"], res.classifier)["top1"]
            print(f"  seed {seed} {mode:5s} top-1 {top1[mode, seed]:6.2f}%  ({time.perf_counter() - t0:.0f} s)", flush=True)
    pretrained = load_clip(shapes.SHAPES_MODEL, str(shapes.SHAPES_CHECKPOINT))[0]
    W = text_classifier(pretrained, tok, sp["test"].classnames, [spec.template])
    zs = 100 * evaluate(pretrained, eval_tf, sp["test"], W)["top1"]
    ex, fa = [top1["exact", s] for s in args.seeds], [top1["fast", s] for s in args.seeds]
    print(f"\nshapes test top-1 over seeds {args.seeds} (zero-shot {zs:.2f}%):")
    print(f"  exact {statistics.mean(ex):.2f}%   fast {statistics.mean(fa):.2f}%   fast - exact {statistics.mean(fa) - statistics.mean(ex):+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())

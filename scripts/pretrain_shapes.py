"""Rebuild the shipped tiny CLIP of the shapes world (latteclip_nb/assets/latte-shapes.safetensors).

Pretrains `latte-shapes` on the source domain (about 15 minutes on one CPU core), resuming from
`<out>.resume.pt` if an earlier run was interrupted, then prints its zero-shot top-1 on fresh source
scenes and on the target shift. Usage: python scripts/pretrain_shapes.py [--out PATH] [--threads N]
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from latteclip_nb import shapes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=shapes.SHAPES_CHECKPOINT, help="safetensors file to write (default: the shipped one)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (others may share the machine)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = shapes.pretrain(a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    import open_clip
    tok = open_clip.get_tokenizer(shapes.SHAPES_MODEL)
    for name, shift in (("source", shapes.SOURCE), ("target", shapes.TARGET)):
        scenes = [shapes.sample_scene(np.random.default_rng([123, i]), shift) for i in range(2000)]
        print(f"{name} zero-shot top-1: {100 * shapes.zero_shot_top1(model, tok, scenes):.1f}%")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

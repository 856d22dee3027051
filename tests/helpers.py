"""What several test files share: a folder of small generated pictures in three colour classes, and a private cache."""
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ["red", "green", "blue"]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220)]


def write_images(folder: Path, n: int, seed: int = 0, labeled: bool = False, names=CLASSES):
    """`n` 40x36 PNGs cycling through the three colours, noisy rows on top; in sub-folders by class when `labeled`."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        y = i % 3
        a = np.zeros((36, 40, 3), np.uint8); a[:] = COLOURS[y]
        a[::4] = rng.integers(0, 255, a[::4].shape, dtype=np.uint8)
        d = folder / names[y] if labeled else folder
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"img_{seed}_{i:03d}.png")


@contextmanager
def private_cache(root: Path):
    """LATTECLIP_CACHE under `root` and one torch thread while the block runs (a module's runs share that cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATTECLIP_CACHE", str(root / "cache"))
        torch.set_num_threads(1)
        yield root

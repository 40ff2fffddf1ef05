"""BEiT-style block masking with an exact count per image (view A only; True = masked).

Blocks of at least `min_block_patches` patches with aspect in [min_aspect, 1/min_aspect] are
placed until fewer than a block's worth of patches remain to be masked; random single patches
then top the mask up to exactly round(ratio * G * G). An exact count keeps every image's
visible-token sequence the same length, so the encoder runs on a dense [B, N_visible, D] tensor.
Patch order is row-major.
"""
from __future__ import annotations

import math

import numpy as np


def num_masked(grid: int, ratio: float) -> int:
    return int(round(ratio * grid * grid))


def block_mask(rng: np.random.Generator, grid: int, ratio: float, min_block_patches: int = 16,
               min_aspect: float = 0.3) -> np.ndarray:
    """bool [grid*grid] with exactly num_masked(grid, ratio) True entries."""
    target = num_masked(grid, ratio)
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    failures = 0
    while target - count >= min_block_patches and failures < 10:
        remaining = target - count
        placed = False
        for _ in range(10):  # a few tries per block, as in BEiT's generator
            area = rng.uniform(min_block_patches, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h * w < min_block_patches or h >= grid or w >= grid:
                continue
            top = int(rng.integers(0, grid - h + 1))
            left = int(rng.integers(0, grid - w + 1))
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= remaining:
                mask[top:top + h, left:left + w] = True
                count += new
                placed = True
                break
        failures = 0 if placed else failures + 1
    flat = mask.reshape(-1)
    if count < target:  # top up with random free patches to the exact count
        free = np.flatnonzero(~flat)
        flat[rng.choice(free, target - count, replace=False)] = True
    return flat

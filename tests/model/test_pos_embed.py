"""Absolute and relative (position + scale) sin-cos embeddings against their definitions."""
import math
import random

import pytest
import torch

from simscale.model.pos_embed import abs_pos_embed_2d, relative_pos_embed, view_b_positions


def test_absolute_layout_is_row_half_first_row_major():
    grid, dim = 5, 16
    pe = abs_pos_embed_2d(grid, dim)
    assert pe.shape == (25, 16) and pe.dtype == torch.float32
    k = dim // 4
    w = torch.tensor([10000 ** (-i / k) for i in range(k)], dtype=torch.float64)
    for idx in (0, 7, 24):
        r, c = divmod(idx, grid)
        want = torch.cat([torch.sin(r * w), torch.cos(r * w), torch.sin(c * w), torch.cos(c * w)])
        torch.testing.assert_close(pe[idx].double(), want, atol=1e-6, rtol=0)


def test_identical_boxes_without_flip_give_absolute_rows_and_unit_scale_blocks():
    grid, dim = 7, 32
    geometry = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.3]] * 2)
    rel = relative_pos_embed(geometry, dim, grid)
    assert rel.shape == (2, grid * grid, 2 * dim)
    torch.testing.assert_close(rel[:, :, :dim], abs_pos_embed_2d(grid, dim).expand(2, -1, -1), atol=1e-6, rtol=0)
    k = dim // 4
    scale = rel[:, :, dim:]
    for block, value in enumerate([0.0, 1.0, 0.0, 1.0]):  # sin(0), cos(0), sin(0), cos(0)
        assert torch.all(scale[..., block * k : (block + 1) * k] == value)


def test_relative_embedding_is_float32_under_autocast():
    geometry = torch.tensor([[0.1, -0.2, 0.8, 1.3, 1.0, 0.9]], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rel = relative_pos_embed(geometry, 16, 4)
    assert rel.dtype == torch.float32


def _random_box(rng, height, width):
    """torchvision RandomResizedCrop.get_params semantics (area .08-1, log-uniform aspect)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return 0, 0, height, width


@pytest.mark.parametrize("seed", range(6))
def test_view_b_patch_centres_match_plain_geometry(seed):
    rng = random.Random(seed)
    height, width, size, grid = rng.randint(100, 400), rng.randint(100, 400), 224, 14
    flip_a, flip_b = rng.random() < 0.5, rng.random() < 0.5
    if seed < 4:  # cover all four flip combinations
        flip_a, flip_b = bool(seed & 1), bool(seed & 2)
    i1, j1, h1, w1 = _random_box(rng, height, width)
    i2, j2, h2, w2 = _random_box(rng, height, width)
    geometry = torch.tensor([[(i2 - i1) / h1, (j2 - j1) / w1, h2 / h1, w2 / w1,
                              float(flip_a ^ flip_b), (width - j1 - j2) / w1]], dtype=torch.float64)
    y, x = view_b_positions(geometry, grid)
    patch = size / grid
    for r in range(grid):
        for c in range(grid):
            # centre of B patch (r, c) in B's resized view -> B's (flipped-or-not) image
            u, v = (c + 0.5) * patch, (r + 0.5) * patch
            xb, yb = j2 + u * w2 / size, i2 + v * h2 / size
            x_src = width - xb if flip_b else xb  # -> source image
            xa = width - x_src if flip_a else x_src  # -> A's (flipped-or-not) image
            col = (xa - j1) / w1 * grid - 0.5  # -> A patch units (patch centres at integers)
            row = (yb - i1) / h1 * grid - 0.5
            idx = r * grid + c
            assert abs(float(x[0, idx]) - col) < 1e-3, (r, c)
            assert abs(float(y[0, idx]) - row) < 1e-3, (r, c)


def test_scale_blocks_use_ten_log_ratio():
    dim, grid = 16, 2
    geometry = torch.tensor([[0.0, 0.0, 0.5, 2.0, 0.0, 0.0]])
    rel = relative_pos_embed(geometry, dim, grid)
    k = dim // 4
    w = torch.tensor([10000 ** (-i / k) for i in range(k)])
    sh, sw = 10 * math.log(0.5), 10 * math.log(2.0)
    torch.testing.assert_close(rel[0, 3, dim : dim + k], torch.sin(sh * w), atol=1e-5, rtol=0)
    torch.testing.assert_close(rel[0, 3, dim + 3 * k :], torch.cos(sw * w), atol=1e-5, rtol=0)

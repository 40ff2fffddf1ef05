"""Two-view crops: torchvision sampler semantics, geometry formula, real pixels in the right place."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

import images
from simscale.data.views import TwoViewCrop, relative_geometry, sample_box


def jpeg_bytes(im, quality=95):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("hw", [(375, 500), (100, 1000), (1000, 100), (300, 300)])
def test_fallback_matches_torchvision(hw):
    # scale > 1 makes every try fail, so both must take the centre-crop fallback.
    h, w = hw
    ours = sample_box(np.random.default_rng(0), h, w, (1.5, 2.0), (3 / 4, 4 / 3))
    ref = RandomResizedCrop.get_params(torch.zeros(3, h, w), [1.5, 2.0], [3 / 4, 4 / 3])
    assert ours == tuple(ref)


def test_box_distribution_matches_torchvision():
    h, w = 375, 500
    rng = np.random.default_rng(1)
    ours = np.array([sample_box(rng, h, w, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)])
    torch.manual_seed(1)
    ref = np.array([RandomResizedCrop.get_params(torch.zeros(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                    for _ in range(3000)])
    for col in range(4):  # means within a few standard errors
        se = ref[:, col].std() / np.sqrt(3000) * np.sqrt(2)
        assert abs(ours[:, col].mean() - ref[:, col].mean()) < 4 * se
    area = ours[:, 2] * ours[:, 3] / (h * w)
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()


def map_point_plainly(y, x, box_a, flip_a, box_b, flip_b, width):
    """A point at fractions (y, x) of view A, followed through explicit flips to view B's fractions."""
    i1, j1, h1, w1 = box_a
    i2, j2, h2, w2 = box_b
    col = j1 + x * w1  # column in A's flipped-or-not image
    col = width - col if flip_a else col  # original image
    col = width - col if flip_b else col  # B's flipped-or-not image
    return (i1 + y * h1 - i2) / h2, (col - j2) / w2


def test_geometry_formula_equals_plain_geometry():
    rng = np.random.default_rng(2)
    for _ in range(200):
        width = int(rng.integers(50, 900))
        height = int(rng.integers(50, 900))
        box_a = sample_box(rng, height, width, (0.08, 1), (3 / 4, 4 / 3))
        box_b = sample_box(rng, height, width, (0.08, 1), (3 / 4, 4 / 3))
        fa, fb = bool(rng.integers(2)), bool(rng.integers(2))
        di, dj, dh, dw, rflip, fdj = relative_geometry(box_a, fa, box_b, fb, width)
        assert rflip == float(fa != fb)
        y, x = rng.random(2)
        yb, xb = map_point_plainly(y, x, box_a, fa, box_b, fb, width)
        # The formula's mapping: y_B = (y - di)/dh; x_B = (x - dj)/dw, or (fdj - x)/dw if flips differ.
        assert np.isclose(yb, (y - di) / dh, atol=1e-5)
        assert np.isclose(xb, ((fdj - x) if rflip else (x - dj)) / dw, atol=1e-5)


def test_views_show_the_same_point_where_geometry_says():
    # A real photo with one bright marker: find it in both rendered views, map A -> B by geometry.
    base = np.asarray(images.variant(3, (640, 480))).copy() // 2
    yy, xx = np.mgrid[:480, :640]
    cy, cx = 230, 350
    base[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 255
    data = jpeg_bytes(Image.fromarray(base))
    crop = TwoViewCrop(size=128, scale=(0.3, 0.6))
    checked = flips = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        box_a, fa, box_b, fb = crop.draw(np.random.default_rng(seed), 480, 640)
        inside = all(b[0] + 8 < cy < b[0] + b[2] - 8 and b[1] + 8 < (640 - cx if f else cx) < b[1] + b[3] - 8
                     for b, f in ((box_a, fa), (box_b, fb)))
        if not inside:
            continue
        va, vb, g = crop(data, rng)
        pa = np.argwhere(va.min(axis=2) > 240).mean(axis=0) + 0.5
        pb = np.argwhere(vb.min(axis=2) > 240).mean(axis=0) + 0.5
        y, x = pa / 128
        di, dj, dh, dw, rflip, fdj = g
        pred = np.array([(y - di) / dh, ((fdj - x) if rflip else (x - dj)) / dw]) * 128
        assert np.abs(pred - pb).max() < 2.5, (seed, pred, pb)
        checked += 1
        flips += int(rflip)
    assert checked >= 5 and 0 < flips < checked


def test_same_view_ablation_and_draft_never_upsamples():
    data = jpeg_bytes(images.variant(4, (2000, 1500)))
    crop = TwoViewCrop(size=64, scale=(0.08, 1.0), same_view=True)
    va, vb, g = crop(data, np.random.default_rng(0))
    assert np.array_equal(va, vb)
    assert np.allclose(g, [0, 0, 1, 1, 0, g[5]])
    # Draft (DCT downscale) output stays close to a full decode + the same crop.
    full = Image.open(io.BytesIO(data)).convert("RGB")
    rng = np.random.default_rng(3)
    crop = TwoViewCrop(size=64, scale=(0.5, 1.0))
    box_a, fa, _, _ = crop.draw(np.random.default_rng(3), 1500, 2000)
    va, _, _ = crop(data, rng)
    i, j, h, w = box_a
    left = 2000 - j - w if fa else j
    ref = np.asarray(full.resize((64, 64), Image.Resampling.BICUBIC, box=(left, i, left + w, i + h)))
    ref = ref[:, ::-1] if fa else ref
    assert va.shape == (64, 64, 3) and va.dtype == np.uint8
    assert np.abs(va.astype(int) - ref.astype(int)).mean() < 4

"""Block masks: exact count, real blocks, determinism."""
import numpy as np
from scipy import ndimage

from simscale.data.masking import block_mask, num_masked


def test_exact_count_at_224_16_and_tiny():
    assert num_masked(14, 0.6) == 118
    for seed in range(300):
        m = block_mask(np.random.default_rng(seed), 14, 0.6, 16, 0.3)
        assert m.shape == (196,) and m.dtype == bool and m.sum() == 118
        t = block_mask(np.random.default_rng(seed), 4, 0.6, 4, 0.3)
        assert t.sum() == 10


def test_masks_are_blocky_not_random():
    # Blocks make few connected regions; the same count of random patches makes many.
    rng = np.random.default_rng(0)
    for ratio in (0.4, 0.6):
        k = num_masked(14, ratio)
        blocks = [ndimage.label(block_mask(rng, 14, ratio).reshape(14, 14))[1] for _ in range(200)]
        scattered = []
        for _ in range(200):
            m = np.zeros(196, bool)
            m[rng.choice(196, k, replace=False)] = True
            scattered.append(ndimage.label(m.reshape(14, 14))[1])
        assert np.mean(blocks) < 0.7 * np.mean(scattered)


def test_same_generator_state_gives_same_mask():
    a = block_mask(np.random.default_rng(5), 14, 0.6)
    assert np.array_equal(a, block_mask(np.random.default_rng(5), 14, 0.6))
    assert not np.array_equal(a, block_mask(np.random.default_rng(6), 14, 0.6))


def test_blocks_respect_min_size_when_small_ratio():
    # With a low ratio the mask is (almost) only blocks: each component >= min_block_patches.
    rng = np.random.default_rng(1)
    for _ in range(100):
        m = block_mask(rng, 14, 0.2, 16, 0.3).reshape(14, 14)
        labels, n = ndimage.label(m)
        sizes = np.bincount(labels.ravel())[1:]
        assert m.sum() == round(0.2 * 196)
        assert sizes.max() >= 16

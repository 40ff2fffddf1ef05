"""Logistic-regression probe on frozen features."""
import torch

from simscale.eval.linear import fit_linear, linear_top1


def linearly_separable(n: int, dim: int, classes: int, seed: int):
    """Labels from a random linear map, a margin enforced by dropping ambiguous points."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=g)
    x = torch.randn(n * 4, dim, generator=g) * 3 + 7  # offset/scale: the probe standardises
    scores = x @ w
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 1.0
    return x[keep][:n], scores[keep][:n].argmax(1)


def test_separable_data_is_fit_almost_perfectly():
    x, y = linearly_separable(1200, 20, 5, seed=0)
    top1 = linear_top1(x[:800], y[:800], x[800:], y[800:], weight_decay=1e-4)
    assert top1 > 0.95


def test_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 16, generator=g)
    y = torch.randint(0, 4, (1000,), generator=g)
    assert linear_top1(x[:500], y[:500], x[500:], y[500:]) < 0.35


def test_strong_weight_decay_shrinks_the_probe():
    x, y = linearly_separable(400, 10, 3, seed=1)
    weak = fit_linear(x, y, weight_decay=1e-4)(x)
    strong = fit_linear(x, y, weight_decay=10.0)(x)
    assert strong.abs().max() < weak.abs().max()

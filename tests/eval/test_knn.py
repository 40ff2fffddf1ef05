"""Weighted k-NN: known structure, and agreement with a brute-force float64 reference."""
import math

import pytest
import torch

from simscale.errors import DataError
from simscale.eval.knn import knn_predict, knn_top1


def clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 5
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def reference_predict(train_f, train_y, val_f, k, temperature, num_classes):
    """Loop-per-sample float64 DINO vote, written independently of the batched version."""
    preds = []
    tf = [[float(v) for v in row] for row in train_f.double()]
    tn = [math.sqrt(sum(v * v for v in row)) for row in tf]
    for row in val_f.double():
        q = [float(v) for v in row]
        qn = math.sqrt(sum(v * v for v in q))
        sims = [sum(a * b for a, b in zip(q, t)) / (qn * n) for t, n in zip(tf, tn)]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


def test_separated_clusters_are_classified_perfectly():
    tf, ty = clusters(50, 5, 16, spread=0.3, seed=0)
    vf, vy = clusters(20, 5, 16, spread=0.3, seed=0)
    assert knn_top1(tf, ty, vf, vy, k=20, temperature=0.07) == 1.0


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(1)
    tf, vf = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    ty, vy = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    assert 0.06 < knn_top1(tf, ty, vf, vy) < 0.14


@pytest.mark.parametrize("k,temperature,batch", [(20, 0.07, 7), (5, 0.5, 1000), (1, 0.07, 3), (300, 0.07, 16)])
def test_batched_predictions_equal_float64_reference(k, temperature, batch):
    g = torch.Generator().manual_seed(k)
    tf, vf = torch.randn(120, 8, generator=g), torch.randn(40, 8, generator=g)
    ty = torch.randint(0, 4, (120,), generator=g)
    got = knn_predict(tf, ty, vf, k=k, temperature=temperature, num_classes=4, batch_size=batch)
    want = reference_predict(tf, ty, vf, min(k, 120), temperature, 4)
    assert torch.equal(got, want)


def test_scale_of_features_does_not_matter():
    tf, ty = clusters(30, 3, 8, spread=2.0, seed=2)
    vf, _ = clusters(10, 3, 8, spread=2.0, seed=3)
    scale = torch.rand(len(tf), 1) * 100 + 0.01  # cosine similarity: row norms are irrelevant
    assert torch.equal(knn_predict(tf, ty, vf), knn_predict(tf * scale, ty, vf * 3))


def test_bad_inputs_are_user_errors():
    with pytest.raises(DataError):
        knn_predict(torch.zeros(0, 4), torch.zeros(0), torch.ones(2, 4))
    with pytest.raises(DataError, match="widths"):
        knn_predict(torch.ones(3, 4), torch.zeros(3), torch.ones(2, 5))

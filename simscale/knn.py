"""Weighted k-NN top-1 on frozen features (the DINO protocol: k=20, T=0.07, cosine similarity).

Each validation sample votes over its k most similar training samples, each neighbour adding
exp(sim / T) to its class; the class with the largest sum wins (ties: the lowest class index).
Validation is processed in batches, so memory is O(batch x N_train), never N_val x N_train.
Pure torch, below train/ and eval/: the trainer's online monitor and `simscale eval knn` share it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simscale.errors import DataError


@torch.no_grad()
def knn_predict(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Predicted class per row of `val_f` ([N_val] int64)."""
    if len(train_f) == 0 or len(val_f) == 0:
        raise DataError("k-NN needs at least one training and one validation sample")
    if train_f.shape[1] != val_f.shape[1]:
        raise DataError(f"feature widths differ: train {train_f.shape[1]} vs val {val_f.shape[1]}")
    if k < 1 or temperature <= 0:
        raise DataError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train_f = F.normalize(train_f.float(), dim=1)
    train_y = train_y.long().to(train_f.device)
    num_classes = num_classes or int(train_y.max()) + 1
    k = min(k, len(train_f))
    preds = []
    for start in range(0, len(val_f), batch_size):
        batch = F.normalize(val_f[start:start + batch_size].float().to(train_f.device), dim=1)
        sim, idx = (batch @ train_f.T).topk(k, dim=1)  # [b, k]
        votes = torch.zeros(len(batch), num_classes, device=train_f.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1).cpu())
    return torch.cat(preds)


def knn_top1(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of the weighted k-NN classifier."""
    preds = knn_predict(train_f, train_y, val_f, k, temperature, num_classes, batch_size)
    return (preds == val_y.long().cpu()).float().mean().item()

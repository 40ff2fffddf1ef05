"""UniGrad loss of SIM, dense (release) and global + dense (paper variant), in float32.

For prediction rows p and target rows t of width D, M rows on this rank:
    C = (1/M) sum t t^T            all-reduced (mean over ranks), no gradient
    L = [ (1/M) sum ||p - t||^2 + lam (1/M) sum p^T C p ] / D
Only the D x D matrix crosses ranks, once per step (both C's packed into one all-reduce when
both terms are on). Without an initialised process group (or world size 1) no collective runs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from simscale.config import LossConfig


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def second_moments(targets: list[Tensor]) -> list[Tensor]:
    """C = mean over rows of t t^T for each [M, D] target, averaged over ranks in one collective."""
    with torch.no_grad():
        mats = [t.T @ t / t.shape[0] for t in targets]
        world = _world_size()
        if world > 1:
            packed = torch.stack(mats) if len(mats) > 1 else mats[0].unsqueeze(0)
            dist.all_reduce(packed)
            mats = list((packed / world).unbind(0))
    return mats


def unigrad_term(p: Tensor, t: Tensor, c: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """p, t [M, D] float32, c [D, D] -> (L, align, uniform) with L = (align + lam*uniform) / D."""
    d = p.shape[1]
    align = (p - t).pow(2).sum(1).mean()
    uniform = ((p @ c) * p).sum(1).mean()
    return (align + lam * uniform) / d, align.detach() / d, uniform.detach() / d


def unigrad_loss(pred: Tensor, target: Tensor, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """pred, target [B, N, D] (target without gradient) -> (loss, stats of detached tensors)."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p = pred.float()
        t = target.detach().float()
        b, n, d = p.shape
        terms: dict[str, tuple[Tensor, Tensor, float]] = {}
        if cfg.a_global:
            terms["global"] = (p.mean(1), t.mean(1), cfg.a_global)
        if cfg.a_dense:
            pd, td = p, t
            if cfg.center_dense:
                pd, td = p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
            terms["dense"] = (pd.reshape(b * n, d), td.reshape(b * n, d), cfg.a_dense)
        if not terms:
            raise ValueError("UniGrad needs loss.a_global or loss.a_dense to be non-zero")
        mats = second_moments([t_ for _, t_, _ in terms.values()])
        loss = p.new_zeros(())
        stats: dict[str, Tensor] = {}
        for (name, (p_, t_, weight)), c in zip(terms.items(), mats):
            value, align, uniform = unigrad_term(p_, t_, c, cfg.lam)
            loss = loss + weight * value
            stats[f"loss_{name}"] = value.detach()
            stats[f"align_{name}"] = align
            stats[f"uniform_{name}"] = uniform
        stats["loss"] = loss.detach()
        stats["target_std"] = t.std(dim=(0, 1)).mean().detach() if b * n > 1 else t.new_zeros(())
    return loss, stats

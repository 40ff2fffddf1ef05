"""The one place that knows DeepSpeed ZeRO's parameter internals.

ZeRO-3 leaves a partitioned parameter's `.data` empty between forwards: the rank owns only
`ds_tensor` (its flat slice, padded), the full shape is `ds_shape`, small parameters may stay
gathered on every rank (`ds_persist`), and the optimizer's fp32 copy of the slice comes from
`safe_get_local_fp32_param`. ZeRO-0/1/2 keep whole parameters everywhere, so each helper here
degrades to the plain tensor. Everything else (EMA, optimizer groups, model init) asks here, and
deepspeed is imported only when a parameter really is partitioned (the model package stays free
of it).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (built under `deepspeed.zero.Init`)."""
    return getattr(p, "ds_tensor", None) is not None


def full_shape(p: torch.Tensor) -> torch.Size:
    """The parameter's logical shape (ZeRO-3 partitioned params look empty/1-D otherwise)."""
    return getattr(p, "ds_shape", None) or p.shape


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def local_slice(p: torch.Tensor) -> torch.Tensor:
    """The flat part of `p` this rank owns: the ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if is_partitioned(p) else p.data.view(-1)


def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = 0):
    """Context with full parameters (for in-place init/copy); a no-op unless ZeRO-3 partitioned them.
    With `modifier_rank`, that rank's in-place changes are broadcast and re-partitioned on exit."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def fp32_source(p: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A callable giving `p`'s local slice at the best precision available.

    Under ZeRO-3 the optimizer's fp32 partition (exact even for a bf16 engine; a view, no copy).
    Frozen parameters (the patch embedding) have no optimizer copy; their compute-dtype slice is
    exact because they never change. ZeRO-1/2: the module's whole tensor.
    """
    if is_partitioned(p) and p.requires_grad:
        from deepspeed.utils import safe_get_local_fp32_param

        try:
            safe_get_local_fp32_param(p)
            return lambda: safe_get_local_fp32_param(p)
        except (AttributeError, AssertionError, KeyError):
            pass
    return lambda: local_slice(p)


class PersistentRefresh:
    """Re-gathers ZeRO-3 'persistent' parameters after their slices changed.

    ZeRO-3 keeps small parameters (below `stage3_param_persistence_threshold`) gathered on every
    rank; writing only `ds_tensor` leaves that full copy stale. All of them travel in ONE
    all-gather of a flat buffer (allocated once), not one collective per parameter.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = [p for p in params if is_partitioned(p) and getattr(p, "ds_persist", False)]
        if not self.params:
            return
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        sizes = [p.ds_tensor.numel() for p in self.params]
        first = self.params[0].ds_tensor
        self.send = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
        self.recv = torch.empty(self.world * self.send.numel(), dtype=first.dtype, device=first.device)
        self.send_views = list(torch.split(self.send, sizes))

    @torch.no_grad()
    def __call__(self) -> None:
        if not self.params:
            return
        torch._foreach_copy_(self.send_views, [p.ds_tensor for p in self.params])
        if self.world > 1:
            dist.all_gather_into_tensor(self.recv, self.send)
        else:
            self.recv.copy_(self.send)
        per_rank = self.recv.view(self.world, -1)
        start = 0
        for p, view in zip(self.params, self.send_views):
            part = per_rank[:, start:start + view.numel()].reshape(-1)  # rank-major: the full flat tensor
            start += view.numel()
            if p.data.numel() == p.ds_numel:  # gathered now (persistent); otherwise nothing to refresh
                p.data.copy_(part[: p.ds_numel].view_as(p.data))

"""The EMA target, updated shard by shard with an fp32 master, on every ZeRO stage.

Why not just `t.mul_(m).add_(o, alpha=1-m)` on the module:
- under ZeRO-3 a parameter's `.data` is empty between forwards; the rank owns only `ds_tensor`
  (its flat slice). Gathering the whole target to update it would cost a full all-gather per
  step, so each rank updates its own slice: online and target have the same shapes, hence the
  same partition layout, slice for slice.
- under bf16 an EMA at m ~ 0.999 computed in bf16 stops moving (the increment is below bf16
  resolution). The master copy here is fp32; the module keeps a compute-dtype copy for the
  target's forward.
ZeRO-1/2 keep whole parameters on every rank, so the "local slice" is the whole tensor and the
same loop applies (every rank computes the same update).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from simscale.errors import CheckpointError


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return getattr(p, "ds_tensor", None) is not None


def local_slice(p: torch.nn.Parameter) -> torch.Tensor:
    """The flat part of `p` this rank owns: the ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if _is_zero3(p) else p.data.view(-1)


def _fp32_source(p: torch.nn.Parameter):
    """A callable giving the online weights' local slice at the best precision available.

    Under ZeRO-3, DeepSpeed exposes the optimizer's fp32 partition (exact even for a bf16
    engine). Frozen online parameters (the patch embedding) have no optimizer copy; their
    compute-dtype slice is exact because they never change.
    """
    if _is_zero3(p) and p.requires_grad:
        from deepspeed.utils import safe_get_local_fp32_param

        try:
            safe_get_local_fp32_param(p)
            return lambda: safe_get_local_fp32_param(p)
        except (AttributeError, AssertionError, KeyError):
            pass
    return lambda: local_slice(p)


class ShardedEMA:
    """theta_t <- m theta_t + (1 - m) theta_o over matching (online, target) parameter slices."""

    def __init__(self, pairs: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]):
        self.names = [n for n, _, _ in pairs]
        self.online = [o for _, o, _ in pairs]
        self.target = [t for _, _, t in pairs]
        for name, o, t in pairs:
            if o.shape != t.shape and getattr(o, "ds_shape", None) != getattr(t, "ds_shape", None):
                raise ValueError(f"EMA pair '{name}' has mismatched shapes")
        self.sources = [_fp32_source(o) for o in self.online]
        self.zero3 = bool(self.target) and _is_zero3(self.target[0])
        # Targets start as exact copies of the online weights (slice by slice under ZeRO-3). When
        # the target itself is stored in fp32, its own storage is the master (no second copy).
        self.master = []
        with torch.no_grad():
            for src, t in zip(self.sources, self.target):
                init = src().detach().to(torch.float32)
                local = local_slice(t)
                if local.dtype == torch.float32:
                    local.copy_(init)
                    self.master.append(local)
                else:
                    self.master.append(init.clone())
        self._write_targets()

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        if not self.master:
            return
        online = [src().to(self.master[0].device, torch.float32) for src in self.sources]
        torch._foreach_mul_(self.master, momentum)
        torch._foreach_add_(self.master, online, alpha=1.0 - momentum)
        self._write_targets()

    @torch.no_grad()
    def _write_targets(self) -> None:
        for t, m in zip(self.target, self.master):
            local = local_slice(t)
            if local.data_ptr() != m.data_ptr():
                local.copy_(m)
        self._refresh_persistent()

    def _refresh_persistent(self) -> None:
        """ZeRO-3 keeps small 'persistent' params gathered on every rank: refresh their full copy."""
        if not self.zero3:
            return
        world = dist.get_world_size()
        for t in self.target:
            if getattr(t, "ds_persist", False) and t.data.numel() == t.ds_numel:
                parts = [torch.empty_like(t.ds_tensor) for _ in range(world)]
                dist.all_gather(parts, t.ds_tensor)
                t.data.copy_(torch.cat(parts)[: t.ds_numel].view_as(t.data))

    # -- checkpointing: each rank saves and restores its own fp32 slices ---------------------------
    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "layout": "zero3_partition" if self.zero3 else "full",
            "numel": [int(getattr(t, "ds_numel", t.numel())) for t in self.target],
            "shapes": [list(getattr(t, "ds_shape", t.shape)) for t in self.target],
            "master": [m.detach().cpu().clone() for m in self.master],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or [m.numel() for m in state["master"]] != [m.numel() for m in self.master]:
            raise CheckpointError(
                "EMA state in the checkpoint does not match this model's target parameters: "
                "resume with the same model.* settings and world size"
            )
        for m, saved in zip(self.master, state["master"]):
            m.copy_(saved.to(m.device))
        self._write_targets()


def consolidate(states: list[dict]) -> dict[str, torch.Tensor]:
    """Full fp32 target tensors from the per-rank EMA states (any world size, no GPU needed)."""
    first = states[0]
    out = {}
    for i, name in enumerate(first["names"]):
        if first["layout"] == "full":
            flat = first["master"][i]
        else:
            flat = torch.cat([s["master"][i] for s in states])
        out[name] = flat[: first["numel"][i]].view(first["shapes"][i]).clone()
    return out

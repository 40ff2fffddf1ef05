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

from simscale.errors import CheckpointError
from simscale.zero import PersistentRefresh, fp32_source, full_numel, full_shape, is_partitioned, local_slice


class ShardedEMA:
    """theta_t <- m theta_t + (1 - m) theta_o over matching (online, target) parameter slices.

    The fp32 master is a list of views: of the target's own storage when the target is fp32
    (no second copy), else of ONE flat fp32 buffer per rank. An update is one fused
    `_foreach_lerp_` over every fp32 source and, for a low-precision target, one `_foreach_copy_`
    into the engine's partition. Online weights in a lower precision (a bf16 ZeRO-1/2 engine; the
    frozen patch embedding under bf16 ZeRO-3) are cast through one reused fp32 scratch buffer of
    bounded size (`SCRATCH` elements, or the largest such parameter), a group of parameters at a
    time: mixed-dtype arithmetic on CPU would allocate a full-size fp32 temporary per parameter.
    """

    SCRATCH = 1 << 22  # 16 MB of fp32

    def __init__(self, pairs: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]):
        self.names = [n for n, _, _ in pairs]
        self.online = [o for _, o, _ in pairs]
        self.target = [t for _, _, t in pairs]
        for name, o, t in pairs:
            if full_shape(o) != full_shape(t):
                raise ValueError(f"EMA pair '{name}' has mismatched shapes")
        self.sources = [fp32_source(o) for o in self.online]
        self.zero3 = bool(self.target) and is_partitioned(self.target[0])
        self.refresh = PersistentRefresh(self.target)
        self.locals = [local_slice(t) for t in self.target]
        # Targets start as exact copies of the online weights (slice by slice under ZeRO-3).
        self.own_storage = bool(self.locals) and all(t.dtype == torch.float32 for t in self.locals)
        if self.own_storage or not self.locals:
            self.master = list(self.locals)
            self.flat = None
        else:
            sizes = [t.numel() for t in self.locals]
            self.flat = torch.empty(sum(sizes), dtype=torch.float32, device=self.locals[0].device)
            self.master = list(torch.split(self.flat, sizes))
        with torch.no_grad():
            if self.master:
                torch._foreach_copy_(self.master, [src() for src in self.sources])
        self._plan_casts()
        self._write_targets()

    def _plan_casts(self) -> None:
        """Groups of low-precision sources that fit the scratch buffer together (fixed at init:
        sources keep their dtype and size)."""
        low = [i for i, src in enumerate(self.sources) if src().dtype != torch.float32]
        self.exact = [i for i in range(len(self.sources)) if i not in set(low)]
        self.cast_groups: list[list[int]] = []
        self.scratch = None
        if not low:
            return
        sizes = {i: self.master[i].numel() for i in low}
        cap = max(self.SCRATCH, max(sizes.values()))
        group, used = [], 0
        for i in low:
            if used + sizes[i] > cap:
                self.cast_groups.append(group)
                group, used = [], 0
            group.append(i)
            used += sizes[i]
        self.cast_groups.append(group)
        self.scratch = torch.empty(min(cap, sum(sizes.values())), dtype=torch.float32, device=self.master[0].device)

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        if not self.master:
            return
        online = [src() for src in self.sources]
        weight = 1.0 - momentum
        if not self.cast_groups:
            torch._foreach_lerp_(self.master, online, weight)
        else:
            if self.exact:
                torch._foreach_lerp_([self.master[i] for i in self.exact], [online[i] for i in self.exact], weight)
            for group in self.cast_groups:
                views = list(torch.split(self.scratch[: sum(self.master[i].numel() for i in group)],
                                         [self.master[i].numel() for i in group]))
                torch._foreach_copy_(views, [online[i] for i in group])
                torch._foreach_lerp_([self.master[i] for i in group], views, weight)
        self._write_targets()

    @torch.no_grad()
    def _write_targets(self) -> None:
        if self.master and not self.own_storage:
            torch._foreach_copy_(self.locals, self.master)
        if self.zero3:
            self.refresh()

    # -- checkpointing: each rank saves and restores its own fp32 slices ---------------------------
    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "layout": "zero3_partition" if self.zero3 else "full",
            "numel": [full_numel(t) for t in self.target],
            "shapes": [list(full_shape(t)) for t in self.target],
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

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor], rank: int) -> None:
        """Re-partition consolidated fp32 target tensors (any world size wrote them) for this rank:
        the whole tensor under ZeRO-1/2; under ZeRO-3 ZeRO's own split, rank r owning elements
        [r*n, (r+1)*n) of the flat tensor zero-padded to world*n, n this rank's slice length."""
        if sorted(full) != sorted(self.names) or any(full_numel(t) != full[n].numel()
                                                     for n, t in zip(self.names, self.target)):
            raise CheckpointError("EMA target in the checkpoint does not match this model's target parameters: "
                                  "resume with the same model.* settings")
        for name, m in zip(self.names, self.master):
            flat = full[name].reshape(-1).to(torch.float32)
            start = rank * m.numel() if self.zero3 else 0
            part = flat[start:start + m.numel()]
            m.zero_()  # ZeRO-3 padding past the tensor's end stays zero, as DeepSpeed pads it
            m[: part.numel()].copy_(part.to(m.device))
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

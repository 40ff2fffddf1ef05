"""Frozen parameters (in no optimizer: the online patch embedding) across a change of world size.

DeepSpeed's universal checkpoint carries what an optimizer owns, so its load leaves frozen
parameters at their init: wrong for any run whose frozen weights are not its seeded init (an
`simscale import` of the official weights). Every DeepSpeed checkpoint still holds them, in its
model-states files: as `frozen_param_fragments` (ZeRO-2: whole tensors; ZeRO-3: each rank's flat
slice, padded) or, without those (ZeRO-0/1), whole in the module state beside the optimized
parameters and buffers. `read` joins them once, when the checkpoint is converted; `restore` puts
them into an engine of any world size (gathered and re-partitioned under ZeRO-3), and refuses in
one line a set of names or shapes that is not the engine's: never a silent reset to the init.
The EMA target is frozen too, but simscale's fp32 EMA state restores it: `ema_names` leaves it out.
"""
from __future__ import annotations

from pathlib import Path

import torch

from simscale.errors import CheckpointError
from simscale.zero import full_shape, gathered


def ema_names(names) -> set[str]:
    """Module names of the EMA target's parameters (SIM.target), given the EMA's branch-relative names."""
    return {f"target.{n}" for n in names}


def read(tag_dir: Path, skip: set[str]) -> dict[str, torch.Tensor]:
    """{module name: whole tensor} of the frozen parameters in `tag_dir`'s model states, but `skip`."""
    from deepspeed.checkpoint.constants import BUFFER_NAMES, FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES, PARAM_SHAPES
    from deepspeed.utils.zero_to_fp32 import get_model_state_files

    from simscale.train.weights_only import weights_only_loads

    shapes: dict[str, torch.Size] = {}
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in get_model_state_files(str(tag_dir)):  # in rank order, as zero_to_fp32 joins them
        with weights_only_loads():
            state = torch.load(f, map_location="cpu")
        if state.get(FROZEN_PARAM_SHAPES) is None:  # ZeRO-0/1: one whole module state
            optimized = {n for group in state[PARAM_SHAPES] for n in group}
            others = optimized | set(state[BUFFER_NAMES]) | skip
            return {n: v for n, v in state["module"].items() if n not in others}
        shapes = {n: torch.Size(s) for n, s in state[FROZEN_PARAM_SHAPES].items() if n not in skip}
        for n in shapes:
            pieces.setdefault(n, []).append(state[FROZEN_PARAM_FRAGMENTS][n].reshape(-1))
        del state
    out = {}
    for n, shape in shapes.items():  # ZeRO-3: the ranks' slices end to end, padding cut (ZeRO-2: one whole)
        flat = torch.cat(pieces[n])
        if flat.numel() < shape.numel():
            raise CheckpointError(f"frozen parameter '{n}' in '{tag_dir}' has {flat.numel()} of its "
                                  f"{shape.numel()} values: resume from another checkpoint")
        out[n] = flat[:shape.numel()].view(shape).clone()
    return out


def restore(module: torch.nn.Module, tensors: dict[str, torch.Tensor], skip: set[str], where: Path) -> None:
    """Copy `tensors` (from `read`) into `module`'s frozen parameters but `skip`: exactly those, same shapes."""
    own = {n: p for n, p in module.named_parameters() if not p.requires_grad and n not in skip}
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [n for n in own if n in tensors and tuple(full_shape(own[n])) != tuple(tensors[n].shape)]
    if missing or extra or wrong:
        what = (f"lacks the frozen parameter '{missing[0]}'" if missing else
                f"holds a frozen parameter '{extra[0]}' the model does not have" if extra else
                f"holds '{wrong[0]}' with shape {list(tensors[wrong[0]].shape)}, the model "
                f"{list(full_shape(own[wrong[0]]))}")
        raise CheckpointError(f"universal checkpoint '{where}' {what}: delete it to convert again from its "
                              "source, or resume on the number of ranks that wrote the checkpoint")
    with torch.no_grad(), gathered(list(own.values()), modifier_rank=0):  # rank 0's copy is re-partitioned
        for n, p in own.items():
            p.data.copy_(tensors[n].to(p.dtype))

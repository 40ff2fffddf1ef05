"""Every torch.load DeepSpeed does for us runs with weights_only=True: a checkpoint cannot run code.

DeepSpeed 0.19.8 calls `torch.load(..., weights_only=False)` in its checkpoint engine
(`runtime/checkpoint_engine/torch_checkpoint_engine.py`), in `zero_to_fp32.py` (model and optim
states) and in a few optimizer paths; none of them takes a flag. Inside `weights_only_loads()`
`torch.load` itself is replaced, so every one of those calls goes through torch's restricted
unpickler, which builds tensors, containers and primitives and, beyond those, only the classes
listed here. The list is exactly what DeepSpeed's ZeRO-1/2/3 fp32/bf16 checkpoints hold
(found with `torch.serialization.get_unsafe_globals_in_checkpoint` on real files): plain data
classes and an enum whose unpickling sets attributes and calls no method of theirs.
"""
from __future__ import annotations

import contextlib
import io
import pickle
from typing import Callable, Iterator

import torch

from simscale.errors import CheckpointError


def deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: torch.load ignores weights_only=False and refuses any non-allow-listed global."""
    original = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):  # noqa: ARG001
        try:
            return original(f, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            lines = str(exc).strip().splitlines()
            what = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
            raise CheckpointError(f"'{f}' holds more than tensors and plain data ({what[:160]}); it was refused "
                                  "unread, nothing in it ran: use a checkpoint written by simscale") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


@contextlib.contextmanager
def loading_through_deepspeed(problem: Callable[[BaseException], str], quiet: bool = False) -> Iterator[None]:
    """The one way simscale lets DeepSpeed read a checkpoint: under `weights_only_loads`, and any
    exception DeepSpeed raises (whatever a hostile or damaged file makes it raise) becomes one
    CheckpointError line, `problem(exc)`. `quiet`: its stdout/stderr chatter is swallowed."""
    try:
        with contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            stack.enter_context(weights_only_loads())
            yield
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring: named, never a trace
        raise CheckpointError(problem(exc)) from None

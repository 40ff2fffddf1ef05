"""The training loop's own state (besides DeepSpeed's files): what a checkpoint keeps per rank."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simscale.errors import SimscaleError


@dataclass
class LoopState:
    """Everything besides DeepSpeed's own files that a resume needs, per rank."""
    step: int = 0  # optimizer steps attempted (applied or skipped)
    epoch: int = 0
    samples_in_epoch: int = 0  # data position: samples of `epoch`'s global order consumed (any world size)
    ema_pending: bool = False  # online weights moved since the last EMA update
    skipped: int = 0
    nonfinite_streak: int = 0
    losses: list[float] = field(default_factory=list)  # the last 1000 per-step mean losses
    rollbacks: int = 0  # loss-spike rollbacks so far (healing.py)

    def rng(self) -> dict[str, Any]:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def loop_state_from(loop: dict[str, Any], tag_dir: Path) -> LoopState:
    """A checkpoint's saved loop state (unknown keys dropped, types checked), or one line."""
    defaults = dataclasses.asdict(LoopState())
    loop = {k: v for k, v in loop.items() if k in defaults}
    wrong = [k for k, v in loop.items() if type(v) is not type(defaults[k]) and
             not (isinstance(defaults[k], float) and isinstance(v, int))]
    if wrong:
        raise SimscaleError(f"loop state in '{tag_dir}' has a wrong type for '{wrong[0]}': "
                            "resume from another checkpoint")
    return LoopState(**loop)


def restore_rng(states: dict[str, Any], tag_dir: Path) -> None:
    """`set_rng` of a checkpoint's saved generators, or one line when they are malformed."""
    try:
        set_rng(states)
    except (ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise SimscaleError(f"RNG state in '{tag_dir}' is malformed ({type(exc).__name__}): "
                            "resume from another checkpoint") from None

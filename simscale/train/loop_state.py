"""The training loop's own state (besides DeepSpeed's files): what a checkpoint keeps per rank."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


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

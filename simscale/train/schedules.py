"""Learning rate, weight decay and EMA momentum as pure functions of the global step.

Pure functions (not stateful schedulers) so that any step is recomputed exactly after a resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from simscale.config import Config


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int
    lr: float
    min_lr: float
    wd: float
    wd_end: float
    m0: float
    m_end: float
    steps_per_epoch: int = 0  # what epochs-based keys were resolved with

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int) -> "Schedule":
        o = cfg.optim
        total = o.max_steps if o.max_steps > 0 else int(round(o.epochs * steps_per_epoch))
        warm = o.warmup_steps if o.warmup_steps >= 0 else int(round(o.warmup_epochs * steps_per_epoch))
        if o.lr <= 0:
            raise ValueError("optim.lr must be resolved (config.resolve_lr) before building the schedule")
        return cls(max(total, 1), min(warm, max(total, 1)), o.lr, o.min_lr, o.weight_decay,
                   o.weight_decay_end, cfg.ema.momentum, cfg.ema.momentum_end, steps_per_epoch)

    def _cos(self, start: float, end: float, t: float) -> float:
        """Cosine from start (t=0) to end (t=1)."""
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        return self._cos(self.lr, self.min_lr, (step - self.warmup_steps) / span)

    def wd_at(self, step: int) -> float:
        return self._cos(self.wd, self.wd_end, step / self.total_steps)

    def momentum_at(self, step: int) -> float:
        # METHOD.md: m(t) = 1 - (1 - m0)(1 + cos(pi t / T)) / 2, generalised to any end value.
        return self._cos(self.m0, self.m_end, step / self.total_steps)

"""Loss-spike rollback (`run.spike`), after PaLM (Chowdhery et al. 2022, sec. 5.1): when the loss
spikes, restart from a checkpoint before the spike and skip the batches that led to it.

`SpikeDetector` sees every per-step mean loss once, in step order, as the loop reads them (at
logging steps and before every save, so no checkpoint is written over an undetected spike and the
step itself adds no device sync). A loss is bad when it is not finite or exceeds `factor` x the
running median of the last `window` good losses (`median + (factor - 1) x |median|`, the same for a
positive median and meaningful for a negative one). `steps` bad losses in a row trigger.

`rollback` then reloads the newest complete checkpoint written before the first bad step (same
world size, in place: weights, Adam state, EMA target, loop state, RNG) and moves the data position
to where the spike was detected, so the window read since that checkpoint is skipped. The step
counter goes back with the checkpoint (the schedules replay), the data goes forward.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path
from typing import Any

from simscale.errors import SimscaleError


class SpikeDetector:
    def __init__(self, cfg):
        self.cfg = cfg
        self.good: deque[float] = deque(maxlen=cfg.window)
        self.first_bad: int | None = None  # step of the first loss of the current bad run
        self.bad_run = 0
        self.why = ""

    def see(self, step: int, loss: float) -> bool:
        """Feed step `step`'s loss (1-based, as logged); True when a rollback is due."""
        if not self.cfg.enabled:
            return False
        bad, why = False, ""
        if not math.isfinite(loss):
            bad, why = True, f"loss {loss}"
        elif len(self.good) >= self.cfg.min_history:
            med = statistics.median(self.good)
            limit = med + (self.cfg.factor - 1) * abs(med)
            if loss > limit:
                bad, why = True, f"loss {loss:.4g} > {self.cfg.factor:g} x running median {med:.4g}"
        if not bad:
            self.good.append(loss)
            self.bad_run, self.first_bad = 0, None
            return False
        if self.bad_run == 0:
            self.first_bad, self.why = step, why
        self.bad_run += 1
        return self.bad_run >= self.cfg.steps

    def reset(self) -> None:
        self.bad_run, self.first_bad = 0, None


def rollback_target(ckpt, first_bad: int) -> Path | None:
    """The newest complete checkpoint from before the first bad step (the same on every rank:
    complete_tags reads the shared run directory; a disagreement would fail the load's checks)."""
    good = [p for p in ckpt.complete_tags() if int(p.name.split("_")[1]) < first_bad]
    return good[-1] if good else None


def rollback(trainer, tag_dir: Path) -> dict[str, Any]:
    """Reload `tag_dir` into the running trainer, keep the data position it had reached; returns the
    skipped range as {from: [epoch, sample], to: [epoch, sample]} in the epochs' global sample order."""
    from simscale.train.loop_state import loop_state_from, restore_rng

    reached = (trainer.state.epoch, trainer.state.samples_in_epoch)
    rollbacks = trainer.state.rollbacks
    saved = trainer.ckpt.load(trainer.engine, tag_dir)
    trainer.ema.load_state_dict(saved["ema"])
    trainer.state = loop_state_from(saved["loop"], tag_dir)
    restore_rng(saved["rng"], tag_dir)
    skipped = {"from": [trainer.state.epoch, trainer.state.samples_in_epoch], "to": list(reached)}
    trainer.state.epoch, trainer.state.samples_in_epoch = reached
    trainer.state.rollbacks = rollbacks + 1
    trainer._unread.clear()
    return skipped


def too_many(cfg, rollbacks: int, step: int, why: str) -> SimscaleError:
    return SimscaleError(f"loss spike at step {step} ({why}) after {rollbacks} rollback(s) "
                         f"(run.spike.max_rollbacks={cfg.max_rollbacks}): lower optim.base_lr, check the data, "
                         "or raise run.spike.max_rollbacks")

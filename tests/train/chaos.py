"""Test-only faults for the self-healing tests, read from environment variables by this module
alone. Start it in place of `simscale` (`python -m tests.train.chaos train ...`, or
`ENTRY=tests.train.chaos launchers/elastic.sh ...`): it swaps the loop's Trainer for `Chaos` and
runs the ordinary CLI.

    SIMSCALE_TEST_KILLS="A:S:R:SIG,..."  on launcher attempt A (TORCHELASTIC_RESTART_COUNT), rank R
                                        sends itself SIG (KILL or TERM) once step S is done, before
                                        that step's checkpoint
    SIMSCALE_TEST_POISON="S,..."         the loss of those steps x100 (forward and backward), on
                                        the run's first pass only (before any rollback)
    SIMSCALE_TEST_HOLD="S:PATH"          on attempt 0, every rank waits after step S (and its
                                        checkpoint) until PATH exists: a test acts in between

Every rank appends the global sample indices of each step to RUN_DIR/indices_rank{R}.jsonl
(`{"step", "epoch", "index"}`; a replayed step is written again, the last record wins).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from simscale.train import loop


def _kills() -> dict[tuple[int, int], str]:
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    out = {}
    for item in filter(None, os.environ.get("SIMSCALE_TEST_KILLS", "").split(",")):
        a, step, r, sig = item.split(":")
        if int(a) == attempt and int(r) == rank:
            out[(int(step), rank)] = sig
    return out


class Chaos(loop.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kill_at = _kills()
        self._poison = {int(s) for s in filter(None, os.environ.get("SIMSCALE_TEST_POISON", "").split(","))}
        self._log = open(self.run_dir / f"indices_rank{self.info.rank}.jsonl", "a")
        real_loss = self.model.loss

        def loss(out):
            value, stats = real_loss(out)
            if self.state.step + 1 in self._poison and self.state.rollbacks == 0:
                value = value * 100
            return value, stats

        self.model.loss = loss

    def _batches(self):
        for batch in super()._batches():
            self._log.write(json.dumps({"step": self.state.step + 1, "epoch": self.state.epoch,
                                        "index": batch["index"].tolist()}) + "\n")
            self._log.flush()
            yield batch

    def train_step(self, batches, read: bool = True):
        hold = os.environ.get("SIMSCALE_TEST_HOLD", "")
        if hold and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            step, path = hold.split(":", 1)
            while self.state.step == int(step) and not os.path.exists(path):
                time.sleep(0.2)
        m = super().train_step(batches, read)
        sig = self._kill_at.get((self.state.step, self.info.rank))
        if sig:
            print(f"chaos: rank {self.info.rank} sends itself SIG{sig} after step {self.state.step} "
                  f"at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
        return m


if __name__ == "__main__":
    from simscale.cli import main

    loop.Trainer = Chaos  # loop.train() builds whatever loop.Trainer names
    sys.exit(main(sys.argv[1:]))

"""Test-only fault injection: Trainer subclasses that poison a step's inputs or crash after a step.

The product has no fault seams: these subclasses override ordinary Trainer methods (`_to_device`
for poisoned inputs; `train_step` for "after step N", which runs once step N's eval and
checkpoint are done); nothing about faults is in the user config. To crash a real CLI run, start this module instead of `simscale`:

    torchrun ... -m tests.train.faults --crash-after N train --preset tiny ...

It swaps the loop's Trainer for `CrashAfter(N)` and runs the ordinary `simscale` CLI. More faults,
each on one rank (RANK from the launcher), for the no-hang tests:

    --raise-after N R     rank R raises a RuntimeError once N steps are done (an ordinary bug)
    --stop-after N R      rank R stops itself with SIGSTOP once N steps are done (a hung rank)
    --stale-view DIR R    rank R lists checkpoints in DIR instead of run.dir/checkpoints (a stale
                          file-system cache showing that rank other checkpoint directories)

The raising and stopping ranks print `fault: ... at <unix time>` first, for the tests' clocks.
"""
from __future__ import annotations

import copy
import os
import signal
import sys
import time
from pathlib import Path

import torch

from simscale.train import loop


def nan_at(step: int) -> type[loop.Trainer]:
    """A Trainer whose step number `step` (1-based, as logged and checkpointed) sees NaN inputs."""

    class NanAt(loop.Trainer):
        def _to_device(self, batch):
            view_a, *rest = super()._to_device(batch)
            return (view_a * float("nan") if self.state.step + 1 == step else view_a, *rest)

    return NanAt


def crash_after(step: int) -> type[loop.Trainer]:
    """A Trainer that hard-exits (no cleanup, no final checkpoint) once `step` steps are done."""

    class CrashAfter(loop.Trainer):
        def train_step(self, batches, read: bool = True):
            if self.state.step == step:  # step `step` is done, evaluated and saved
                os._exit(17)
            return super().train_step(batches, read)

    return CrashAfter


def _on_rank(rank: int) -> bool:
    return int(os.environ.get("RANK", "0")) == rank


def fault_after(step: int, rank: int, what: str) -> type[loop.Trainer]:
    """A Trainer whose rank `rank` raises (what='raise') or stops itself (what='stop') after `step` steps."""

    class FaultAfter(loop.Trainer):
        def train_step(self, batches, read: bool = True):
            if self.state.step != step or not _on_rank(rank):  # step `step` is done, evaluated and saved
                return super().train_step(batches, read)
            print(f"fault: rank {rank} {what}s after step {step} at {time.time():.3f}", flush=True)
            if what == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                raise RuntimeError(f"injected failure on rank {rank} after step {step}")

    return FaultAfter


def stale_view(view: Path, rank: int) -> None:
    """Rank `rank` lists checkpoints in `view` (it still loads a name it is given from run.dir);
    every rank prints the checkpoint it resumes from."""
    from simscale.train import checkpoint

    real_tags, real_find = checkpoint.Checkpointer.tags, checkpoint.Checkpointer.find_resumable

    def tags(self) -> list[Path]:
        if not _on_rank(rank):
            return real_tags(self)
        other = copy.copy(self)
        other.root = view
        return real_tags(other)

    def find_resumable(self, resume: str):
        chosen = real_find(self, resume)
        print(f"fault: rank {self.rank} resumes from {chosen.name if chosen else None}", flush=True)
        return chosen

    checkpoint.Checkpointer.tags = tags
    checkpoint.Checkpointer.find_resumable = find_resumable


if __name__ == "__main__":
    from simscale.cli import main

    argv = sys.argv[1:]
    if argv[:1] == ["--crash-after"]:
        loop.Trainer = crash_after(int(argv[1]))  # loop.train() builds whatever loop.Trainer names
        argv = argv[2:]
    if argv[:1] in (["--raise-after"], ["--stop-after"]):
        loop.Trainer = fault_after(int(argv[1]), int(argv[2]), argv[0][2:].split("-")[0])
        argv = argv[3:]
    if argv[:1] == ["--stale-view"]:
        stale_view(Path(argv[1]), int(argv[2]))
        argv = argv[3:]
    sys.exit(main(argv))

"""Test-only fault injection: Trainer subclasses that poison a step's inputs or crash after a step.

The trainer has two no-op seams (`_fault_inputs`, `_fault_after_step`); nothing about faults is
in the user config. To crash a real CLI run, start this module instead of `simscale`:

    torchrun ... -m tests.train.faults --crash-after N train --preset tiny ...

It swaps the loop's Trainer for `CrashAfter(N)` and runs the ordinary `simscale` CLI.
"""
from __future__ import annotations

import os
import sys

import torch

from simscale.train import loop


def nan_at(step: int) -> type[loop.Trainer]:
    """A Trainer whose step number `step` (1-based, as logged and checkpointed) sees NaN inputs."""

    class NanAt(loop.Trainer):
        def _fault_inputs(self, view_a: torch.Tensor) -> torch.Tensor:
            return view_a * float("nan") if self.state.step + 1 == step else view_a

    return NanAt


def crash_after(step: int) -> type[loop.Trainer]:
    """A Trainer that hard-exits (no cleanup, no final checkpoint) once `step` steps are done."""

    class CrashAfter(loop.Trainer):
        def _fault_after_step(self) -> None:
            if self.state.step == step:
                os._exit(17)

    return CrashAfter


if __name__ == "__main__":
    from simscale.cli import main

    argv = sys.argv[1:]
    if argv[:1] == ["--crash-after"]:
        loop.Trainer = crash_after(int(argv[1]))  # loop.train() builds whatever loop.Trainer names
        argv = argv[2:]
    sys.exit(main(argv))

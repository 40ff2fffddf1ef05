"""Preemption-safe stops and wall-time checkpoints, agreed by all ranks at a step boundary.

A SIGTERM (SLURM's preemption notice, Kubernetes' pod stop, torch's elastic agent stopping its
workers) or the file `run.stop_file` appearing sets a flag on the rank that saw it. At every step
boundary the ranks all-reduce (MAX) three small numbers: stop asked, rank 0's "a wall-time
checkpoint is due" (`run.save_every_minutes`, rank 0's clock so that the ranks never disagree),
and the asking rank's id; so every rank takes the same decision at the same step: save, then stop
with one line. The all-reduce is a CPU tensor on a gloo group (the default group on CPU; its own
group beside NCCL), so it adds no device sync.

Exit code: 0. Under torch's elastic agent with restarts left (launchers/elastic.sh), a stop that
came to the workers alone exits `RESTART_CODE` instead: torchrun restarts a group only when a
worker fails, and an all-zero group ends the job as finished. (When the agent itself is stopped,
it ignores the workers' codes.)
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

RESTART_CODE = 75  # EX_TEMPFAIL: "try again", restarts under the elastic agent
SIGTERM_CODE = 143  # what the default SIGTERM action would have meant (128 + 15)


class Stopped(Exception):
    """Raised by the loop after the agreed save; the CLI prints nothing more and exits `code`."""

    clean_stop = True  # watchdog.ends_job_on_failure lets it through: not a failure

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def under_restarting_agent() -> bool:
    env = os.environ
    try:
        return int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return False


def resume_command(preset: str, run_dir: str | Path) -> str:
    """What a user runs (under the same launcher) to continue this run."""
    launcher = "under the same launcher: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    cfg = Path(run_dir) / "config.yaml"
    return (f"{launcher}simscale train --preset {shlex.quote(preset)} --config {shlex.quote(str(cfg))} "
            "--resume auto")


class StopAgreement:
    """The per-step decision (stop, save by time) every rank takes together."""

    def __init__(self, rank: int, world_size: int, stop_file: str, save_every_minutes: float, backend: str):
        self.rank, self.world_size = rank, world_size
        self.stop_file = Path(stop_file) if stop_file else None
        self.period_s = save_every_minutes * 60.0
        self.last_save = time.monotonic()
        self.last_boundary, self.step_s = time.monotonic(), 0.0
        self.reason: str | None = None  # this rank's reason to stop, set by the signal handler
        self.agreed = threading.Event()
        self.grace_s: float | None = None  # None: 10 s + 3 x the last step's time
        self.group = None
        if world_size > 1 and backend != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every rank builds it at init
        self._installed = False
        if hasattr(signal, "SIGTERM"):
            try:
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
                self._installed = True
            except ValueError:  # not the main thread (an embedding application): no signal stop
                pass

    def _on_sigterm(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, then all ranks agree (below). But a rank blocked in
        # a collective with a dead peer (NCCL waits for its timeout) never reaches the boundary: a timer
        # then ends it as SIGTERM's default action would have, instead of holding the agent's restart.
        if self.reason is None:
            self.reason = "SIGTERM"
            grace = self.grace_s if self.grace_s is not None else 10.0 + 3 * self.step_s
            threading.Thread(target=self._deadline, args=(grace,), name="simscale-sigterm", daemon=True).start()

    def _deadline(self, grace: float) -> None:
        if self.agreed.wait(grace):
            return
        print(f"rank {self.rank}: SIGTERM, and no step boundary reached within {grace:.0f} s (another rank is gone or "
              "stuck): stopping without a save; the newest complete checkpoint is kept", file=sys.stderr, flush=True)
        os._exit(SIGTERM_CODE)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def decide(self) -> tuple[bool, bool, str]:
        """(stop, save by time, why) for this step boundary; collective when distributed."""
        now = time.monotonic()
        self.step_s, self.last_boundary = now - self.last_boundary, now
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        due = self.rank == 0 and self.period_s > 0 and time.monotonic() - self.last_save >= self.period_s
        values = [1 if self.reason else 0, 1 if due else 0, self.rank if self.reason else -1]
        if self.world_size > 1:  # a host tensor on gloo: no device sync (one process needs no tensor at all)
            flags = torch.tensor(values)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            values = flags.tolist()
        stop, due, who = (int(v) for v in values)
        if stop:
            self.agreed.set()  # the save that follows is not cut short by the SIGTERM timer
        why = self.reason or (f"rank {who} was asked to stop" if stop else "")
        return bool(stop), bool(due), why

    def exit_code(self) -> int:
        return RESTART_CODE if under_restarting_agent() else 0

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def stop_line(rank: int, step: int, why: str, tag: str, command: str, code: int) -> str:
    then = " (exit 75: the elastic agent restarts the job)" if code == RESTART_CODE else ""
    return f"stopped at step {step} ({why}): checkpoint {tag} saved; resume with: {command}{then}"

"""Where numbers go: JSONL and TensorBoard in the run directory, progress on rank 0's stderr.

Progress: a rich live bar when stderr is a terminal, otherwise (SLURM, a redirect, `| tee`) one
plain line per logged step, so a log file shows how far a run is and when it will end. The
caller decides which (`live`): only the CLI and the distributed setup read the environment.
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from simscale.console import make_console

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices report achieved FLOP/s only.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "A10G": 70e12, "V100": 125e12, "GH200": 989e12, "B200": 2250e12,
}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def memory_gb() -> float:
    """Peak CUDA memory allocated, or the process's peak resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def plain_line(step: int, total: int, values: dict[str, Any], eta_s: float | None) -> str:
    """One self-contained progress line for logs: a reader of a SLURM .out file needs no other."""
    parts = [f"step {step}/{total}", f"epoch {values.get('epoch', 0)}", f"loss {values.get('loss', float('nan')):.4f}",
             f"lr {values.get('lr', 0):.2e}", f"{values.get('images_per_s', 0):.1f} img/s",
             f"{values.get('tflops_per_device', 0):.3f} TFLOP/s"]
    if values.get("mfu") is not None:
        parts.append(f"MFU {values['mfu']:.1%}")
    parts += [f"mem {values.get('memory_gb', 0):.1f} GB", f"data wait {values.get('data_wait', 0):.0%}",
              f"ETA {format_duration(eta_s) if eta_s is not None else '?'}"]
    return "  ".join(parts)


class MetricsSink:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, progress: bool, total_steps: int,
                 live: bool = False):
        """`progress`: report progress on stderr at all; `live`: as a rich bar (a terminal) rather
        than plain lines."""
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.progress = None
        self.plain = False
        self.total = total_steps
        self.first: tuple[int, float] | None = None  # (step, time) of the first logged step, for the ETA
        self.console = make_console(stderr=True)
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress and live:
            self.progress = Progress(
                TextColumn("[bold]SIM"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, info="")
            self.progress.start()
        elif progress:
            self.plain = True

    def eta(self, step: int) -> float | None:
        """Seconds left, from the rate since the first logged step (start-up and resume excluded)."""
        now = time.time()
        if self.first is None:
            self.first = (step, now)
            return None
        done = step - self.first[0]
        return (now - self.first[1]) / done * (self.total - step) if done > 0 else None

    def log(self, step: int, values: dict[str, Any]) -> None:
        """`step`: optimizer steps completed (1 after the first), as in checkpoint names."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, step)
        if "loss" not in values:  # an evaluation record (e.g. online k-NN): its own short line
            if self.progress is not None or self.plain:
                self.console.print(f"step {step}/{self.total}  " + "  ".join(
                    f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)), highlight=False, markup=False)
            return
        if self.progress is not None:
            info = (f"loss {values.get('loss', float('nan')):.4f}  lr {values.get('lr', 0):.2e}  "
                    f"{values.get('images_per_s', 0):.1f} img/s  {values.get('tflops_per_device', 0):.3f} TFLOP/s"
                    + (f"  MFU {values['mfu']:.1%}" if values.get("mfu") is not None else "")
                    + (f"  HFU {values['hfu']:.1%}" if values.get("hfu") is not None else "")
                    + f"  mem {values.get('memory_gb', 0):.1f} GB  data wait {values.get('data_wait', 0):.0%}")
            self.progress.update(self.task, completed=step, info=info)
        elif self.plain:
            self.console.print(plain_line(step, self.total, values, self.eta(step)), highlight=False,
                               soft_wrap=True, markup=False)

    def drop_after(self, step: int) -> None:
        """After a resume from checkpoint `step` (= optimizer steps completed, as records are
        numbered): remove the records of later steps (they are replayed), keep the rest."""
        if self.jsonl is None:
            return
        path = Path(self.jsonl.name)
        self.jsonl.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut by a crash mid-write
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
        self.jsonl = open(path, "a", buffering=1)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, soft_wrap=True)  # one line per message in a log file, however long

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()

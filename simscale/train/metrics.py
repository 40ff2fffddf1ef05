"""Where numbers go: JSONL and TensorBoard in the run directory, a rich live line on rank 0."""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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


class MetricsSink:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, progress: bool, total_steps: int):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.progress = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress:
            self.console = Console(stderr=True)
            self.progress = Progress(
                TextColumn("[bold]SIM"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=self.console, transient=False,
                disable=os.environ.get("SIMSCALE_NO_PROGRESS") == "1",
            )
            self.task = self.progress.add_task("train", total=total_steps, info="")
            self.progress.start()

    def log(self, step: int, values: dict[str, Any], progress: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.progress is not None and progress:
            info = (f"loss {values.get('loss', float('nan')):.4f}  lr {values.get('lr', 0):.2e}  "
                    f"{values.get('images_per_s', 0):.1f} img/s  {values.get('tflops_per_device', 0):.3f} TFLOP/s"
                    + (f"  MFU {values['mfu']:.1%}" if values.get("mfu") is not None else "")
                    + (f"  HFU {values['hfu']:.1%}" if values.get("hfu") is not None else "")
                    + f"  mem {values.get('memory_gb', 0):.1f} GB  data {values.get('data_wait', 0):.0%}")
            self.progress.update(self.task, completed=step + 1, info=info)

    def drop_from(self, step: int) -> None:
        """After a resume at `step`: remove records of steps >= step (they are replayed), keep the rest."""
        if self.jsonl is None:
            return
        path = Path(self.jsonl.name)
        self.jsonl.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut by a crash mid-write
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
        self.jsonl = open(path, "a", buffering=1)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step + 1)

    def print(self, text: str) -> None:
        if self.enabled:
            (self.progress.console if self.progress is not None else Console(stderr=True)).print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()

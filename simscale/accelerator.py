"""Which accelerator DeepSpeed gets, decided as the launchers decide it (launchers/common.sh).

Without an NVIDIA GPU (no nvidia-smi), DS_ACCELERATOR=cpu is set when unset, before DeepSpeed is
imported: otherwise DeepSpeed's detection prints "Setting accelerator to CPU. If you have GPU or
other accelerator, we were unable to detect it." on every command, which reads as a failure.
simscale prints its own device line instead (`device_line`). With GPUs visible nothing is set:
DeepSpeed picks CUDA, and `train.distributed.check_cuda_usable` explains a GPU torch cannot use.
"""
from __future__ import annotations

import os
import shutil


def default_to_cpu_without_gpu() -> None:
    if "DS_ACCELERATOR" not in os.environ and shutil.which("nvidia-smi") is None:
        os.environ["DS_ACCELERATOR"] = "cpu"


def device_line(device_type: str, world_size: int, backend: str) -> str:
    """One line: what each rank computes on, e.g. `2 ranks x CPU (4 threads each, gloo)`."""
    import torch

    if device_type == "cuda":
        what = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, {backend})"
    else:
        what = f"CPU ({torch.get_num_threads()} thread(s) each, {backend}; no NVIDIA GPU in use)"
    return f"{world_size} rank(s) x {what}"

"""Process-group setup in one place: rank and world from torchrun, the deepspeed launcher or SLURM.

This is the only module (with the CLI) that reads the environment. A single process with no
launcher variables still gets a real process group (world size 1), so the training code has no
special case for it.
"""
from __future__ import annotations

import importlib
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from simscale.errors import DeviceError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_launchers() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, accelerate
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun starting one task per GPU
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("RANK", str(rank))
        env.setdefault("WORLD_SIZE", str(world))
        env.setdefault("LOCAL_RANK", str(local))
        return rank, world, local
    return 0, 1, 0


def skip_cpu_shm_comm_build() -> None:
    """DeepSpeed compiles a CPU shared-memory comm op with g++ at every engine init (50-70 s cold).

    It only speeds up CPU inference collectives; training on CPU (tests, CI) uses gloo either
    way, so we switch the build off. The module is fetched with importlib because
    `import deepspeed.comm.torch as m` yields the torch package (name clash in deepspeed.comm).
    """
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def visible_nvidia_gpus() -> list[str]:
    """What says this machine has NVIDIA GPUs, whatever torch thinks: device nodes, the driver's list."""
    found = sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        found += sorted(str(p) for p in gpus.iterdir())
    return found


def check_cuda_usable() -> None:
    """Stop in one line when GPUs are there but torch cannot use them, instead of training on CPU.

    CPU on purpose (DS_ACCELERATOR=cpu, or CUDA_VISIBLE_DEVICES empty / -1) is never stopped.
    """
    env = os.environ
    if env.get("DS_ACCELERATOR") == "cpu" or env.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return
    if torch.cuda.is_available():
        return
    gpus = visible_nvidia_gpus()
    if not gpus:
        return
    if torch.version.cuda is None:
        why = "this torch is a CPU-only build"
    else:
        try:
            torch.cuda.init()
            why = "torch.cuda.is_available() is False"
        except Exception as exc:  # the driver's own reason, e.g. too old for this CUDA build
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise DeviceError(
        f"NVIDIA GPUs are visible ({gpus[0]}) but torch {torch.__version__} (CUDA {torch.version.cuda}) "
        f"cannot use them: {why}; install a torch build that matches the driver, or set DS_ACCELERATOR=cpu "
        "to train on CPU on purpose"
    )


def _collective_timeouts(timeout_s: int) -> None:
    """Every process group gets `timeout_s`, and on NCCL a timeout ends the process instead of hanging.

    DeepSpeed builds its own groups (a clone of the world for ZeRO's reductions, SyncBN has one too)
    with `new_group(ranks)`, which takes torch's module-level default (30 min gloo, 10 min NCCL), not
    the timeout given to init_process_group: so the defaults themselves are set. On NCCL the watchdog
    then tears the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, torch's default, made explicit;
    blocking wait would make every collective a host sync).
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")


def shared_store_restart_warning(env=os.environ) -> str | None:
    """The line for torchrun restarts on its shared store (None: no such risk). torch's agent keeps one
    store for every attempt unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, so a restarted group can read
    the dead group's gloo/NCCL addresses and fail or hang in its setup (pytorch/pytorch#135712)."""
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        restarts = 0
    if restarts > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("torchrun restarts on its shared store: a restarted attempt may connect to the dead one's "
                "ranks and fail or hang in process-group setup (pytorch#135712); set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (launchers/elastic.sh does)")
    return None


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (nccl on CUDA, gloo on CPU).

    `timeout_s` (run.collective_timeout_s) bounds every collective; with more than one rank a
    failure notice (watchdog.py) lets a failing rank end the others within seconds.
    """
    import deepspeed

    from simscale.train import watchdog

    watchdog.set_phase("setup")
    # DeepSpeed calls torch's old collective names on every step; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    rank, world, local = _env_from_launchers()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            os.environ["MASTER_PORT"] = "29500"
        else:
            os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    check_cuda_usable()
    risk = shared_store_restart_warning()
    if risk and rank == 0:
        watchdog.console.print(f"[yellow]warning: {risk}[/yellow]", highlight=False, soft_wrap=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        skip_cpu_shm_comm_build()
        device = torch.device("cpu")
        backend = "gloo"
    _collective_timeouts(timeout_s)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                                   verbose=False, rank=rank, world_size=world)
    # One key per torchrun attempt: a restarted job must not read the previous attempt's failure.
    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    key = f"simscale/failed/{attempt}"
    watchdog.start_failure_notice(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, key)
    return DistInfo(rank, world, local, device, backend)

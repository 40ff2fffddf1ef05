"""Launch real multi-process runs from tests: torchrun on gloo, one thread each, a hard timeout."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The venv's console scripts (deepspeed) must be found even when the venv is not activated.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", SIMSCALE_NO_PROGRESS="1", COLUMNS="1000",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, module: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N [-m] args...`; output captured; killed after `timeout` s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1"]
    cmd += (["-m"] if module else []) + args
    return subprocess.run(cmd, env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def train_cli(overrides: list[str], nproc: int = 2, timeout: int = 300, resume: str = "auto"):
    return torchrun(["simscale", "train", "--preset", "tiny", "--resume", resume, *overrides], nproc, timeout)


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (proc.stdout + proc.stderr)[-n:]


def simscale_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """One plain process (world size 1, no launcher): `python -m simscale ...`."""
    cmd = [sys.executable, "-m", "simscale", *args]
    return subprocess.run(cmd, env=cpu_env(MASTER_PORT=str(free_port())), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def worker_json(worker: Path, *args: str, timeout: int = 300) -> dict:
    """Runs a test worker script in its own process (for process-wide state) and returns the JSON
    object it prints on its last stdout line."""
    import json

    proc = subprocess.run([sys.executable, str(worker), *args], env=cpu_env(MASTER_PORT=str(free_port())),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

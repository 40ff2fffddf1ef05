"""Checkpoints that never lie: DeepSpeed's sharded save plus simscale's own per-rank state.

Layout under RUN_DIR/checkpoints/:
    step_00000100/          DeepSpeed's files (any ZeRO stage) + simscale_rank00000.pt ... + COMPLETE
    latest                  the name of the newest complete checkpoint
A checkpoint counts only when its COMPLETE file exists and every file it lists has the listed
size; COMPLETE is written by rank 0 after all ranks finished (a barrier), and `latest` moves
only after that, by atomic rename. A crash mid-save leaves at worst an incomplete directory that
resume skips. (The run directory must be on a file system every rank sees.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console

from simscale.errors import CheckpointError

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8})$")
console = Console(stderr=True)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(tag_dir: Path) -> str | None:
    """None when the checkpoint is complete, else the reason it is not."""
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker (the save did not finish)"
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return "COMPLETE marker is unreadable"
    for name, size in meta["files"].items():
        f = tag_dir / name
        if not f.is_file():
            return f"file '{name}' is missing"
        if f.stat().st_size != size:
            return f"file '{name}' is {f.stat().st_size} bytes, expected {size} (truncated)"
    return None


def read_meta(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / COMPLETE).read_text())


class Checkpointer:
    def __init__(self, run_dir: str | Path, rank: int, world_size: int, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    # -- listing ---------------------------------------------------------------------------------
    def tags(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _TAG.match(p.name)]
        return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))

    def complete_tags(self) -> list[Path]:
        return [p for p in self.tags() if verify(p) is None]

    def find_resumable(self, resume: str) -> Path | None:
        """'none' -> None; 'auto' -> newest complete checkpoint (or None); else that directory."""
        if resume == "none":
            return None
        if resume != "auto":
            tag_dir = Path(resume)
            problem = verify(tag_dir) if tag_dir.is_dir() else "it does not exist"
            if problem:
                raise CheckpointError(f"cannot resume from '{tag_dir}': {problem}; "
                                      "pick another step_* directory or use --resume auto")
            return tag_dir
        for tag_dir in reversed(self.tags()):
            problem = verify(tag_dir)
            if problem is None:
                return tag_dir
            if self.rank == 0:
                console.print(f"[yellow]skipping checkpoint {tag_dir.name}: {problem}; "
                              "using the previous one[/yellow]")
        return None

    # -- saving ----------------------------------------------------------------------------------
    def save(self, engine, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it. `state` is this rank's simscale state."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a leftover of a crashed save of the same step
                shutil.rmtree(tag_dir)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        own = tag_dir / f"simscale_rank{self.rank:05d}.pt"
        tmp = own.with_name(f".{own.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, own)
        dist.barrier()
        if self.rank == 0:
            files = {str(p.relative_to(tag_dir)): p.stat().st_size
                     for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != COMPLETE}
            _atomic_write(tag_dir / COMPLETE, json.dumps(
                {"step": step, "world_size": self.world_size, "files": files, **meta}, indent=1))
            _atomic_write(self.root / LATEST, tag)
            self._prune()
        dist.barrier()
        return tag_dir

    def _prune(self) -> None:
        complete = self.complete_tags()
        for old in complete[: max(len(complete) - self.keep_last, 0)]:
            shutil.rmtree(old, ignore_errors=True)
        # Incomplete directories older than the newest complete one are dead leftovers.
        if complete:
            newest = int(_TAG.match(complete[-1].name).group(1))
            for p in self.tags():
                if verify(p) is not None and int(_TAG.match(p.name).group(1)) < newest:
                    shutil.rmtree(p, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------
    def load(self, engine, tag_dir: Path) -> dict[str, Any]:
        meta = read_meta(tag_dir)
        if meta["world_size"] != self.world_size:
            raise CheckpointError(
                f"checkpoint '{tag_dir}' was written by {meta['world_size']} ranks, this run has "
                f"{self.world_size}: resume with the same number of processes"
            )
        path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load '{tag_dir}': the checkpoint is damaged; "
                                  "delete it to resume from the previous one")
        try:
            return torch.load(tag_dir / f"simscale_rank{self.rank:05d}.pt", map_location="cpu",
                              weights_only=False)
        except (OSError, RuntimeError, EOFError) as exc:
            raise CheckpointError(f"simscale state in '{tag_dir}' is unreadable ({exc}); "
                                  "delete the directory to resume from the previous one") from None


def check_compatible(saved_cfg: dict[str, Any], cfg: dict[str, Any], tag_dir: Path) -> None:
    """Refuse a checkpoint whose model or sharding differs from this run's, naming the key."""
    for section, keys in (("model", None), ("deepspeed", ("zero_stage", "precision")),
                          ("loss", None), ("data", ("same_view",))):
        old, new = saved_cfg.get(section, {}), cfg.get(section, {})
        for key in keys or sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise CheckpointError(
                    f"checkpoint '{tag_dir}' was written with {section}.{key}={old.get(key)!r}, this run "
                    f"has {new.get(key)!r}: resume with the same setting or use a new run.dir"
                )

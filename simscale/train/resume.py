"""What a resume must know before the engine exists, and the one resume fingerprint.

`peek` is the one place that chooses the checkpoint and reads its COMPLETE meta: the DeepSpeed
config depends on it (`load_universal` when the world size differs), so it runs before
`deepspeed.initialize`. `fingerprint_changes` is the one compatibility check: what defines the
model and its loss must match; what only says how the work is spread (world size, batch, gradient
accumulation, loader workers) may change and is reported.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simscale.errors import CheckpointError

# Must match: the parameters, what the loss computes, and the numerics the optimizer state has.
# (zero_stage too: a universal checkpoint could re-shard across stages, but simscale's EMA and
# DeepSpeed's model-state files are per stage and only same-stage loading is tested.)
FIXED = (("model", None), ("loss", None), ("data", ("same_view",)), ("deepspeed", ("zero_stage", "precision")))
# May change on resume; reported in one line.
ELASTIC = (("optim", "batch_size"), ("optim", "grad_accum"), ("data", "num_workers"))


@dataclass
class ResumePlan:
    tag_dir: Path  # the checkpoint chosen (a step_* directory or a universal folder)
    meta: dict[str, Any]  # its COMPLETE
    universal: bool  # load through DeepSpeed's universal checkpoint (other world size, or a universal folder)


def peek(ckpt, resume: str, world_size: int) -> ResumePlan | None:
    """Choose the checkpoint (`ckpt.find_resumable`) and read its meta; None for a fresh start."""
    from simscale.train.checkpoint import read_meta
    from simscale.train.universal import is_universal, source_of

    if resume not in ("auto", "none") and Path(resume).is_dir():
        # A universal folder from `ds_to_universal` lacks simscale's state: resume from its (verified)
        # source, which is converted again here when the world size differs.
        source = source_of(Path(resume))
        if source is not None:
            if ckpt.rank == 0:
                print(f"simscale: '{resume}' is DeepSpeed's universal form of {source} (same model states); "
                      "resuming from that checkpoint, which holds simscale's state", file=sys.stderr, flush=True)
            resume = str(source)
    tag_dir = ckpt.find_resumable(resume)
    if tag_dir is None:
        return None
    meta = read_meta(tag_dir)
    return ResumePlan(tag_dir, meta, is_universal(meta) or meta["world_size"] != world_size)


def fingerprint_changes(saved_cfg: dict[str, Any], cfg: dict[str, Any], saved_world: int, world: int,
                        tag_dir: Path) -> list[str]:
    """Raise on a FIXED key that differs (one line naming it and the fix); return the ELASTIC changes
    as 'key a -> b' strings (world size first)."""
    for section, keys in FIXED:
        old, new = saved_cfg.get(section, {}), cfg.get(section, {})
        for key in keys or sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise CheckpointError(
                    f"checkpoint '{tag_dir}' was written with {section}.{key}={old.get(key)!r}, this run "
                    f"has {new.get(key)!r}: resume with the same setting or use a new run.dir"
                )
    changes = [f"world size {saved_world} -> {world}"] if saved_world != world else []
    for section, key in ELASTIC:
        old, new = saved_cfg.get(section, {}).get(key), cfg.get(section, {}).get(key)
        if old != new:
            changes.append(f"{section}.{key} {old} -> {new}")
    return changes


def global_batch_of(cfg: dict[str, Any], world: int) -> int:
    return int(cfg["optim"]["batch_size"]) * int(cfg["optim"]["grad_accum"]) * world


def rank_seed(seed: int, step: int, rank: int) -> int:
    """Model-side RNG (drop path) of a rank after a resize: a function of (seed, step, rank) only,
    so every rank of the new world differs from the others and a rerun draws the same."""
    return (seed * 1_000_003 + step) * 65_537 + rank

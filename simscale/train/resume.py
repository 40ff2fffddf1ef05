"""Resume behind one door: `prepare` before the engine exists, `restore` after it.

    plan = resume.prepare(cfg, dist, ckpt, "auto", lr_rule)   # choose, verify, check, convert
    ... build data, model, DeepSpeed engine (plan.adjust(ds_config) first) ...
    state = resume.restore(engine, ema, plan, schedule, sink)  # weights, Adam, EMA, loop, RNG

`prepare` chooses the checkpoint on rank 0 and verifies it on every rank (`peek`), checks the
fingerprint (`fingerprint_changes`: what defines the model and its loss must match; what only
says how the work is spread may change and is reported), fixes the run's data partitions (a
fresh run resolves data.partitions=0, a resume keeps the recorded ones), and on a world-size
change has rank 0 convert the checkpoint to DeepSpeed's universal form. `restore` loads it, and
only then records the run's config (RUN_DIR/config.yaml, plus a dated copy per start in
RUN_DIR/starts/): a resume that is refused replaces nothing the run wrote.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simscale.config import Config, from_dict, save_yaml, to_dict
from simscale.data.partitions import auto_partitions, partition_problem
from simscale.errors import CheckpointError, ConfigError
from simscale.train.loop_state import LoopState, loop_state_from, restore_rng

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
    load_dir: Path | None = None  # what DeepSpeed loads: tag_dir, or its universal form
    changes: list[str] = field(default_factory=list)  # for the one "resume changes" line


@dataclass
class Plan:
    """What `prepare` decided; `resumed` is None for a fresh start."""
    cfg: Config  # the run's config, data.partitions fixed (recorded by `restore` once it succeeds)
    ckpt: Any  # the run's Checkpointer
    rank: int
    is_main: bool
    resumed: ResumePlan | None = None

    def adjust(self, ds_config: dict[str, Any]) -> None:
        """The DeepSpeed config a resume needs (universal loading on another world size)."""
        if self.resumed is not None and self.resumed.universal:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True


def prepare(cfg: Config, dist, ckpt, resume: str = "auto", lr_rule: bool = True) -> Plan:
    """Collective, before the engine. `cfg` has its lr resolved; `lr_rule`: that lr came from the
    scaling rule (an explicit optim.lr is never scaled, also not on resume). Raises one line on a
    checkpoint this run cannot continue; sets cfg.data.partitions."""
    asked = cfg.data.partitions
    # data.partitions is fixed for the run (its data position counts in them): 0 resolves now,
    # is recorded with the config, and a resume takes the checkpoint's.
    cfg.data.partitions = asked or auto_partitions(dist.world_size, cfg.optim.batch_size, cfg.data.num_workers)
    plan = Plan(cfg, ckpt, dist.rank, dist.is_main)
    found = peek(ckpt, resume, dist.world_size)
    if found is None:
        _record(plan)  # a fresh start: nothing of an earlier run to protect
        return plan
    saved_cfg = found.meta["config"]
    found.changes = fingerprint_changes(saved_cfg, to_dict(cfg), found.meta["world_size"], dist.world_size,
                                        found.tag_dir)
    _adopt_partitions(cfg, saved_cfg.get("data", {}).get("partitions", 0), asked, dist.world_size, found.tag_dir)
    old_gb = global_batch_of(saved_cfg, found.meta["world_size"])
    new_gb = global_batch_of(to_dict(cfg), dist.world_size)
    if old_gb != new_gb or saved_cfg["optim"].get("lr") != cfg.optim.lr:
        how = "the lr rule re-applied" if lr_rule else "optim.lr set explicitly, not scaled"
        found.changes.append(f"global batch {old_gb} -> {new_gb}, lr {saved_cfg['optim'].get('lr', 0):.3e} -> "
                             f"{cfg.optim.lr:.3e} ({how})")
    found.load_dir = found.tag_dir
    if found.universal and not _universal().is_universal(found.meta):
        found.load_dir = _universal().prepare(found.tag_dir, Path(cfg.run.dir), dist.rank)
    plan.resumed = found
    return plan


def _universal():
    from simscale.train import universal  # imports DeepSpeed's checkpoint tools: only when resuming

    return universal


def _adopt_partitions(cfg: Config, saved: int, asked: int, world: int, tag_dir: Path) -> None:
    """Continue in the data partitions the run started with (the data position counts in them)."""
    if not saved:
        raise CheckpointError(f"checkpoint '{tag_dir}' keeps a per-rank data position (written before "
                              "data.partitions existed): this simscale cannot resume it; use a new run.dir")
    if asked and asked != saved:
        raise CheckpointError(f"checkpoint '{tag_dir}' was written with data.partitions={saved}, this run asks "
                              f"for {asked}: drop the override (0 keeps the recorded one) or use a new run.dir")
    if saved == cfg.data.partitions:
        return
    problem = partition_problem(saved, world, cfg.optim.batch_size)
    if problem:
        raise CheckpointError(f"resuming '{tag_dir}': the run's recorded {problem}")
    cfg.data.partitions = saved


def _record(plan: Plan) -> None:
    """RUN_DIR/config.yaml (the run's recipe as it continues) and RUN_DIR/starts/config-<time>.yaml
    (this start's): written only once the start is accepted, by rank 0."""
    if not plan.is_main:
        return
    run_dir = Path(plan.cfg.run.dir)
    starts = run_dir / "starts"
    starts.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dated, n = starts / f"config-{stamp}.yaml", 1
    while dated.exists():  # two starts within a second keep both
        dated, n = starts / f"config-{stamp}-{n}.yaml", n + 1
    save_yaml(plan.cfg, dated)
    save_yaml(plan.cfg, run_dir / "config.yaml")


def restore(engine, ema, plan: Plan, schedule, sink) -> LoopState:
    """Collective, after the engine: weights and Adam state (through DeepSpeed), the EMA target,
    the loop state and the RNG of the chosen checkpoint; a fresh LoopState for a fresh start.
    Says what changed, and records the config once everything loaded."""
    found = plan.resumed
    if found is None:
        return LoopState()
    tag_dir = found.tag_dir
    if found.universal:
        u = _universal()
        saved = u.load_state(found.load_dir)
        u.load_engine(engine, found.load_dir, saved["frozen"])
        ema.load_full(saved["ema"], plan.rank)
    else:
        saved = plan.ckpt.load(engine, tag_dir)
        ema.load_state_dict(saved["ema"])
    state = loop_state_from(saved["loop"], tag_dir)
    if found.universal:
        # Per-rank state of another world has no rank-to-rank mapping: every rank continues from
        # rank 0's loop state, and model-side randomness is re-seeded per (seed, step, rank).
        seed = rank_seed(plan.cfg.run.seed, state.step, plan.rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        found.changes.append("every rank continues from rank 0's loop state (step, epoch, data position); "
                             "model RNG re-seeded from (run.seed, step, rank)")
    else:
        restore_rng(saved["rng"], tag_dir)
    found.changes += schedule_changes(found.meta["config"], plan.cfg, schedule, state.step)
    _record(plan)
    if found.changes:
        sink.print(f"resume changes: {'; '.join(found.changes)}")
    sink.drop_after(state.step)  # the steps about to be replayed are logged again
    sink.print(f"resumed from {tag_dir} at step {state.step} (epoch {state.epoch}, "
               f"sample {state.samples_in_epoch} of its global order)")
    if state.step >= schedule.total_steps:
        sink.print(f"[yellow]this run already finished: step {state.step} of {schedule.total_steps}; nothing to "
                   "train. Raise optim.max_steps (or optim.epochs) to continue it, or use a new run.dir[/yellow]")
    return state


# The schedule's length and shape: may change on resume (to extend a run); the lr it gives at the
# resumed step is then named, since it moves.
SCHEDULE = (("optim", "max_steps"), ("optim", "epochs"), ("optim", "warmup_steps"), ("optim", "warmup_epochs"),
            ("optim", "min_lr"))


def schedule_changes(saved_cfg: dict[str, Any], cfg: Config, schedule, step: int) -> list[str]:
    """'optim.max_steps a -> b: lr at step N x -> y' when the schedule's keys changed."""
    now = to_dict(cfg)
    keys = [f"{s}.{k} {saved_cfg.get(s, {}).get(k)} -> {now[s][k]}" for s, k in SCHEDULE
            if saved_cfg.get(s, {}).get(k) != now[s][k]]
    if not keys:
        return []
    try:
        old = type(schedule).from_config(from_dict(saved_cfg), schedule.steps_per_epoch)
    except (ConfigError, ValueError, TypeError, KeyError):
        return keys  # a config an older simscale wrote: the keys are still named
    before, after = old.lr_at(step), schedule.lr_at(step)
    how = f"lr at step {step} {before:.3e} -> {after:.3e}" if before != after else f"lr at step {step} unchanged"
    return [f"{', '.join(keys)} ({how}; total steps {old.total_steps} -> {schedule.total_steps})"]


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

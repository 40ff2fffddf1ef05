"""Resuming on another number of ranks: DeepSpeed's universal checkpoint plus simscale's state, consolidated.

A checkpoint written by N ranks holds N optimizer partitions and N EMA slices. To continue on M
ranks, rank 0 converts it once into
    RUN_DIR/universal/step_XXXXXXXX/
        zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, zero/optimizer_state.pt, *model_states.pt
                                        DeepSpeed's universal layout (`ds_to_universal`, run in-process
                                        under `weights_only_loads`: nothing is unpickled)
        simscale_universal.safetensors  the EMA target's full fp32 tensors (all ranks' slices joined), and
                                        as "frozen.<name>" the frozen parameters, whole (`frozen.read`:
                                        DeepSpeed's universal layout has only the optimizer's)
        simscale_universal.json         rank 0's loop state, the EMA's and the frozen names and shapes, the source
        COMPLETE                        as for any checkpoint (step, world_size of the source, config,
                                        every file's size and sha256) plus a "universal" entry
built in a hidden folder and renamed into place, so it exists only when finished. A later
resume reuses it when its source's COMPLETE is unchanged; only the newest conversion is kept. DeepSpeed loads it with
`"checkpoint": {"load_universal": true}` (set before `deepspeed.initialize`) and re-partitions
weights and Adam moments for the new world; `frozen.restore` puts back the frozen parameters and
`ShardedEMA.load_full` re-slices the target.
Such a folder is itself resumable (`--resume RUN_DIR/universal/step_...`) on any world size.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from simscale.checksum import ALGORITHM, file_digest
from simscale.errors import CheckpointError
from simscale.train import frozen
from simscale.train.checkpoint import COMPLETE, _atomic_write, os_reason, read_meta, verify
from simscale.train.ema import consolidate
from simscale.train.rank_state import load_ema, load_rank_state
from simscale.train.weights_only import loading_through_deepspeed, weights_only_loads

FORMAT = "simscale-universal/2"  # /1 had no frozen parameters: converted again
STATE = "simscale_universal"


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]  # one line, whatever the library's message looked like


def is_universal(meta: dict[str, Any]) -> bool:
    return isinstance(meta.get("universal"), dict)


def universal_dir(run_dir: Path, tag_dir: Path) -> Path:
    return Path(run_dir) / "universal" / tag_dir.name


def _reusable(out: Path, source_digest: str) -> bool:
    if verify(out, content=True) is not None:  # hashed: a damaged file is converted again, never loaded
        return False
    try:
        current = json.loads((out / f"{STATE}.json").read_text()).get("format") == FORMAT
        return current and read_meta(out)["universal"]["source_complete_sha256"] == source_digest
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def convert(tag_dir: Path, out: Path) -> None:
    """One process: `tag_dir` (a complete simscale checkpoint) -> the universal folder `out`."""
    meta = read_meta(tag_dir)
    world = meta["world_size"]
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    # one worker each: no child processes (they would not inherit the weights-only guard's context)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), weights_only_loads():
        ds_to_universal.main(args)
    (tmp.parent / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer; we always name the tag

    emas = [load_ema(tag_dir, r) for r in range(world)]
    full = consolidate(emas) if emas[0]["names"] else {}
    fixed = frozen.read(tag_dir, skip=frozen.ema_names(emas[0]["names"]))
    full.update({f"frozen.{k}": v for k, v in fixed.items()})
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / f"{STATE}.safetensors"))
    loop = load_rank_state(tag_dir, 0)["loop"]
    source_digest = file_digest(tag_dir / COMPLETE)
    (tmp / f"{STATE}.json").write_text(json.dumps({
        "format": FORMAT, "loop": loop,
        "ema": {"names": emas[0]["names"], "shapes": emas[0]["shapes"]},
        "frozen": {"names": list(fixed), "shapes": [list(v.shape) for v in fixed.values()]},
        "source": {"tag": tag_dir.name, "world_size": world, "ema_layout": emas[0]["layout"]}}))
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, ALGORITHM: file_digest(p)}
    universal = {"source": str(tag_dir), "source_world_size": world, "source_complete_sha256": source_digest}
    extra = {k: v for k, v in meta.items() if k not in ("files", "universal")}
    _atomic_write(tmp / COMPLETE, json.dumps({**extra, "universal": universal, "files": files}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def prepare(tag_dir: Path, run_dir: Path, rank: int) -> Path:
    """Collective: the universal folder for `tag_dir`, converted by rank 0 (or reused); the
    others wait for rank 0's answer, and every rank raises the same one line if it failed."""
    out = universal_dir(run_dir, tag_dir)
    problem = None
    if rank == 0:
        try:
            world = read_meta(tag_dir)["world_size"]
            if _reusable(out, file_digest(tag_dir / COMPLETE)):
                print(f"simscale: {tag_dir.name} was written by {world} ranks: using its universal form in {out}",
                      file=sys.stderr, flush=True)
            else:
                print(f"simscale: {tag_dir.name} was written by {world} ranks: converting it to DeepSpeed's "
                      f"universal checkpoint in {out} (once, then reused)", file=sys.stderr,
                      flush=True)
                convert(tag_dir, out)
            for old in out.parent.iterdir():  # older conversions are dead once this one exists
                if old.is_dir() and old != out and old.name.startswith(("step_", ".step_")):
                    shutil.rmtree(old, ignore_errors=True)
        except CheckpointError as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001 - a damaged source, a full disk: named, never a trace
            shutil.rmtree(out.with_name(f".{out.name}.tmp"), ignore_errors=True)
            why = os_reason(exc, out.parent) if isinstance(exc, OSError) else f"{type(exc).__name__}: {_line(exc)}"
            problem = (f"cannot convert '{tag_dir}' to a universal checkpoint in '{out}' ({why}); "
                       f"free space or resume on {read_meta(tag_dir)['world_size']} ranks")
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise CheckpointError(problem)
    return out


def load_state(udir: Path) -> dict[str, Any]:
    """{"loop": rank 0's loop state, "ema": {name: full fp32 tensor}, "frozen": {module name: whole
    tensor}} of a universal folder."""
    try:
        meta = json.loads((udir / f"{STATE}.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if isinstance(meta, dict) and str(meta.get("format", "")).startswith("simscale-universal/") \
            and meta["format"] != FORMAT:
        raise CheckpointError(f"universal checkpoint '{udir}' was written by another simscale ({meta['format']}; "
                              f"this one reads {FORMAT}, which also carries the frozen parameters): resume from "
                              "the step_* checkpoint it was converted from, which is converted again")
    try:
        tensors = load_file(str(udir / f"{STATE}.safetensors"))
        assert meta.get("format") == FORMAT and isinstance(meta.get("loop"), dict)
        names, shapes = meta["ema"]["names"], meta["ema"]["shapes"]
        ema = {n: tensors[n] for n in names}
        assert all(list(ema[n].shape) == list(s) for n, s in zip(names, shapes))
        names, shapes = meta["frozen"]["names"], meta["frozen"]["shapes"]
        fixed = {n: tensors[f"frozen.{n}"] for n in names}
        assert all(list(fixed[n].shape) == list(s) for n, s in zip(names, shapes))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError) as exc:
        raise CheckpointError(f"simscale state in universal checkpoint '{udir}' is missing or malformed "
                              f"({type(exc).__name__}); delete the folder (it is rebuilt from its source "
                              "checkpoint) or resume from another one") from None
    return {"loop": dict(meta["loop"]), "ema": ema, "frozen": fixed}


def _model_states_file(udir: Path) -> Path:
    found = sorted(udir.glob("*model_states.pt"))
    if not found:
        raise CheckpointError(f"'{udir}' holds no DeepSpeed model states file: it is not a universal checkpoint")
    return found[0]


def load_engine(engine, udir: Path, fixed: dict[str, torch.Tensor]) -> None:
    """Model weights and Adam state through DeepSpeed's universal loading (the engine was built
    with `load_universal`), then what that path leaves at its init: the module's buffers (BatchNorm
    statistics, from the saved module) and the frozen parameters (`fixed`, from `load_state`: the
    online patch embedding; the EMA target is restored from simscale's state right after)."""
    from deepspeed.utils import logger as ds_logger

    level = ds_logger.level
    ds_logger.setLevel("ERROR")  # its universal path warns "MPU is not provided" on every load: no TP here
    try:
        with loading_through_deepspeed(lambda exc: f"DeepSpeed could not load the universal checkpoint '{udir}' "
                                       f"({type(exc).__name__}: {_line(exc)}); delete it to convert again, or "
                                       "resume on the number of ranks that wrote the checkpoint"):
            path, _ = engine.load_checkpoint(str(udir.parent), tag=udir.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=True)
            saved = torch.load(_model_states_file(udir), map_location="cpu")
    finally:
        ds_logger.setLevel(level)
    if path is None:
        raise CheckpointError(f"DeepSpeed found nothing to load in '{udir}': delete it to convert again")
    own = dict(engine.module.named_buffers())
    buffers = {k: v for k, v in (saved.get("module") or {}).items() if k in own}
    with torch.no_grad():
        for k, v in buffers.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))
    targets = frozen.ema_names(n for n, _, _ in engine.module.ema_pairs())
    frozen.restore(engine.module, fixed, skip=targets, where=udir)


def source_of(folder: Path) -> Path | None:
    """For a DeepSpeed universal folder a user made with `ds_to_universal` from a simscale checkpoint
    (no COMPLETE, no simscale state: DeepSpeed copies only its own files): the checkpoint it was
    made from, after checking that its model states files are byte-identical copies of that
    checkpoint's. None for anything else (a simscale checkpoint, or not a universal folder)."""
    from simscale.train.checkpoint import SOURCE_KEY

    if (folder / COMPLETE).exists() or not (folder / "zero" / "optimizer_state.pt").is_file():
        return None
    first = _model_states_file(folder)
    try:
        with weights_only_loads():
            recorded = torch.load(first, map_location="cpu").get(SOURCE_KEY)
        source = Path(recorded["run_dir"]) / "checkpoints" / recorded["tag"]
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - any unreadable or foreign file: not one of ours
        raise CheckpointError(f"'{folder}' is a DeepSpeed universal checkpoint that no simscale run wrote "
                              "(its model states name no simscale checkpoint): resume from a simscale step_* "
                              "directory") from None
    problem = verify(source) if source.is_dir() else "it no longer exists"
    if problem is None:
        listed = read_meta(source)["files"]
        for f in sorted(folder.glob("*model_states.pt")):
            entry = listed.get(f.name)
            if entry is None or file_digest(f) != entry.get(ALGORITHM):
                problem = f"'{f.name}' differs from the one in it"
                break
    if problem:
        raise CheckpointError(f"'{folder}' is a DeepSpeed universal checkpoint of '{source}', which cannot be used "
                              f"({problem}); simscale's state (EMA target, step) lives only there: resume from "
                              "an intact step_* directory")
    return source

"""simscale's own per-rank checkpoint state, as safetensors (tensors) + JSON (everything else).

Nothing here is a pickle: a state file from someone else's run directory can be wrong, never run
code. One rank's state:
    simscale_rankRRRRR.safetensors   ema.master.<i> (fp32 EMA slices), rng.torch, rng.cuda.<d>
    simscale_rankRRRRR.json          loop state, EMA layout (names, numel, shapes), python/numpy RNG
Loaded back it has the shape the trainer used before (`{"loop", "ema", "rng"}`), so the EMA
layout stays per parameter and per rank, as simple to re-partition as before.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from simscale.errors import CheckpointError

FORMAT = "simscale-rank-state/1"


def stem(rank: int) -> str:
    return f"simscale_rank{rank:05d}"


def save_rank_state(tag_dir: Path, rank: int, state: dict[str, Any]) -> list[Path]:
    """Write this rank's {"loop": dict, "ema": EMA state_dict, "rng": LoopState.rng()}; returns the files."""
    ema, rng = state["ema"], state["rng"]
    tensors = {f"ema.master.{i}": m.detach().cpu().contiguous() for i, m in enumerate(ema["master"])}
    tensors["rng.torch"] = rng["torch"].contiguous()
    for d, s in enumerate(rng.get("cuda") or []):
        tensors[f"rng.cuda.{d}"] = s.cpu().contiguous()
    version, mt, gauss = rng["python"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    meta = {
        "format": FORMAT,
        "loop": state["loop"],
        "ema": {k: ema[k] for k in ("names", "layout", "numel", "shapes")},
        "rng": {"python": [version, list(mt), gauss],
                "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
                "cuda_devices": len(rng.get("cuda") or [])},
    }
    base = tag_dir / stem(rank)
    written = []
    for suffix, write in ((".safetensors", lambda p: save_file(tensors, str(p))),
                          (".json", lambda p: p.write_text(json.dumps(meta)))):
        final = base.with_suffix(suffix)
        tmp = final.with_name(f".{final.name}.tmp")
        write(tmp)
        os.replace(tmp, final)
        written.append(final)
    return written


def _read(tag_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    base = tag_dir / stem(rank)
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        tensors = load_file(str(base.with_suffix(".safetensors")))
    except FileNotFoundError as exc:
        raise CheckpointError(f"'{exc.filename}' is missing: the checkpoint '{tag_dir}' is incomplete; "
                              "resume from another one (--resume auto picks the newest complete)") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a damaged file, named, not a trace
        raise CheckpointError(f"simscale state of rank {rank} in '{tag_dir}' is unreadable "
                              f"({type(exc).__name__}); resume from another checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"'{base}.json' is not a simscale rank state ({FORMAT}); "
                              "resume from a checkpoint written by this simscale")
    return meta, tensors


def load_ema(tag_dir: Path, rank: int) -> dict[str, Any]:
    """One rank's EMA state_dict (names, layout, numel, shapes, master slices)."""
    meta, tensors = _read(tag_dir, rank)
    ema = dict(meta["ema"])
    try:
        ema["master"] = [tensors[f"ema.master.{i}"] for i in range(len(ema["names"]))]
    except KeyError as exc:
        raise CheckpointError(f"simscale state of rank {rank} in '{tag_dir}' lacks tensor {exc}; "
                              "resume from another checkpoint") from None
    return ema


def load_rank_state(tag_dir: Path, rank: int) -> dict[str, Any]:
    """{"loop": dict, "ema": EMA state_dict, "rng": the shape LoopState.rng() returns}."""
    meta, tensors = _read(tag_dir, rank)
    try:
        py, npy = meta["rng"]["python"], meta["rng"]["numpy"]
        rng = {"python": (int(py[0]), tuple(int(x) for x in py[1]), py[2]),
               "numpy": (str(npy[0]), np.asarray(npy[1], dtype=np.uint32), int(npy[2]), int(npy[3]), float(npy[4])),
               "torch": tensors["rng.torch"],
               "cuda": [tensors[f"rng.cuda.{d}"] for d in range(int(meta["rng"]["cuda_devices"]))] or None}
        return {"loop": dict(meta["loop"]), "ema": load_ema(tag_dir, rank), "rng": rng}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"simscale state of rank {rank} in '{tag_dir}' is malformed ({type(exc).__name__}: "
                              f"{exc}); resume from another checkpoint") from None

"""The DeepSpeed JSON config, built from the simscale config so the two never disagree.

A user may start from a file (`deepspeed.config=ds_configs/zero3_offload_cpu.json`): its ZeRO and
communication settings are kept, while batch sizes, precision, clipping and the optimizer always
come from the simscale config. A batch key in the file that disagrees is an error, not a
silent override.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simscale.config import Config
from simscale.errors import ConfigError


def _load_template(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config '{path}' not found: set deepspeed.config to a file in ds_configs/")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON (line {exc.lineno}): fix its syntax") from None


def build_ds_config(cfg: Config, world_size: int, on_cpu: bool) -> dict[str, Any]:
    d = cfg.deepspeed
    ds = _load_template(d.config) if d.config else {}
    ours = {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.optim.batch_size * cfg.optim.grad_accum * world_size,
    }
    for key, value in ours.items():
        if key in ds and ds[key] != value:
            raise ConfigError(
                f"DeepSpeed config '{d.config}' sets {key}={ds[key]} but the simscale config gives {value}: "
                "remove the key from the JSON file (batch sizes come from optim.*)"
            )
        ds[key] = value
    ds["gradient_clipping"] = cfg.optim.clip_grad
    ds["bf16"] = {"enabled": d.precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay,
            # torch's own AdamW with its fused kernel (CPU and CUDA): DeepSpeed's FusedAdam needs an
            # nvcc JIT build (~100 s, fails without a CUDA toolkit), and torch's default per-tensor
            # path made the CPU step 6x slower (bench/RESULTS.md, trainer overhead).
            "torch_adam": True, "fused": True,
        },
    }
    zero = ds.setdefault("zero_optimization", {})
    if d.config and "stage" in zero and zero["stage"] != d.zero_stage:
        raise ConfigError(
            f"DeepSpeed config '{d.config}' has zero_optimization.stage={zero['stage']} but "
            f"deepspeed.zero_stage={d.zero_stage}: make them agree"
        )
    zero["stage"] = d.zero_stage
    zero.setdefault("reduce_bucket_size", d.reduce_bucket_size)
    zero.setdefault("contiguous_gradients", True)
    zero.setdefault("overlap_comm", not on_cpu)
    if d.zero_stage == 3:
        # Persistent (never-partitioned) small params would keep a stale copy of the EMA target.
        zero.setdefault("stage3_param_persistence_threshold", d.persistence_threshold)
        zero.setdefault("stage3_prefetch_bucket_size", d.prefetch_bucket_size)
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
        # torch's own F.linear: DeepSpeed's replacement stays in torch after the engine is gone
        # (simscale/train/zero_init.py), and compiled blocks got no weight gradient through it.
        zero["memory_efficient_linear"] = False
    for kind, key in (("offload_optimizer", d.offload_optimizer), ("offload_param", d.offload_param)):
        if key != "none":
            entry = {"device": key, "pin_memory": not on_cpu}
            if key == "nvme":
                entry["nvme_path"] = d.nvme_path
            zero[kind] = entry
    if d.offload_optimizer != "none":
        # DeepSpeedCPUAdam is a compiled op; torch's fused AdamW runs on the offloaded CPU state.
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds

"""Write imported SIM weights as a simscale checkpoint that `simscale train --resume` continues from.

One plain process (world size 1) builds the run's DeepSpeed engine exactly as training does (same
ZeRO stage and precision: the resume fingerprint requires them), with the imported online weights
and BatchNorm statistics in the module, their exact fp32 values in the optimizer's fp32 master
(bf16 engines), the momentum branch as the fp32 EMA master, fresh AdamW moments, and the loop at
`start_step` (the lr/momentum schedules are pure functions of the step). `Checkpointer.save` writes
it. A run on any other world size resumes it through DeepSpeed's universal checkpoint, as any
simscale checkpoint. The target needs no EMA update before the first step (`ema_pending` false):
the first loss uses the official momentum branch as it was saved.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from simscale.config import Config, resolve_lr, save_yaml, to_dict
from simscale.errors import SimscaleError


def _load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy every named parameter and buffer (gathered under ZeRO-3, whose world here is one rank)."""
    from simscale.zero import gathered

    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    params = [p for n, p in model.named_parameters() if n in tensors]
    with torch.no_grad(), gathered(params, modifier_rank=0):
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].dtype))


def _write_out_fresh_moments(zero3) -> None:
    """Give each fp32 partition of a ZeRO-3 optimizer the AdamW state its first step would create
    lazily (zero moments, step 0, as torch's AdamW makes them): the numbers of a fresh optimizer,
    but written into the checkpoint. DeepSpeed's ZeRO-3 universal converter reads the Adam moments
    of every partition (ZeRO-1/2's falls back to the fp32 weights): without them a ZeRO-3 import
    could not move to another world size."""
    base = zero3.optimizer  # torch's AdamW (ds_config: torch_adam); its param_groups stay empty between steps
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for flat in zero3.fp32_partitioned_groups_flat:
        state = {"step": torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu"),
                 "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        if base.defaults.get("amsgrad"):
            state["max_exp_avg_sq"] = torch.zeros_like(flat)
        base.state[flat] = state


def write_run(cfg: Config, tensors: dict[str, torch.Tensor], start_step: int, source: dict[str, Any]) -> Path:
    """`tensors`: simscale SIM state-dict names -> fp32 values (names.map_pretrain). Returns the step dir."""
    import deepspeed

    from simscale.data.partitions import auto_partitions
    from simscale.model.sim import SIM
    from simscale.train.checkpoint import Checkpointer
    from simscale.train.distributed import init_distributed
    from simscale.train.ds_config import build_ds_config
    from simscale.train.ema import ShardedEMA
    from simscale.train.loop import param_groups
    from simscale.train.loop_state import LoopState
    from simscale.train.zero_init import partitioned_init

    info = init_distributed(cfg.run.collective_timeout_s)
    if info.world_size != 1:
        raise SimscaleError(f"`simscale import` runs as one plain process, not under a launcher of "
                            f"{info.world_size} ranks: run it with python -m simscale / simscale")
    cfg, _ = resolve_lr(cfg, 1)
    # Partitions fixed for the run: the fresh-start rule at world size 1 (<= 256, dividing the batch),
    # which later runs on any world size dividing it continue in (or data.partitions=N at import).
    cfg.data.partitions = cfg.data.partitions or auto_partitions(1, cfg.optim.batch_size, cfg.data.num_workers)
    run_dir = Path(cfg.run.dir)
    ckpt = Checkpointer(run_dir, 0, 1, cfg.run.keep_last)
    if ckpt.complete_tags():
        raise SimscaleError(f"'{run_dir}' already holds checkpoints: import into a new --out directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")

    ds_config = build_ds_config(cfg, 1, info.device.type == "cpu")
    torch.manual_seed(cfg.run.seed)
    if cfg.deepspeed.zero_stage == 3:
        with partitioned_init(ds_config):  # torch left as found (train/zero_init.py), as the Trainer builds
            model = SIM(cfg)
    else:
        model = SIM(cfg)
    online = {k: v for k, v in tensors.items() if not k.startswith("target.")}
    _load_into(model, tensors)  # the target too: its BatchNorm statistics live in the module
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_config)
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in engine.module.named_parameters():  # bf16 engines: the fp32 master, not a bf16 round trip
        if p.requires_grad and name in online:
            safe_set_full_fp32_param(p, online[name].to(info.device))
    if cfg.deepspeed.zero_stage == 3:
        _write_out_fresh_moments(engine.optimizer)
    ema = ShardedEMA(engine.module.ema_pairs())
    if ema.names:
        ema.load_full({n: tensors[f"target.{n}"] for n in ema.names}, rank=0)
    loop = LoopState(step=start_step)
    state = {"loop": dataclasses.asdict(loop), "ema": ema.state_dict(), "rng": loop.rng()}
    meta = {"config": to_dict(cfg), "ema_layout": ema.state_dict()["layout"], "imported_from": source}
    return ckpt.save(engine, start_step, state, meta)

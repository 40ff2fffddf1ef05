"""Builds, steps and frees ZeRO-3 engines as simscale and its benchmarks do; after each, reports
which torch attributes that `deepspeed.zero.Init` patches are not what they were before.

    python tests/train/zero_init_worker.py SHARDS RUN_DIR      # prints one JSON line

One process, world size 1 (gloo), the tiny preset at ZeRO-3 fp32:
- trainer: `Trainer.fit` for 2 steps, then the Trainer dropped;
- bench: bench/gpu_bench.py's build_engine, one step, its free_engine;
- guard: `partitioned_init` with DeepSpeed's linear replacement switched on in the config;
- raw: plain `deepspeed.zero.Init` with the same config (the check's control: it must see F.linear
  replaced, or the checks above prove nothing).
"""
from __future__ import annotations

import gc
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TORCH_LINEAR = torch._C._nn.linear  # what torch.nn.functional.linear is in a fresh process


def state(before) -> dict:
    from simscale.train.zero_init import changed_since

    return {"linear_is_torch": torch.nn.functional.linear is TORCH_LINEAR, "changed": changed_since(before)}


def main() -> None:
    shards, run_dir = sys.argv[1], sys.argv[2]
    import deepspeed

    from simscale.config import build_config
    from simscale.model.sim import SIM
    from simscale.train.ds_config import build_ds_config
    from simscale.train.loop import Trainer
    from simscale.train.zero_init import partitioned_init, restore, snapshot

    before = snapshot()
    out = {"start": state(before)}
    over = [f"data.train={shards}", f"run.dir={run_dir}", "data.num_workers=1", "optim.batch_size=4",
            "optim.max_steps=2", "log.every=1", "log.tensorboard=false", "log.progress=false",
            "run.save_every=1000", "deepspeed.zero_stage=3", "deepspeed.precision=fp32"]
    cfg = build_config("tiny", overrides=over)
    trainer = Trainer(cfg, resume="none")
    out["trainer_built"] = state(before)
    out["trainer_steps"] = trainer.fit().step
    info = trainer.info
    trainer = None
    gc.collect()
    out["trainer"] = state(before)

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse(["--cpu"])
    bcfg = bench.make_config(args, 3, False, 4)
    engine, ema = bench.build_engine(bcfg, info)
    from step_bench import synthetic_batch  # bench/ is on sys.path once gpu_bench is imported

    loss = bench.make_step(bcfg, engine, ema, synthetic_batch(bcfg, 4), 0)()
    out["bench_loss_finite"] = bool(torch.isfinite(loss))
    ema = None
    bench.free_engine(engine, info.device)
    engine = None
    out["bench"] = state(before)

    ds = build_ds_config(cfg, 1, on_cpu=True)
    ds["zero_optimization"]["memory_efficient_linear"] = True  # DeepSpeed's default
    with partitioned_init(ds):
        SIM(cfg)
        out["guard_inside_linear_is_torch"] = torch.nn.functional.linear is TORCH_LINEAR
    out["guard"] = state(before)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        SIM(cfg)
    out["raw"] = state(before)
    restore(before)
    out["raw_restored"] = state(before)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""DeepSpeed's per-step cost isolated: vit_s16's parameters with almost no compute.

    OMP_NUM_THREADS=1 python bench/zero_overhead_bench.py --host-memory default|kept --steps 15

vit_s16 at 32 px with batch 2 keeps all 32.5M trainable parameters (224 tensors) while forward
and backward shrink to a few ms, so a step's time is the gradient and optimizer plumbing:
- bare: loss.backward + clip_grad_norm_ + torch AdamW (default implementation) + zero_grad;
- bare_fused: the same with AdamW(fused=True), the kernel the trainer configures in DeepSpeed;
- z2 / z1: the SIM model in a DeepSpeed engine (ZeRO-2 / ZeRO-1, fp32, world size 1) with the
  trainer's DeepSpeed config; z2_nocontig: ZeRO-2 with contiguous_gradients off.
Steps of all variants are interleaved; the median, min and max per variant are printed, and
whether the DeepSpeed variants end with bitwise equal parameters. `--host-memory kept` applies
simscale.train.host_memory.keep_freed_host_memory() first (what the Trainer does on a CPU).
The process's user and system CPU seconds are printed at the end (page faults show as system).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import torch  # noqa: E402

VARIANTS = {"bare": None, "bare_fused": None, "z2": {}, "z2_nocontig": {"contiguous_gradients": False},
            "z1": {"stage": 1}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host-memory", choices=["default", "kept"], default="default")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    import deepspeed
    from step_bench import synthetic_batch

    from simscale.config import build_config, resolve_lr
    from simscale.data.photometric import apply_photometric
    from simscale.model.sim import SIM
    from simscale.train.distributed import init_distributed
    from simscale.train.ds_config import build_ds_config
    from simscale.train.host_memory import keep_freed_host_memory
    from simscale.train.loop import param_groups

    kept = keep_freed_host_memory() if args.host_memory == "kept" else False
    cfg = build_config("vit_s16", overrides=["model.img_size=32", "optim.batch_size=2",
                                             "deepspeed.precision=fp32", "optim.max_steps=100"])
    init_distributed()
    cfg, _ = resolve_lr(cfg, 1)
    b = synthetic_batch(cfg, 2, seed=0)
    views = (apply_photometric(b["view_a"], b["photo_a"], view="a"),
             apply_photometric(b["view_b"], b["photo_b"], view="b"), b["geometry"], b["mask"])
    o = cfg.optim
    steps = {}
    for name in args.variants:
        torch.manual_seed(0)
        model = SIM(cfg).train()
        if VARIANTS[name] is None:
            opt = torch.optim.AdamW(param_groups(model), lr=o.lr, betas=o.betas, eps=o.eps,
                                    weight_decay=o.weight_decay, fused=True if name == "bare_fused" else None)

            def step(model=model, opt=opt):
                loss, _ = model.loss(model(*views))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.online_parameters(), o.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return model
        else:
            ds = build_ds_config(cfg, 1, on_cpu=True)
            ds["zero_optimization"].update(VARIANTS[name])
            engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds)
            engine.train()

            def step(engine=engine):
                loss, _ = engine.module.loss(engine(*views))
                engine.backward(loss)
                engine.step()
                return engine.module
        steps[name] = step
    times = {n: [] for n in steps}
    last = {}
    for i in range(args.steps + 2):  # 2 warm-up steps per variant
        for name, step in steps.items():
            t0 = time.perf_counter()
            last[name] = step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    ds_names = [n for n in steps if VARIANTS[n] is not None]
    for name, t in times.items():
        row = {"variant": name, "host_memory": args.host_memory, "applied": kept,
               "median_ms": round(1000 * statistics.median(t), 1), "min_ms": round(1000 * min(t), 1),
               "max_ms": round(1000 * max(t), 1)}
        if name in ds_names:
            row["params_equal"] = {m: all(torch.equal(a, c) for a, c in zip(last[name].parameters(), last[m].parameters()))
                                   for m in ds_names if m != name}
        print(json.dumps(row))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2), "minor_faults": ru.ru_minflt,
                      "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()

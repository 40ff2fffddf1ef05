"""Step speed, achieved FLOP/s / MFU and peak memory of a SIM training step on one device.

    python bench/step_bench.py --preset tiny --batch 32 --steps 20               # CPU
    python bench/step_bench.py --preset vit_l16 --batch 64 --ckpt 1 --precision bf16  # GPU (bench/gpu.sh)

Runs the real model (SIM on timm blocks), the real batched photometric ops and the real UniGrad
loss inside a real DeepSpeed engine (world size 1) on synthetic uint8 views with valid
geometry and masks (data loading is benchmarked separately in bench/data_bench.py). FLOPs are
counted analytically (simscale.model.flops), so MFU = achieved / the device's bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def synthetic_batch(cfg, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """uint8 views, photometric params and masks drawn by simscale's own data code."""
    import numpy as np

    from simscale.data.masking import block_mask
    from simscale.data.photometric import draw_params

    rng = np.random.default_rng(seed)
    g = cfg.model.img_size // cfg.model.patch_size
    size = cfg.model.img_size
    m = cfg.data.mask
    masks = np.stack([block_mask(rng, g, m.ratio, m.min_block_patches, m.min_aspect) for _ in range(batch)])
    geo = np.stack([[rng.uniform(-.3, .3), rng.uniform(-.3, .3), rng.uniform(.5, 2), rng.uniform(.5, 2),
                     rng.integers(0, 2), rng.uniform(.5, 1.5)] for _ in range(batch)]).astype(np.float32)
    return {
        "view_a": torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)),
        "view_b": torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)),
        "photo_a": torch.from_numpy(np.stack([draw_params(rng, "a", True) for _ in range(batch)])),
        "photo_b": torch.from_numpy(np.stack([draw_params(rng, "b", True) for _ in range(batch)])),
        "geometry": torch.from_numpy(geo),
        "mask": torch.from_numpy(masks),
    }


def build(cfg, info, optimizer: str = "simscale"):
    """SIM in a DeepSpeed engine as the Trainer builds it (ZeRO-3: straight into partitions)."""
    import deepspeed

    from simscale.model.sim import SIM
    from simscale.train.ds_config import build_ds_config
    from simscale.train.ema import ShardedEMA
    from simscale.train.loop import param_groups
    from simscale.train.zero_init import partitioned_init

    ds_cfg = build_ds_config(cfg, info.world_size, on_cpu=info.device.type == "cpu")
    if optimizer != "simscale":  # torch's AdamW inside DeepSpeed (same math; no JIT-built FusedAdam)
        ds_cfg["optimizer"]["params"]["torch_adam"] = True
        if optimizer == "torch_fused":
            ds_cfg["optimizer"]["params"]["fused"] = True
    torch.manual_seed(0)
    if cfg.deepspeed.zero_stage == 3:
        with partitioned_init(ds_cfg):  # torch left as it was (simscale/train/zero_init.py)
            model = SIM(cfg)
    else:
        model = SIM(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_cfg)
    return engine, ShardedEMA(engine.module.ema_pairs())


def make_step(cfg, engine, ema, batch):
    from simscale.data.photometric import apply_photometric

    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32

    def step() -> float:
        ema.update(0.996)
        a = apply_photometric(batch["view_a"], batch["photo_a"], view="a").to(dtype)
        b = apply_photometric(batch["view_b"], batch["photo_b"], view="b").to(dtype)
        out = engine(a, b, batch["geometry"], batch["mask"])
        loss, _ = engine.module.loss(out)
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    return step


def overrides(args) -> list[str]:
    over = [f"optim.batch_size={args.batch}", "optim.max_steps=1000"]
    if args.ckpt >= 0:
        over.append(f"model.grad_checkpointing={bool(args.ckpt)}")
    if args.zero >= 0:
        over.append(f"deepspeed.zero_stage={args.zero}")
    if args.precision:
        over.append(f"deepspeed.precision={args.precision}")
    if getattr(args, "img_size", 0):
        over.append(f"model.img_size={args.img_size}")
    return over + list(getattr(args, "extra", []) or [])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ckpt", type=int, default=-1, help="activation checkpointing 1/0 (-1: preset)")
    p.add_argument("--zero", type=int, default=-1)
    p.add_argument("--precision", default="", help="bf16 | fp32 (default: the preset's)")
    p.add_argument("--img-size", type=int, default=0, help="override model.img_size (0: preset)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available (DS_ACCELERATOR is set from it before deepspeed loads)")
    p.add_argument("--optimizer", default="simscale", choices=["simscale", "torch", "torch_fused"],
                   help="simscale: the trainer's DeepSpeed optimizer config (GPU: DeepSpeed FusedAdam, "
                        "JIT-compiled; CPU: torch AdamW); torch / torch_fused: torch.optim.AdamW "
                        "(fused=True) inside DeepSpeed")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value config overrides")
    p.add_argument("--json", default="", help="append one JSON line of results here")
    args = p.parse_args()

    from simscale.config import build_config, resolve_lr
    from simscale.model.flops import train_flops_per_sample
    from simscale.train.distributed import init_distributed
    from simscale.train.metrics import device_peak_flops, memory_gb

    info = init_distributed()
    cfg, _ = resolve_lr(build_config(args.preset, overrides=overrides(args)), info.world_size)
    dev = info.device
    engine, ema = build(cfg, info, args.optimizer)
    batch = {k: v.to(dev) for k, v in synthetic_batch(cfg, args.batch).items()}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = make_step(cfg, engine, ema, batch)

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    flops = train_flops_per_sample(cfg) * args.batch / dt
    peak = device_peak_flops()
    res = {"preset": args.preset, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "img_size": cfg.model.img_size, "batch": args.batch, "zero": cfg.deepspeed.zero_stage,
           "precision": cfg.deepspeed.precision, "grad_ckpt": cfg.model.grad_checkpointing,
           "optimizer": args.optimizer, "step_s": round(dt, 4), "img_per_s": round(args.batch / dt, 2),
           "gflop_per_img": round(train_flops_per_sample(cfg) / 1e9, 3),
           "tflops": round(flops / 1e12, 4), "mfu": round(flops / peak, 4) if peak else None,
           "peak_mem_gb": round(memory_gb(), 2), "loss": loss, "threads": torch.get_num_threads()}
    print(json.dumps(res))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")


def _pick_accelerator() -> None:
    """DS_ACCELERATOR from --device (or CUDA's presence) before anything imports deepspeed."""
    import sys

    dev = "auto"
    for i, a in enumerate(sys.argv):
        if a == "--device" and i + 1 < len(sys.argv):
            dev = sys.argv[i + 1]
        elif a.startswith("--device="):
            dev = a.split("=", 1)[1]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # simscale picks cuda whenever torch sees one
    os.environ.setdefault("DS_ACCELERATOR", dev)


if __name__ == "__main__":
    _pick_accelerator()
    main()

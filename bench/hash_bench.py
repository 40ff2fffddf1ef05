"""Checksum cost of checkpoints: hashlib sha256 vs blake2b throughput on one core, and the size of
a ViT-L/16 SIM checkpoint (parameters counted on the meta device, nothing allocated).

    OMP_NUM_THREADS=1 python bench/hash_bench.py --mb 1024 [--file /tmp/blob]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time


def digest(name: str, path: str, chunk: int = 4 << 20) -> float:
    h, buf = hashlib.new(name), bytearray(chunk)
    view = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return time.perf_counter() - t


def vit_l_checkpoint_bytes() -> float:
    import torch

    from simscale.config import build_config
    from simscale.model.sim import SIM

    with torch.device("meta"):
        m = SIM(build_config("vit_l16"))
    trainable = sum(p.numel() for p in m.online_parameters() if p.requires_grad)
    target = sum(t.numel() for _, _, t in m.ema_pairs())
    total = sum(p.numel() for p in m.parameters())
    # bf16 module weights + fp32 master, Adam m and v of the trainable ones + simscale's fp32 EMA master
    return 2 * total + 12 * trainable + 4 * target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--file", default="/tmp/simscale_hash_bench.bin")
    args = ap.parse_args()
    if not os.path.exists(args.file):
        with open(args.file, "wb") as f:
            for _ in range(args.mb >> 4):
                f.write(os.urandom(16 << 20))
    size = os.path.getsize(args.file)
    digest("sha256", args.file)  # warm the page cache: a checkpoint is hashed right after it is written
    rates = {}
    for name in ("sha256", "blake2b"):
        rates[name] = size / digest(name, args.file)
        print(f"{name}: {rates[name] / 1e9:.2f} GB/s on one core ({size / 1e9:.2f} GB, page cache warm)")
    ckpt = vit_l_checkpoint_bytes()
    for ranks in (1, 8):
        print(f"ViT-L/16 SIM checkpoint {ckpt / 1e9:.2f} GB, sha256 over {ranks} rank(s): "
              f"{ckpt / ranks / rates['sha256']:.1f} s per rank")


if __name__ == "__main__":
    main()

"""EMA update time and memory for a ViT-L-sized parameter list (CPU, world size 1, synthetic).

    OMP_NUM_THREADS=1 python bench/ema_bench.py [--root DIR] [--dtype fp32|bf16] [--steps 5]

Online/target pairs with the shapes of ViT-L/16's 24 blocks plus patch embedding (~304M
parameters each side). `--root` imports `simscale` from another checkout (e.g. `git archive main`
unpacked), so the same script times before and after. Each (root, dtype) runs in its own process:
peak RSS (ru_maxrss) after building the EMA and after the timed updates; their difference is what
the updates allocated at their peak (temporaries). On a shared machine the process CPU time
per update (`update_cpu_s_median`) is steadier than the wall time. fp32: the target's storage is the master;
bf16: online and target bf16, master fp32 (a bf16 DeepSpeed engine under ZeRO-1/2).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def vit_l_shapes(depth: int = 24, dim: int = 1024, mlp: int = 4096) -> list[tuple[int, ...]]:
    shapes = [(dim, 3, 16, 16), (dim,), (1, 1, dim)]  # patch embedding, its bias, cls token
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return shapes


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, args.root or str(Path(__file__).resolve().parents[1]))
    import torch

    torch.set_num_threads(1)
    from simscale.train.ema import ShardedEMA

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i, shape in enumerate(vit_l_shapes()):
        online = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        target = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        pairs.append((f"p{i}", online, target))
    numel = sum(o.numel() for _, o, _ in pairs)
    ema = ShardedEMA(pairs)
    built = rss_gb()
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        ema.update(0.996)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    import simscale

    print(json.dumps({"simscale": str(Path(simscale.__file__).parent.parent), "dtype": args.dtype, "params_M": round(numel / 1e6, 1),
                      "tensors": len(pairs), "update_s_median": round(statistics.median(times), 3),
                      "update_s_min": round(min(times), 3),
                      "update_cpu_s_median": round(statistics.median(cpu), 3), "peak_rss_after_build_gb": round(built, 2),
                      "peak_rss_after_updates_gb": round(rss_gb(), 2),
                      "update_peak_extra_gb": round(rss_gb() - built, 2)}))


if __name__ == "__main__":
    main()

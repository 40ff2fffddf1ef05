"""model.compile=true against eager: the same Trainer step, two engines, interleaved (CPU or GPU).

    OMP_NUM_THREADS=1 python bench/compile_bench.py --preset tiny --batch 64
    OMP_NUM_THREADS=1 python bench/compile_bench.py --preset vit_s16 --img-size 112 --batch 32 --extra deepspeed.precision=fp32

One process, world size 1: two `Trainer`s on the same real JPEG shards (bench/overhead_bench.py's
`make_shards`), one with `model.compile=true`. After warm-up steps (the first compiled ones pay
for the compilation, reported as `compile_warmup_s`), `train_step` alternates between the two
for `--rounds` x `--steps` steps each; the ratio is total compiled time / total eager time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("SIMSCALE_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "simscale_bench_data"))
    p.add_argument("--extra", nargs="*", default=[])
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from overhead_bench import make_shards

    from simscale.config import build_config
    from simscale.train.distributed import init_distributed
    from simscale.train.loop import Trainer

    steps = args.warmup + args.rounds * args.steps
    shards = make_shards(Path(args.cache), 3 * -(-(steps + 2) * args.batch // 3), 160)
    info = init_distributed()
    trainers, batches = {}, {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        over = [f"data.train={shards}", f"optim.batch_size={args.batch}", "data.num_workers=1",
                "optim.max_steps=100000", "run.save_every=1000000", "log.tensorboard=false",
                f"run.dir={tempfile.mkdtemp(prefix='compile_run_')}", f"model.compile={flag}", *args.extra]
        if args.img_size:
            over.append(f"model.img_size={args.img_size}")
        tr = Trainer(build_config(args.preset, overrides=over), resume="none", dist_info=info)
        tr.engine.train()
        trainers[name], batches[name] = tr, tr._batches()
    warm = {}
    for name, tr in trainers.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            tr.train_step(batches[name], read=False)
        tr.read_losses()
        warm[name] = time.perf_counter() - t0
    times = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, tr in trainers.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                tr.train_step(batches[name], read=False)
                tr.read_losses()  # the step's work is done when its loss is on the host
                times[name].append(time.perf_counter() - t0)
    out = {"preset": args.preset, "batch": args.batch, "img_size": trainers["eager"].cfg.model.img_size,
           "threads": args.threads, "timed_steps": len(times["eager"]),
           "eager_step_s": round(statistics.median(times["eager"]), 4),
           "compiled_step_s": round(statistics.median(times["compiled"]), 4),
           "ratio_compiled_over_eager": round(sum(times["compiled"]) / sum(times["eager"]), 3),
           "warmup_s": {k: round(v, 1) for k, v in warm.items()}, "torch": torch.__version__}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Trainer overhead: the full simscale train step against the same math in a bare PyTorch loop.

    OMP_NUM_THREADS=1 python bench/overhead_bench.py --preset tiny --batch 64
    OMP_NUM_THREADS=1 python bench/overhead_bench.py --preset vit_s16 --img-size 112 --batch 32

One process, world size 1 (a real gloo process group, as `simscale train` without a launcher).
- trainer: `simscale.train.loop.Trainer` on real JPEG shards (written by `simscale prepare`
  from tests/data/images.py photographs) through TwoViewStream (DataLoader workers), the
  DeepSpeed engine (ZeRO stage and precision of the preset), the sharded fp32 EMA, the schedules
  and the metrics sink (JSONL + TensorBoard). Each timed step is the body of `Trainer.fit`:
  `train_step` + the metrics dict + `sink.log` (checkpoint saves are outside the timed steps:
  run.save_every is beyond the run).
- bare: the same SIM model (same seed), `torch.optim.AdamW` (same groups, betas, eps, weight
  decay, lr), `clip_grad_norm_` at the same threshold, the same `apply_photometric` calls, batches
  taken from the same stream beforehand and held in memory (uint8, as the stream gives them).
  No EMA, no DeepSpeed, no logging. A second variant adds a plain `torch._foreach_lerp_` EMA
  of the target (the method needs one; it shows what an EMA costs at its cheapest).
Trainer and bare steps are interleaved in rounds (machine noise hits both alike); the ratio is
total trainer time / total bare time over the timed rounds; `round_ratio` gives the median and
spread of the per-round ratios (trainer / bare time of the same round: with `--steps 1` each
trainer step is paired with the bare step next to it, the steadiest figure on a shared machine).
`--bare-fused-adam` gives the bare loop torch's fused AdamW, the kernel the trainer configures
inside DeepSpeed (the default bare loop keeps torch's default AdamW). Per-part timers (perf_counter
around the engine's forward/backward/step, the EMA update, the data wait and the sink) show
where the difference goes.
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
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_shards(root: Path, images: int, max_side: int) -> Path:
    """Real JPEG shards (cached under `root`): `images` photographs in 3 class folders."""
    out = root / f"shards_{images}_{max_side}"
    if (out / "manifest.json").is_file():
        return out
    import importlib.util

    from simscale.data.prepare import Options, prepare

    spec = importlib.util.spec_from_file_location("bench_images", ROOT / "tests" / "data" / "images.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.class_folders(root / f"src_{images}", per_class=images // 3)
    prepare([str(root / f"src_{images}")], out, Options(shard_size=100, max_side=max_side), workers=1,
            progress=False)
    return out


class Timers:
    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, key: str, dt: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + dt

    def wrap(self, obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(key, time.perf_counter() - t0)

        setattr(obj, name, timed)


def trainer_step(tr, batches, timers: Timers) -> float:
    """The per-step body of Trainer.fit (train_step + metrics + sink.log), timed whole."""
    s, cfg = tr.state, tr.cfg
    global_batch = cfg.optim.batch_size * tr.accum * tr.info.world_size
    t0 = time.perf_counter()
    c0 = time.process_time()
    done = s.step + 1  # steps completed after this one: how fit numbers (and logs) them
    logging = done % cfg.log.every == 0 or done == 1 or done == tr.schedule.total_steps
    m = tr.train_step(batches, read=logging)
    dt = time.perf_counter() - t0
    timers.add("data_wait", m["data_time"])
    step = s.step  # optimizer steps completed, as Trainer.fit numbers them
    stats = m.pop("loss_stats")
    t1 = time.perf_counter()
    if logging:
        achieved = tr.flops_per_sample * global_batch / dt / tr.info.world_size
        from simscale.train.metrics import memory_gb

        m.update(images_per_s=global_batch / dt, step_time=dt, data_wait=m.pop("data_time") / dt,
                 tflops_per_device=achieved / 1e12, mfu=achieved / tr.peak if tr.peak else None,
                 memory_gb=memory_gb(), epoch=s.epoch)
        m.update({k: float(v) for k, v in stats.items() if k != "loss"})
        tr.sink.log(step, m)
    else:
        tr.sink.advance(step)
    timers.add("sink", time.perf_counter() - t1)
    timers.add("cpu_time", time.process_time() - c0)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=0, help="override model.img_size (0: preset)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round, per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="data.num_workers of the trainer's stream")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--images", type=int, default=0, help="images in the shards (0: enough for one epoch)")
    p.add_argument("--max-side", type=int, default=160)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "simscale_bench_data"))
    p.add_argument("--extra", nargs="*", default=[], help="more key=value config overrides")
    p.add_argument("--fused-adam", action="store_true",
                   help="experiment: add fused=True to the DeepSpeed optimizer params (torch's fused CPU AdamW)")
    p.add_argument("--bare-fused-adam", action="store_true",
                   help="bare loop: torch.optim.AdamW(fused=True), the trainer's kernel (default: torch's default)")
    p.add_argument("--profile", type=int, default=0, help="then run N trainer steps under cProfile, print the top")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from simscale.config import build_config
    from simscale.data.photometric import apply_photometric
    from simscale.model.sim import SIM
    from simscale.train.distributed import init_distributed
    from simscale.train.loop import Trainer, param_groups

    trainer_steps = args.warmup + args.rounds * args.steps
    images = args.images or 3 * -(-(trainer_steps + 2) * args.batch // 3)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shards = make_shards(cache, images, args.max_side)
    prep_s = time.perf_counter() - t0

    run_dir = tempfile.mkdtemp(prefix="overhead_run_")
    over = [f"data.train={shards}", f"optim.batch_size={args.batch}", f"data.num_workers={args.workers}",
            "optim.max_steps=100000", "run.save_every=1000000", f"run.dir={run_dir}", *args.extra]
    if args.img_size:
        over.append(f"model.img_size={args.img_size}")
    cfg = build_config(args.preset, overrides=over)
    if args.fused_adam:  # patched here, not in simscale: an experiment for the trainer's ds_config
        import simscale.train.loop as loop

        def with_fused(*a, _orig=loop.build_ds_config, **k):
            ds = _orig(*a, **k)
            ds["optimizer"]["params"]["fused"] = True
            return ds

        loop.build_ds_config = with_fused
    info = init_distributed()
    tr = Trainer(cfg, resume="none", dist_info=info)
    cfg = tr.cfg  # lr resolved
    if tr.stream.batches_per_epoch < trainer_steps:
        print(f"note: epoch of {tr.stream.batches_per_epoch} batches < {trainer_steps} trainer steps: "
              "an epoch boundary (new DataLoader) falls inside the run", file=sys.stderr)
    tt = Timers()
    tt.wrap(tr.engine, "forward", "forward")
    tt.wrap(tr.engine, "backward", "backward")
    tt.wrap(tr.engine, "step", "optimizer_step")
    tt.wrap(tr.ema, "update", "ema")
    tt.wrap(tr.model, "loss", "loss")
    tt.wrap(tr, "_to_device", "photometric")
    tr.engine.train()
    batches = tr._batches()

    # The bare loop: same model and math, no DeepSpeed, no stream, no EMA, no logging.
    torch.manual_seed(cfg.run.seed)
    model = SIM(cfg).train()
    groups = param_groups(model)
    o = cfg.optim
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                            fused=True if args.bare_fused_adam else None)
    mem = [b for _, b in zip(range(4), tr.stream.batches(epoch=1))]  # held in memory
    ema_pairs = [(po, pt) for _, po, pt in model.ema_pairs()]
    bt = Timers()

    def bare_step(i: int, ema: bool) -> float:
        t0 = time.perf_counter()
        c0 = time.process_time()
        b = mem[i % len(mem)]
        if ema:
            t = time.perf_counter()
            with torch.no_grad():
                torch._foreach_lerp_([pt for _, pt in ema_pairs], [po for po, _ in ema_pairs], 0.004)
            bt.add("ema", time.perf_counter() - t)
        t = time.perf_counter()
        a = apply_photometric(b["view_a"], b["photo_a"], view="a")
        v = apply_photometric(b["view_b"], b["photo_b"], view="b")
        t1 = time.perf_counter()
        out = model(a, v, b["geometry"], b["mask"])
        tl = time.perf_counter()
        loss, _ = model.loss(out)
        t2 = time.perf_counter()
        bt.add("loss", t2 - tl)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.online_parameters(), o.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        t4 = time.perf_counter()
        for k, d in (("photometric", t1 - t), ("forward", tl - t1), ("backward", t3 - t2), ("optimizer_step", t4 - t3)):
            bt.add(k, d)
        bt.add("cpu_time", time.process_time() - c0)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        trainer_step(tr, batches, tt)
        bare_step(0, False)
        bare_step(0, True)
    tt.t.clear()
    bt.t.clear()
    times = {"trainer": [], "bare": [], "bare_ema": []}
    bare_parts: dict[str, float] = {}
    i = 0
    round_ratios = []
    for _ in range(args.rounds):
        for _ in range(args.steps):
            times["trainer"].append(trainer_step(tr, batches, tt))
        bt.t.clear()
        for _ in range(args.steps):
            times["bare"].append(bare_step(i, False))
            i += 1
        round_ratios.append(sum(times["trainer"][-args.steps:]) / sum(times["bare"][-args.steps:]))
        for k, v in bt.t.items():
            bare_parts[k] = bare_parts.get(k, 0.0) + v
        for _ in range(args.steps):
            times["bare_ema"].append(bare_step(i, True))
            i += 1
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.profile):
            trainer_step(tr, batches, Timers())
        prof.disable()
        st = pstats.Stats(prof, stream=sys.stderr)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(40)
    tr.sink.close()

    n = args.rounds * args.steps
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "preset": cfg.preset, "img_size": cfg.model.img_size, "batch": args.batch,
        "zero": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
        "threads": torch.get_num_threads(), "workers": args.workers, "ds_fused_adam": args.fused_adam, "timed_steps": n,
        "images": images, "prep_s": round(prep_s, 1),
        "trainer_step_s": round(mean["trainer"], 4), "bare_step_s": round(mean["bare"], 4),
        "bare_ema_step_s": round(mean["bare_ema"], 4),
        "ratio_mean": round(mean["trainer"] / mean["bare"], 3),
        "ratio_median": round(med["trainer"] / med["bare"], 3),
        "ratio_vs_bare_ema": round(mean["trainer"] / mean["bare_ema"], 3),
        # per-round trainer/bare ratios: median, quartiles, extremes
        "round_ratio": {"median": round(statistics.median(round_ratios), 3),
                        "q1_q3": [round(q, 3) for q in statistics.quantiles(round_ratios, n=4)[::2]]
                        if len(round_ratios) > 1 else None,
                        "min_max": [round(min(round_ratios), 3), round(max(round_ratios), 3)]},
        "bare_fused_adam": args.bare_fused_adam,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        # CPU time of this process (all its threads; DataLoader workers excluded): less sensitive
        # to other jobs on a shared machine than wall time
        "ratio_cpu_time": round(tt.t["cpu_time"] / bare_parts["cpu_time"], 3),
        "trainer_parts_ms": {k: round(1000 * v / n, 2) for k, v in sorted(tt.t.items())},
        "bare_parts_ms": {k: round(1000 * v / n, 2) for k, v in sorted(bare_parts.items())},
        "trainer_img_per_s": round(args.batch / mean["trainer"], 1),
        "bare_img_per_s": round(args.batch / mean["bare"], 1),
    }
    print(json.dumps(res))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

"""One process for bench/gpu.sh: ViT-L/16 SIM throughput sweep, kernel profile, trainer smoke run.

    python3 bench/gpu_bench.py --out OUT            # GPU: ViT-L/16 bf16 (bench/gpu.sh runs it)
    python3 bench/gpu_bench.py --cpu --out OUT      # the same lines on CPU: tiny preset, fp32

Phases, each guarded (a crash is recorded in the JSON and the next phase runs):
1. matmul: the device's dense matrix rate (bf16 8192^3 on GPU), a measured ceiling beside the
   datasheet peak used for MFU/HFU.
2. sweep: for ZeRO-2 and ZeRO-3, activation checkpointing on and off, per-GPU batches 64, 128,
   256, ... until an OOM (caught: the engine is freed and the next series starts on a fresh one)
   or the time budget. Each point: the Trainer's engine (same DeepSpeed config, fused AdamW,
   sharded EMA, photometric ops on the device, UniGrad) on synthetic uint8 views, warm-up steps,
   then >= 10 steps timed with CUDA events; img/s, MFU (model FLOPs: no recomputation), HFU
   (executed FLOPs: recomputation included), peak memory.
3. profile: the best point again under torch.profiler; the top kernels go to OUT/profile.txt.
4. compile: model.compile=true against eager at one ZeRO-2 point (the largest batch the sweep
   ran without recomputation, at most --compile-max-batch), one after the other; the compile
   time is the first step's.
   Phases 3 and 4 each run in a fresh process (this script with --phase): nothing the sweep left
   in torch (DeepSpeed's patches, dynamo's caches) reaches the kernels they measure (issue 21).
5. train: `simscale train` as subprocesses on shards made here from generated images: 20 steps
   uninterrupted; the same run killed after step 14 (checkpoint at 10) and resumed with
   `--resume auto`; the per-step losses of the two are compared.
6. syncs: bench/sync_census.py on those shards: torch's CUDA sync detector over the real
   Trainer's non-logging steps, each sync attributed to simscale, DeepSpeed or other code.
Output: one table on stdout, OUT/gpu_bench.json, OUT/profile.txt.

`--cpu` is the rehearsal (tests/bench/test_gpu_rehearsal.py): every line above runs, with a
tiny model, fp32 and small batches; `--fake-oom-above B` raises torch.OutOfMemoryError in the
step for batches above B so that the OOM path runs too (only used on CPU, where nothing OOMs).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
    """Wall-clock budget of the whole process; phases ask what is left before starting work."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_loop(fn, n: int, dev: torch.device) -> float:
    """Seconds per call of `fn` over n calls: CUDA events on a GPU, perf_counter on CPU."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def matmul_rate(dev: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    return 2 * n**3 / time_loop(lambda: a @ b, reps, dev)


def peak_memory_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def allocated_gb(dev: torch.device) -> float:
    return torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0


def make_config(args, zero: int, ckpt: bool, batch: int, compile: bool = False):
    from simscale.config import build_config, resolve_lr

    over = [f"optim.batch_size={batch}", "optim.max_steps=1000", f"deepspeed.zero_stage={zero}",
            f"model.grad_checkpointing={str(ckpt).lower()}", f"deepspeed.precision={args.precision}",
            f"model.compile={str(compile).lower()}"]
    cfg, _ = resolve_lr(build_config(args.preset, overrides=over), 1)
    return cfg


def build_engine(cfg, info):
    """SIM in a DeepSpeed engine with the Trainer's DeepSpeed config (ZeRO-3: built in partitions)."""
    import deepspeed

    from simscale.model.sim import SIM
    from simscale.train.ds_config import build_ds_config
    from simscale.train.ema import ShardedEMA
    from simscale.train.loop import param_groups
    from simscale.train.zero_init import partitioned_init

    ds_cfg = build_ds_config(cfg, info.world_size, on_cpu=info.device.type == "cpu")
    torch.manual_seed(0)
    if cfg.deepspeed.zero_stage == 3:
        with partitioned_init(ds_cfg):  # torch left as it was (simscale/train/zero_init.py)
            model = SIM(cfg)
    else:
        with torch.device(info.device):  # initialise on the device: ViT-L's init is slow on CPU cores
            model = SIM(cfg)
    if cfg.model.compile:  # as the Trainer does: torch.compile of each encoder block, before DeepSpeed
        model.compile_encoder_blocks()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_cfg)
    return engine, ShardedEMA(engine.module.ema_pairs())


def free_engine(engine, dev: torch.device) -> None:
    if engine is not None and hasattr(engine, "destroy"):
        try:
            engine.destroy()  # removes DeepSpeed's hooks, which hold the parameters
        except Exception as exc:  # after an OOM mid-step DeepSpeed's state may be odd: go on
            log(f"engine.destroy() failed ({type(exc).__name__}: {exc}); memory may stay allocated")
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def make_step(cfg, engine, ema, batch, fake_oom_above: int):
    """The Trainer's step body on one in-memory batch; returns the loss tensor (no host sync)."""
    from simscale.data.photometric import apply_photometric

    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    size = batch["view_a"].shape[0]

    def step() -> torch.Tensor:
        ema.update(0.996)
        a = apply_photometric(batch["view_a"], batch["photo_a"], view="a").to(dtype)
        b = apply_photometric(batch["view_b"], batch["photo_b"], view="b").to(dtype)
        out = engine(a, b, batch["geometry"], batch["mask"])
        loss, _ = engine.module.loss(out)
        if 0 < fake_oom_above < size:
            raise torch.OutOfMemoryError(f"simulated for the CPU rehearsal (batch {size} > {fake_oom_above})")
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def measure(args, cfg, engine, ema, info, batch_size: int, peak: float | None, matmul: float) -> dict:
    from step_bench import synthetic_batch

    from simscale.model.flops import model_flops_per_sample, train_flops_per_sample

    dev = info.device
    rec = {"zero": cfg.deepspeed.zero_stage, "grad_ckpt": cfg.model.grad_checkpointing, "batch": batch_size,
           "mem_before_gb": round(allocated_gb(dev), 2)}
    oom = ""
    try:
        batch = {k: v.to(dev) for k, v in synthetic_batch(cfg, batch_size).items()}
        step = make_step(cfg, engine, ema, batch, args.fake_oom_above)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(args.warmup):
            step()
        sync(dev)
        losses = []
        dt = time_loop(lambda: losses.append(step()), args.steps, dev)
        losses = [float(x) for x in losses]
    except torch.OutOfMemoryError as exc:
        oom = str(exc).strip().splitlines()[0][:200]
    if oom:  # outside the except block: its traceback (and the tensors its frames hold) is gone
        batch = step = None
        free_engine(None, dev)
        rec.update(error="oom", detail=oom)
        return rec
    img_s = batch_size / dt
    model_f, hw_f = model_flops_per_sample(cfg), train_flops_per_sample(cfg)
    rec.update(step_s=round(dt, 5), img_per_s=round(img_s, 2), model_gflop_per_img=round(model_f / 1e9, 2),
               hw_gflop_per_img=round(hw_f / 1e9, 2), model_tflops=round(model_f * img_s / 1e12, 3),
               hw_tflops=round(hw_f * img_s / 1e12, 3),
               mfu=round(model_f * img_s / peak, 4) if peak else None,
               hfu=round(hw_f * img_s / peak, 4) if peak else None,
               mfu_of_matmul=round(model_f * img_s / matmul, 4),
               peak_mem_gb=round(peak_memory_gb(dev), 2),
               loss_first=losses[0], loss_last=losses[-1], finite=bool(np.isfinite(losses).all()))
    return rec


def sweep(args, info, budget: Budget, peak, matmul, results: dict) -> None:
    dev = info.device
    rows = results["sweep"]
    for zero in args.zero:
        for ckpt in args.ckpt:
            engine = ema = None
            last_step_s, build_s = 0.0, 0.0
            for b in args.batches:
                # the next point costs about twice the last one's steps (batch doubles) + a build
                need = args.reserve_s + 2 * last_step_s * (args.warmup + args.steps) + (0 if engine else build_s)
                if budget.left() < need:
                    rows.append({"zero": zero, "grad_ckpt": ckpt, "batch": b, "error": "skipped: time budget"})
                    log(f"ZeRO-{zero} ckpt={int(ckpt)} batch {b}: skipped, {budget.left():.0f} s left")
                    break
                cfg = make_config(args, zero, ckpt, b)
                if engine is None:
                    t0 = time.monotonic()
                    engine, ema = build_engine(cfg, info)
                    build_s = time.monotonic() - t0
                    log(f"ZeRO-{zero} ckpt={int(ckpt)}: engine built in {build_s:.1f} s "
                        f"({allocated_gb(dev):.1f} GiB allocated)")
                rec = measure(args, cfg, engine, ema, info, b, peak, matmul)
                rec["build_s"] = round(build_s, 1)
                rows.append(rec)
                save(results)
                log(json.dumps(rec))
                if "error" in rec:  # OOM: this series is over; a fresh engine for the next one
                    break
                last_step_s = rec["step_s"]
            ema = None
            free_engine(engine, dev)
            engine = None


def profile_best(args, info, best: dict, out: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    dev = info.device
    size = min(best["batch"], args.profile_max_batch)  # the kernel mix, well away from the memory edge
    cfg = make_config(args, best["zero"], best["grad_ckpt"], size)
    engine, ema = build_engine(cfg, info)
    from step_bench import synthetic_batch

    batch = {k: v.to(dev) for k, v in synthetic_batch(cfg, size).items()}
    step = make_step(cfg, engine, ema, batch, 0)
    for _ in range(2):
        step()
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.profile_steps):
            step()
        sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=key, row_limit=30, max_name_column_width=70)
    (out / "profile.txt").write_text(
        f"# {args.preset} ZeRO-{best['zero']} ckpt={best['grad_ckpt']} batch {size}, "
        f"{args.profile_steps} steps, sorted by {key}\n{table}\n")
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:10]
    total = sum(getattr(e, key) for e in events) or 1.0
    ema = step = batch = None
    free_engine(engine, dev)
    return {"sorted_by": key, "steps": args.profile_steps, "batch": size,
            "top": [{"name": e.key[:80], "share": round(getattr(e, key) / total, 4), "calls": e.count} for e in top]}


def compile_point(args, info, budget: Budget, peak, matmul, results: dict) -> dict:
    """model.compile=true against the same point without it (ZeRO-2, no recomputation), measured
    in this phase one after the other so that the ratio is of one run."""
    dev = info.device
    plain = [r for r in results["sweep"] if "error" not in r and r["zero"] == 2 and not r["grad_ckpt"]]
    size = min(max((r["batch"] for r in plain), default=args.batches[0]), args.compile_max_batch)
    out = {"zero": 2, "grad_ckpt": False, "batch": size}
    for name, flag in (("eager", False), ("compiled", True)):
        if budget.left() < args.tail_s + 40:
            out[name] = {"error": "skipped: time budget"}
            continue
        cfg = make_config(args, 2, False, size, compile=flag)
        t0 = time.monotonic()
        engine, ema = build_engine(cfg, info)
        from step_bench import synthetic_batch

        batch = {k: v.to(dev) for k, v in synthetic_batch(cfg, size).items()}
        step = make_step(cfg, engine, ema, batch, 0)
        step()  # the compile happens here
        sync(dev)
        first_s = time.monotonic() - t0
        rec = measure(args, cfg, engine, ema, info, size, peak, matmul)
        rec["build_and_first_step_s"] = round(first_s, 1)
        out[name] = rec
        log(f"compile={flag}: {json.dumps(rec)}")
        ema = step = batch = None
        free_engine(engine, dev)
        save(results)
    if "img_per_s" in out.get("eager", {}) and "img_per_s" in out.get("compiled", {}):
        out["speedup"] = round(out["compiled"]["img_per_s"] / out["eager"]["img_per_s"], 3)
    return out


def in_clean_process(name: str, args, budget: Budget, matmul: float, results: dict, work: Path) -> dict:
    """Phase `name` (profile | compile) in a fresh Python process: this script with --phase, its
    inputs and result as JSON in WORK/phase_NAME/. Its output goes to this process's stdout."""
    io = work / f"phase_{name}"
    io.mkdir(parents=True, exist_ok=True)
    (io / "in.json").write_text(json.dumps({"args": vars(args), "budget_left_s": budget.left(), "matmul": matmul,
                                            "results": results, "started": time.time()}))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}  # a world of 1 on a port of its own
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--phase-io", str(io)]
    log("+ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=max(budget.left(), 0) + 120)
    out = io / "out.json"
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the {name} process ended with rc {proc.returncode} (its traceback is above)")
    res = json.loads(out.read_text())
    if "error" in res:
        raise RuntimeError(res["error"])
    return res["result"]


def exit_with_parent() -> None:
    """gpu.sh's hard timeout ends the parent only: the child must not go on measuring alone."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def phase_main(name: str, io: Path) -> int:
    """The child side of in_clean_process."""
    exit_with_parent()
    spec = json.loads((io / "in.json").read_text())
    args, results = argparse.Namespace(**spec["args"]), spec["results"]
    budget = Budget(spec["budget_left_s"] - (time.time() - spec["started"]))
    from simscale.train.distributed import init_distributed

    info = init_distributed()
    log(f"{name}: a fresh process, ready {time.time() - spec['started']:.1f} s after its start")
    try:
        if name == "profile":
            res = profile_best(args, info, results["best"], Path(args.out))
        else:
            res = compile_point(args, info, budget, results["peak_flops_datasheet"], spec["matmul"], results)
        out = {"result": res}
    except Exception as exc:
        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    (io / "out.json").write_text(json.dumps(out))
    return 0


def sync_census(args, work: Path) -> dict:
    """bench/sync_census.py on the smoke phase's shards: torch's sync detector over the real
    Trainer's non-logging steps (a subprocess: a world of its own)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["SIMSCALE_NO_PROGRESS"] = "1"
    if not (work / "shards").is_dir():
        return {"error": "no shards (the train phase did not prepare them)"}
    cmd = [sys.executable, str(HERE / "sync_census.py"), str(work / "shards"), str(work / "census"),
           args.train_preset, f"optim.batch_size={args.train_batch}", f"data.num_workers={args.train_workers}",
           f"deepspeed.precision={args.precision}"]
    log("+ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.train_timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        return {"rc": proc.returncode, "log_tail": (proc.stdout + proc.stderr)[-2000:]}
    return json.loads(lines[-1])


# -- phase 4: the real trainer, killed and resumed -------------------------------------------------
def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """Smooth random colour fields with a few shapes, as JPEGs in 4 class folders."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = rng.integers(0, size - 20, 2)
            w, h = rng.integers(10, size // 2, 2)
            draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = folder / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"img{i:04d}.jpg", quality=90)


def run_logged(cmd: list[str], logfile: Path, timeout: float, env: dict) -> int:
    log("+ " + " ".join(cmd))
    with open(logfile, "a") as f:
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run appends, so the last record of a step wins."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def smoke_train(args, budget: Budget, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}  # each run is its own world of 1
    env["SIMSCALE_NO_PROGRESS"] = "1"
    py = [sys.executable, "-m", "simscale"]
    logfile = work / "train.log"
    make_images(work / "images", args.train_images, args.train_image_size)
    rc = run_logged(py + ["prepare", str(work / "images"), "--out", str(work / "shards"), "--shard-size", "32",
                          "--workers", "2"], logfile, 120, env)
    res: dict = {"prepare_rc": rc}
    if rc != 0:
        res["log_tail"] = logfile.read_text()[-2000:]
        return res
    common = ["--preset", args.train_preset, f"data.train={work / 'shards'}", "optim.max_steps=20",
              f"optim.batch_size={args.train_batch}", f"data.num_workers={args.train_workers}",
              "run.save_every=10", "log.every=1", "log.tensorboard=false", "log.progress=false",
              f"deepspeed.precision={args.precision}"]
    t = {}
    t0 = time.monotonic()
    res["full_rc"] = run_logged(py + ["train", "--resume", "none", *common, f"run.dir={work / 'full'}"],
                                logfile, args.train_timeout, env)
    t["full_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    # The crash comes from the tests' fault seam (a Trainer subclass that hard-exits after step 14;
    # fault injection is no user config key), run from the repository root like the rest.
    crash_py = [sys.executable, "-m", "tests.train.faults", "--crash-after", "14"]
    res["killed_rc"] = run_logged(crash_py + ["train", "--resume", "none", *common, f"run.dir={work / 'crash'}"],
                                  logfile, args.train_timeout, env)
    res["resumed_rc"] = run_logged(py + ["train", "--resume", "auto", *common, f"run.dir={work / 'crash'}"],
                                   logfile, args.train_timeout, env)
    t["killed_and_resumed_s"] = time.monotonic() - t0
    res["seconds"] = {k: round(v, 1) for k, v in t.items()}
    if res["full_rc"] != 0 or res["killed_rc"] != 17 or res["resumed_rc"] != 0:
        res["log_tail"] = logfile.read_text()[-3000:]
        return res
    full, crash = step_losses(work / "full"), step_losses(work / "crash")
    resumed_steps = sorted(s for s in crash if s > 10)  # resumed from step_00000010 (save_every=10)
    diffs = [abs(full[s] - crash[s]) for s in sorted(full) if s in crash]
    res.update(steps_full=len(full), steps_compared=len(diffs), resumed_from_step=min(resumed_steps),
               resumed_steps=len(resumed_steps), losses_full=[full[s] for s in sorted(full)],
               losses_resumed=[crash[s] for s in sorted(crash)],
               first_resumed_equal=full.get(min(resumed_steps)) == crash.get(min(resumed_steps)),
               all_losses_equal=len(diffs) == len(full) and max(diffs) == 0.0, max_abs_diff=max(diffs))
    full_rec = [json.loads(x) for x in (work / "full" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in full_rec if "images_per_s" in r][-1]
    res["trainer_last_log"] = {k: last.get(k) for k in ("step", "images_per_s", "mfu", "hfu", "memory_gb",
                                                         "data_wait")}
    return res


# -- report ----------------------------------------------------------------------------------------
def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SIM {results['preset']} {results['precision']} on {results['device_name']}")
    for col in ("ZeRO", "ckpt", "batch", "img/s", "MFU", "HFU", "MFU/matmul", "TFLOP/s (model)",
                "peak mem GiB", "step s"):
        t.add_column(col, justify="right")
    pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    for r in results["sweep"]:
        if "error" in r:
            t.add_row(str(r["zero"]), str(int(r["grad_ckpt"])), str(r["batch"]), r["error"], *[""] * 6)
        else:
            t.add_row(str(r["zero"]), str(int(r["grad_ckpt"])), str(r["batch"]), f"{r['img_per_s']:.1f}",
                      pct(r["mfu"]), pct(r["hfu"]), pct(r["mfu_of_matmul"]), f"{r['model_tflops']:.2f}",
                      f"{r['peak_mem_gb']:.1f}", f"{r['step_s']:.4f}")
    Console(width=150).print(t)


def save(results: dict) -> None:
    """Written after every point and phase: a hard kill (gpu.sh's timeout) keeps what was measured."""
    path = Path(results["out"]) / "gpu_bench.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def phase(name: str, results: dict, fn, *a):
    t0 = time.monotonic()
    log(f"phase {name}")
    try:
        return fn(*a)
    except Exception as exc:  # a broken phase must not lose the others' figures
        traceback.print_exc()
        results["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return None
    finally:
        results["phase_s"][name] = round(time.monotonic() - t0, 1)
        save(results)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="rehearsal on CPU: tiny preset, fp32, small batches")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--work", default="", help="scratch folder for shards and runs (default: a temp dir)")
    p.add_argument("--budget-s", type=float, default=0, help="wall-clock budget of this process")
    p.add_argument("--batches", type=int, nargs="*")
    p.add_argument("--zero", type=int, nargs="*", default=[2, 3])
    p.add_argument("--ckpt", type=int, nargs="*", default=[0, 1])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fake-oom-above", type=int, default=0)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--compile-max-batch", type=int, default=256)
    p.add_argument("--profile-max-batch", type=int, default=512)
    p.add_argument("--phase", choices=("profile", "compile"), help=argparse.SUPPRESS)  # in_clean_process's child
    p.add_argument("--phase-io", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.ckpt = [bool(c) for c in a.ckpt]
    if a.cpu:
        a.preset, a.precision, a.profile_steps = "tiny", "fp32", 2
        a.warmup = min(a.warmup, 1)
        a.batches = a.batches or [8, 16, 32]
        a.budget_s = a.budget_s or 1200  # generous: the rehearsal checks lines, not speed (shared CPUs)
        a.reserve_s = 200  # profile + compile pair (2 fresh processes) + trainer smoke + sync census
        a.tail_s = 60  # trainer smoke + sync census: what the compile phase leaves untouched
        a.train_preset, a.train_batch, a.train_workers, a.train_timeout = "tiny", 8, 1, 120
        a.train_images, a.train_image_size = 48, 64
    else:
        a.preset, a.precision, a.profile_steps = "vit_l16", "bf16", 3
        a.batches = a.batches or [64, 128, 256, 512, 1024, 2048, 4096]
        a.budget_s = a.budget_s or 460
        # profile (~30 s) + compile pair (2 builds, one compile, ~100 s), each in a fresh process
        # (~20 s of imports each) + trainer smoke (3 launches of vit_s16, ~90 s) + sync census (1
        # launch, ~30 s)
        a.reserve_s = 290
        a.tail_s = 120
        a.train_preset, a.train_batch, a.train_workers, a.train_timeout = "vit_s16", 64, 4, 150
        a.train_images, a.train_image_size = 256, 160
    return a


def main(argv=None) -> int:
    args = parse(argv)
    if args.phase:
        return phase_main(args.phase, Path(args.phase_io))
    budget = Budget(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    import deepspeed

    from simscale.train.distributed import init_distributed
    from simscale.train.metrics import device_peak_flops

    info = init_distributed()
    dev = info.device
    if not args.cpu and dev.type != "cuda":
        print("gpu_bench: no CUDA device (use --cpu for the rehearsal)", file=sys.stderr)
        return 2
    results = {"preset": args.preset, "precision": args.precision, "device": dev.type,
               "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
               "deepspeed_file": deepspeed.__file__, "python": sys.version.split()[0],
               "argv": sys.argv[1:], "out": str(out), "sweep": [], "errors": {}, "phase_s": {}}
    peak = device_peak_flops()
    results["peak_flops_datasheet"] = peak
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    n, reps = (8192, 10) if dev.type == "cuda" else (512, 5)
    matmul = phase("matmul", results, matmul_rate, dev, dtype, n, reps)
    results["matmul_tflops"] = round(matmul / 1e12, 2) if matmul else None
    log(f"{results['device_name']}: {n}^3 {args.precision} matmul {results['matmul_tflops']} TFLOP/s; "
        f"datasheet peak {peak}")
    phase("sweep", results, sweep, args, info, budget, peak, matmul or 1.0, results)
    ok = [r for r in results["sweep"] if "error" not in r]
    if ok:
        best = max(ok, key=lambda r: r["img_per_s"])
        results["best"] = best
        results["profile"] = phase("profile", results, in_clean_process, "profile", args, budget, matmul or 1.0,
                                   results, work)
    if ok and not args.skip_compile:
        results["compile"] = phase("compile", results, in_clean_process, "compile", args, budget, matmul or 1.0,
                                   results, work)
    if not args.skip_train:
        results["train"] = phase("train", results, smoke_train, args, budget, work)
        results["syncs"] = phase("syncs", results, sync_census, args, work)
    results["total_s"] = round(budget.elapsed(), 1)
    save(results)
    print_table(results)
    if results.get("best"):
        b = results["best"]
        log(f"best: ZeRO-{b['zero']} ckpt={int(b['grad_ckpt'])} batch {b['batch']}: {b['img_per_s']} img/s, "
            f"MFU {b['mfu']}, HFU {b['hfu']}, {b['peak_mem_gb']} GiB")
    tr = results.get("train") or {}
    if results.get("compile"):
        c = results["compile"]
        log(f"compile: batch {c['batch']}: eager {c.get('eager', {}).get('img_per_s')} img/s, compiled "
            f"{c.get('compiled', {}).get('img_per_s')} img/s, speedup {c.get('speedup')}")
    if results.get("syncs"):
        log(f"sync census (non-logging steps): {json.dumps(results['syncs'])[:1500]}")
    log(f"train smoke: {json.dumps({k: v for k, v in tr.items() if not k.startswith('losses')})[:1500]}")
    log(f"total {results['total_s']} s; errors: {results['errors'] or 'none'}")
    good = bool(ok) and not results["errors"] and tr.get("first_resumed_equal", args.skip_train)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())

"""Memory of SIM training: measured per-rank peaks on CPU, DeepSpeed's model-state estimates,
activation bytes per sample, and the largest batch per 80 GB GPU they predict.

Measured (run under torchrun, 2 gloo ranks, one engine per launch):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port 29611 \\
        bench/memory_bench.py run --preset vit_b16 --zero 3 --ckpt 1 --batch 8 --steps 3
  Per rank: RSS after the engine is built (model states), the peak RSS over the steps
  (getrusage maxrss: the process's whole high-water mark, start-up included) and s/step.
  Model and engine are built as the Trainer builds them (bench/step_bench.build), synthetic
  uint8 views (bench/step_bench.synthetic_batch), fp32.

Estimated (one process, no launcher, nothing allocated: models on the meta device):
    python bench/memory_bench.py estimate --gpus 8 64 512
  Counts trainable (online encoder minus its frozen patch embedding, projector, predictor) and
  frozen (target branch, online patch embedding) parameters and feeds the trainable ones to
  DeepSpeed's own estimators (stage_1_and_2 `estimate_zero2_model_states_mem_needs`, stage3
  `estimate_zero3_model_states_mem_needs`, no offload, 8 GPUs per node). The frozen target is
  not in DeepSpeed's figure; simscale adds its compute-dtype copy (2 B/param) and its fp32
  EMA master (4 B/param), both partitioned under ZeRO-3 and whole on every GPU under ZeRO-1/2.

    python bench/memory_bench.py activations --presets vit_l16 vit_h14
  Activation bytes per sample in bf16: a SIM with depth 1 and 2 (same widths, real bf16
  tensors, batch 2, CPU) runs one forward under `torch.autograd.graph.saved_tensors_hooks`; the
  bytes of every distinct storage autograd saves (parameters and buffers excluded) are summed, split into "inside online encoder
  blocks" and "the rest"; the per-block figure is the depth-2 minus depth-1 difference, so the
  full model is rest + depth x block (linear in depth). With activation checkpointing, each
  encoder block keeps only its input (1+V tokens x E x 2 B) and one block's activations are
  live again during its recomputation. Not counted: temporaries (attention and MLP
  intermediates during backward, gradient buffers beyond the model states), allocator slack.

    python bench/memory_bench.py batch-table --gpu-gb 80 --gpus 64
  Largest micro-batch B with states + B x activations_per_sample <= 0.9 x 80 GB (10% kept for
  temporaries, fragmentation and the CUDA context), from the two tables above.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
def cmd_run(args) -> None:
    import torch.distributed as dist

    from simscale.config import build_config, resolve_lr
    from simscale.train.distributed import init_distributed
    from step_bench import build, make_step, overrides, synthetic_batch

    info = init_distributed()
    args.precision = args.precision or "fp32"
    args.img_size = 0
    cfg, _ = resolve_lr(build_config(args.preset, overrides=overrides(args)), info.world_size)
    rss0 = _rss()
    t0 = time.perf_counter()
    engine, ema = build(cfg, info)
    build_s = time.perf_counter() - t0
    rss_states = _rss()
    batch = synthetic_batch(cfg, args.batch, seed=info.rank)
    step = make_step(cfg, engine, ema, batch)
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = torch.tensor([rss0, rss_states, peak, min(times[1:] or times)], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(every, mine)
    if info.is_main:
        res = {"preset": args.preset, "world": info.world_size, "zero": cfg.deepspeed.zero_stage,
               "grad_ckpt": cfg.model.grad_checkpointing, "precision": cfg.deepspeed.precision,
               "batch_per_rank": args.batch, "steps": args.steps, "build_s": round(build_s, 1),
               "rss_before_build_gb": [round(float(e[0]) / 2**30, 2) for e in every],
               "rss_after_build_gb": [round(float(e[1]) / 2**30, 2) for e in every],
               "peak_rss_gb": [round(float(e[2]) / 2**30, 2) for e in every],
               "best_step_s": round(max(float(e[3]) for e in every), 2), "losses": losses,
               "threads": torch.get_num_threads()}
        print(json.dumps(res), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
    dist.barrier()


# ---------------------------------------------------------------------------------------------
def count_params(preset: str) -> dict[str, int]:
    from simscale.config import build_config
    from simscale.model.sim import SIM

    cfg = build_config(preset)
    with torch.device("meta"):
        model = SIM(cfg)
    trainable = {id(p) for p in model.online_parameters()}
    n_train = sum(p.numel() for p in model.parameters() if id(p) in trainable)
    n_frozen = sum(p.numel() for p in model.parameters() if id(p) not in trainable)
    largest = 0
    for mod in model.modules():
        own = sum(p.numel() for p in mod.parameters(recurse=False) if id(p) in trainable)
        largest = max(largest, own)
    enc = sum(p.numel() for p in model.online.encoder.parameters())
    return {"trainable": n_train, "frozen": n_frozen, "largest_layer": largest, "online_encoder": enc,
            "total": n_train + n_frozen}


def estimate_rows(presets: list[str], gpus: list[int], per_node: int = 8) -> list[dict]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for preset in presets:
        c = count_params(preset)
        for n in gpus:
            nodes = max(1, n // per_node)
            _, z2_gpu = estimate_zero2_model_states_mem_needs(c["trainable"], per_node, nodes, cpu_offload=False)
            _, z3_gpu, _ = estimate_zero3_model_states_mem_needs(c["trainable"], c["largest_layer"], per_node,
                                                                 nodes, cpu_offload=False, cpu_offload_params=False)
            target_z2 = 6 * c["frozen"]  # bf16 copy + fp32 EMA master, whole on every GPU
            target_z3 = 6 * c["frozen"] / n  # both partitioned
            rows.append({"preset": preset, "gpus": n, **{f"params_{k}": v for k, v in c.items()},
                         "ds_zero2_gpu_gb": round(z2_gpu / 1e9, 2), "ds_zero3_gpu_gb": round(z3_gpu / 1e9, 2),
                         "target_zero2_gb": round(target_z2 / 1e9, 2), "target_zero3_gb": round(target_z3 / 1e9, 3),
                         "zero2_total_gb": round((z2_gpu + target_z2) / 1e9, 2),
                         "zero3_total_gb": round((z3_gpu + target_z3) / 1e9, 2)})
    return rows


def cmd_estimate(args) -> None:
    for row in estimate_rows(args.presets, args.gpus):
        print(json.dumps(row))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
def saved_bytes(preset: str, depth: int, batch: int = 2) -> dict[str, int]:
    """Bytes autograd saves in one bf16 training forward of SIM, split by where they are saved."""
    from simscale.config import build_config
    from simscale.model.sim import SIM
    from step_bench import synthetic_batch

    from simscale.data.photometric import apply_photometric

    cfg = build_config(preset, overrides=[f"model.depth={depth}", "model.grad_checkpointing=false",
                                          f"optim.batch_size={batch}"])
    torch.manual_seed(0)
    model = SIM(cfg).to(torch.bfloat16).train()
    b = synthetic_batch(cfg, batch)
    va = apply_photometric(b["view_a"], b["photo_a"], view="a").to(torch.bfloat16)
    vb = apply_photometric(b["view_b"], b["photo_b"], view="b").to(torch.bfloat16)
    # parameters and buffers are saved too (a Linear saves its weight): model states, not activations
    seen: set[int] = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    where = {"in_block": False}
    acc = {"online_blocks": 0, "rest": 0}

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in seen and st.nbytes() > 0:
            seen.add(key)
            acc["online_blocks" if where["in_block"] else "rest"] += st.nbytes()
        return t

    def enter(*_):
        where["in_block"] = True

    def leave(*_):
        where["in_block"] = False

    for blk in model.online.encoder.blocks:
        blk.register_forward_pre_hook(enter)
        blk.register_forward_hook(leave)
    keep = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(va, vb, b["geometry"], b["mask"])
        loss, _ = model.loss(out)
        keep.append(loss)
    return acc


def activation_rows(presets: list[str]) -> list[dict]:
    from simscale.config import build_config

    rows = []
    for preset in presets:
        cfg = build_config(preset)
        m = cfg.model
        batch = 2
        a1, a2 = saved_bytes(preset, 1, batch), saved_bytes(preset, 2, batch)
        block = (a2["online_blocks"] - a1["online_blocks"]) / batch
        rest = (a1["rest"] + a1["online_blocks"]) / batch - block
        n = (m.img_size // m.patch_size) ** 2
        tokens = 1 + n - round(cfg.data.mask.ratio * n)
        block_input = tokens * m.embed_dim * 2
        no_ckpt = rest + m.depth * block
        ckpt = rest + m.depth * block_input + block  # + one block recomputed at a time
        rows.append({"preset": preset, "depth": m.depth, "embed_dim": m.embed_dim, "online_tokens": tokens,
                     "per_block_mb": round(block / 1e6, 2), "rest_mb": round(rest / 1e6, 2),
                     "act_per_sample_mb_no_ckpt": round(no_ckpt / 1e6, 1),
                     "act_per_sample_mb_ckpt": round(ckpt / 1e6, 1)})
    return rows


def cmd_activations(args) -> None:
    for row in activation_rows(args.presets):
        print(json.dumps(row))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


def cmd_batch_table(args) -> None:
    acts = {r["preset"]: r for r in activation_rows(args.presets)}
    budget = 0.9 * args.gpu_gb
    for est in estimate_rows(args.presets, args.gpus):
        a = acts[est["preset"]]
        for stage, states in (("zero2", est["zero2_total_gb"]), ("zero3", est["zero3_total_gb"])):
            for ck, per in (("no", a["act_per_sample_mb_no_ckpt"]), ("yes", a["act_per_sample_mb_ckpt"])):
                free = budget - states
                bmax = int(free * 1000 // per) if free > 0 else 0
                row = {"preset": est["preset"], "gpus": est["gpus"], "stage": stage, "grad_ckpt": ck,
                       "states_gb": states, "act_mb_per_sample": per, "max_batch": bmax}
                print(json.dumps(row))
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--preset", default="vit_b16")
    r.add_argument("--zero", type=int, default=3)
    r.add_argument("--ckpt", type=int, default=0)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--precision", default="fp32")
    r.add_argument("--extra", nargs="*", default=[])
    e = sub.add_parser("estimate")
    e.add_argument("--presets", nargs="+", default=["vit_l16", "vit_h14", "vit_g14"])
    e.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    a = sub.add_parser("activations")
    a.add_argument("--presets", nargs="+", default=["vit_b16", "vit_l16", "vit_h14"])
    b = sub.add_parser("batch-table")
    b.add_argument("--presets", nargs="+", default=["vit_l16", "vit_h14"])
    b.add_argument("--gpus", type=int, nargs="+", default=[64])
    b.add_argument("--gpu-gb", type=float, default=80.0)
    for s in (r, e, a, b):
        s.add_argument("--json", default="")
    args = p.parse_args()
    {"run": cmd_run, "estimate": cmd_estimate, "activations": cmd_activations,
     "batch-table": cmd_batch_table}[args.cmd](args)


if __name__ == "__main__":
    main()

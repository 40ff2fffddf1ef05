"""Where a short SIM run's learning goes: k-NN of several readouts of one trained tiny encoder,
the make-up of the target's variance, and how much the predictor uses the view geometry.

    OMP_NUM_THREADS=1 python bench/learning_diagnostics.py --steps 300 \
        --train bench/out/data/fmnist_300_100_shards/train --val bench/out/data/fmnist_300_100_shards/val

(the shards bench/learning_curve.py prepares). One process, world size 1; prints three lines.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def readouts(trainer, tx, ty, vx, vy) -> dict[str, float]:
    from simscale.knn import knn_top1

    enc = trainer.model.online.encoder
    enc.eval()
    with torch.no_grad():
        t, v = enc(tx), enc(vx)
        pt, pv = trainer.model.online.projector(t), trainer.model.online.projector(v)
    enc.train()
    mu, sd = t[:, 0].mean(0), t[:, 0].std(0) + 1e-6
    feats = {
        "class token": (t[:, 0], v[:, 0]),
        "mean patch token": (t[:, 1:].mean(1), v[:, 1:].mean(1)),
        "flattened patch tokens": (t[:, 1:].flatten(1), v[:, 1:].flatten(1)),
        "projector class token": (pt[:, 0], pv[:, 0]),
        "z-scored class token": ((t[:, 0] - mu) / sd, (v[:, 0] - mu) / sd),
    }
    return {k: round(100 * knn_top1(a, ty, b, vy), 1) for k, (a, b) in feats.items()}


def target_makeup(trainer) -> dict[str, float]:
    batch = next(trainer.stream.batches(epoch=7))
    va, vb, g, m = trainer._to_device(batch)
    trainer.engine.eval()
    with torch.no_grad():
        out = trainer.model(va, vb, g, m)
        _, stats = trainer.model.loss(out)
        shuffled = trainer.model(va, vb, g[torch.randperm(len(g))], m)
        _, stats_shuffled = trainer.model.loss(shuffled)
    trainer.engine.train()
    tt = out["target"].float()
    mean = tt.mean((0, 1))
    total = (tt - mean).pow(2).sum(-1).mean()
    flat = tt.reshape(-1, tt.shape[-1])
    ev = torch.linalg.eigvalsh(flat.T @ flat / len(flat)).clamp_min(0)
    p = ev / ev.sum()
    return {"per-image share": float((tt.mean(1) - mean).pow(2).sum(-1).mean() / total),
            "position share": float((tt.mean(0) - mean).pow(2).sum(-1).mean() / total),
            "effective rank of C": float(torch.exp(-(p * torch.log(p + 1e-12)).sum())),
            "top eigenvalue of C": float(ev[-1]), "width": tt.shape[-1],
            "align (true geometry)": float(stats["align_dense"]),
            "align (geometry shuffled across the batch)": float(stats_shuffled["align_dense"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--set", default="optim.base_lr=2e-3;optim.warmup_steps=20;data.crop_scale=[0.3,1.0]")
    args = ap.parse_args()
    from simscale.config import build_config
    from simscale.train.distributed import init_distributed
    from simscale.train.loop import Trainer
    from simscale.train.online_knn import decode_split

    cfg = build_config("tiny", overrides=[f"data.train={args.train}", "optim.batch_size=128",
                                          f"optim.max_steps={args.steps}", "log.progress=false",
                                          "log.tensorboard=false", "run.dir=bench/out/diagnostics",
                                          "run.save_every=1000000", "data.num_workers=1",
                                          *[o for o in args.set.split(";") if o]])
    tx, ty = decode_split(args.train, cfg.model.img_size, 10**9)
    vx, vy = decode_split(args.val, cfg.model.img_size, 10**9)
    trainer = Trainer(cfg, resume="none", dist_info=init_distributed())
    print("init    k-NN by readout:", readouts(trainer, tx, ty, vx, vy))
    print("init    target:", target_makeup(trainer))
    trainer.fit()
    print(f"step {args.steps} k-NN by readout:", readouts(trainer, tx, ty, vx, vy))
    print(f"step {args.steps} target:", target_makeup(trainer))


if __name__ == "__main__":
    main()

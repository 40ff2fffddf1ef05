"""Peak memory of the dense UniGrad loss (simscale.loss) against InfoNCE over the same M tokens.

    python bench/loss_memory_bench.py --dim 768 --tokens 1568 6272 12544 25088 50176 --max-gb 10

Each (loss, M) runs forward + backward in a fresh subprocess (fp32, CPU): the inputs are
pred [M, D] (requires grad) and target [M, D]; after they exist the process resets its peak RSS
(`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and the figure reported is VmHWM - VmRSS
before the loss, i.e. the extra memory the loss's forward + backward needs on top of its inputs.
- UniGrad: `simscale.loss.unigrad_loss(pred[None], target[None], LossConfig())` (release
  defaults: dense, lam 0.02, world size 1), gradient to pred. Memory O(M D + D^2).
- InfoNCE (MoCo-v3/DINO-style contrast over the same tokens, each B token's positive is its own
  prediction): logits = normalize(p) @ normalize(t)^T / 0.2, cross-entropy against the
  diagonal, gradient to pred. Memory O(M^2): the M x M logits, their log-softmax (saved for
  backward) and their gradient.
A run whose analytic estimate (3 M^2 x 4 B for InfoNCE) exceeds --max-gb is not run; the table
says "not run" and gives the analytic figure instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(kind: str, m: int, d: int) -> dict:
    import torch
    import torch.nn.functional as F

    from simscale.config import LossConfig
    from simscale.loss import unigrad_loss

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(m, d, generator=g).requires_grad_(True)
    target = torch.randn(m, d, generator=g)
    # warm the code paths on a tiny input so lazy initialisation does not count
    small = torch.randn(8, d, requires_grad=True)
    if kind == "unigrad":
        unigrad_loss(small[None], small.detach()[None], LossConfig())[0].backward()
    else:
        F.cross_entropy(F.normalize(small, dim=1) @ F.normalize(small.detach(), dim=1).T / 0.2,
                        torch.arange(8)).backward()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    if kind == "unigrad":
        loss, _ = unigrad_loss(pred[None], target[None], LossConfig())
    else:
        logits = F.normalize(pred, dim=1) @ F.normalize(target, dim=1).T / 0.2
        loss = F.cross_entropy(logits, torch.arange(m))
        del logits
    loss.backward()
    dt = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"loss": kind, "tokens": m, "dim": d, "extra_peak_gb": round((peak - base) / 1e9, 4),
            "inputs_gb": round(2 * m * d * 4 / 1e9, 4), "seconds": round(dt, 2),
            "value": float(loss.detach())}


def analytic_gb(kind: str, m: int, d: int) -> float:
    """Dominant terms of the extra memory, in GB (10^9 B): what the measured figures should show."""
    if kind == "unigrad":
        # C (D x D), p @ C, (p - t) and its square, p's gradient: a few M x D tensors + D^2
        return (4 * m * d + 2 * d * d) * 4 / 1e9
    return 3 * m * m * 4 / 1e9  # logits, log-softmax saved for backward, gradient of the logits


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--tokens", type=int, nargs="+", default=[1568, 6272, 12544, 25088, 50176])
    p.add_argument("--max-gb", type=float, default=10.0, help="skip runs whose analytic estimate is above")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--json", default="")
    p.add_argument("--child", nargs=3, metavar=("KIND", "M", "D"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    rows = []
    for m in args.tokens:
        for kind in ("unigrad", "infonce"):
            est = analytic_gb(kind, m, args.dim)
            if est > args.max_gb:
                row = {"loss": kind, "tokens": m, "dim": args.dim, "extra_peak_gb": None, "note": "not run",
                       "analytic_gb": round(est, 3)}
            else:
                env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                try:
                    out = subprocess.run([sys.executable, __file__, "--child", kind, str(m), str(args.dim)],
                                         capture_output=True, text=True, timeout=args.timeout, env=env)
                    row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                        {"loss": kind, "tokens": m, "dim": args.dim, "extra_peak_gb": None,
                         "note": f"failed rc={out.returncode}: {out.stderr[-300:]}"}
                except subprocess.TimeoutExpired:
                    row = {"loss": kind, "tokens": m, "dim": args.dim, "extra_peak_gb": None, "note": "timeout"}
                row["analytic_gb"] = round(est, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""Can SIM's predictor copy? The target at init against what copying view A's tokens would give.

    python bench/copy_check.py [--images 256] [--preset tiny]

View A = view B = the same Fashion-MNIST images (eval-resized to the preset's size), one patch
masked. Prints how close the online projector's visible tokens (after LayerNorm) already are to
the target tokens, i.e. the align a predictor that only copied them would reach, and how much of
the LN'd target's variance the per-image and per-position means explain (bench/RESULTS.md,
"Issue 20, stop 27"). A training run of the copy task itself: bench/learning_curve.py with
`data.same_view=true;data.color_aug=false;data.mask.ratio=0.07;data.blur_sigma=[0.0,0.0]`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    from simscale.config import build_config
    from simscale.data.fashion_mnist import load_split
    from simscale.model.encoder import gather_tokens, visible_indices
    from simscale.model.sim import SIM

    torch.manual_seed(0)
    cfg = build_config(args.preset)
    model = SIM(cfg).train()
    size, grid, d = cfg.model.img_size, cfg.model.img_size // cfg.model.patch_size, cfg.model.decoder_dim
    x, _ = load_split("train")
    imgs = torch.from_numpy(np.array(x[: args.images])).float().div(255).unsqueeze(1)
    imgs = F.interpolate(imgs, size=size, mode="bicubic").clamp(0, 1).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    views = (imgs - mean) / std
    mask = torch.zeros(len(views), grid * grid, dtype=torch.bool)
    mask[:, grid * grid // 3] = True
    ids = visible_indices(mask, grid * grid - 1)
    with torch.no_grad():
        z = F.layer_norm(model.online(views, ids)[:, 1:], (d,))
        t = F.layer_norm(model.target(views)[:, 1:], (d,))
        tv = gather_tokens(t, ids)
        per_channel = lambda r: float(r.pow(2).sum(-1).mean() / d)  # noqa: E731
        glob, img, pos = t.mean((0, 1)), t.mean(1, keepdim=True), t.mean(0, keepdim=True)
        print(f"cosine(LN visible online token, its target token): {F.cosine_similarity(z, tv, dim=-1).mean():.4f}")
        print(f"align a copying predictor reaches: {per_channel(z - tv):.4f}")
        print(f"target variance around: global mean {per_channel(t - glob):.3f}, per-image mean "
              f"{per_channel(t - img):.3f}, per-position mean {per_channel(t - pos):.3f}, "
              f"image + position means {per_channel(t - img - pos + glob):.3f}")


if __name__ == "__main__":
    main()

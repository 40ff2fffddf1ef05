"""A fine-tuned official checkpoint (`models_vit.VisionTransformer`, timm 0.6-style names) -> timm.

Official names are timm's, with three differences handled here:
  - global pooling (the release fine-tune): `fc_norm.*` and no `norm.*`; `pos_embed` [1, 1+N, D].
    timm's `global_pool='avg'` is the same model (mean of the patch tokens, then fc_norm).
  - class-token pooling: `norm.*`, `pos_embed` [1, N, D] plus `cls_pos_embed` [1, 1, D], which
    become timm's one `pos_embed` [1, 1+N, D] (class row first).
  - LayerScale (`ls1.gamma`, from --init_values) is timm's `init_values` (`ls1.gamma` too).
The shape comes from the tensors (patch, width, depth, grid, MLP width, classes); the heads
from the official model list (their count is in no tensor): ViT-B 12, ViT-L/H 16.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from simscale.config import build_config
from simscale.errors import CheckpointError

HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}  # models_vit / timm: width -> heads
_ARCH = {(768, 16): "vit_base_patch16_224", (1024, 16): "vit_large_patch16_224", (1280, 14): "vit_huge_patch14_224",
         (384, 16): "vit_small_patch16_224"}


def is_finetuned(sd: dict[str, torch.Tensor]) -> bool:
    return "head.weight" in sd and not any(k.startswith("mm_") for k in sd)


def _need(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in sd:
        raise CheckpointError(f"the fine-tuned checkpoint has no '{name}': is it an official models_vit checkpoint?")
    return sd[name]


def to_timm(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(timm model_args, timm state dict, architecture name) of an official fine-tuned state dict."""
    w = _need(sd, "patch_embed.proj.weight")
    dim, patch = w.shape[0], w.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = _need(sd, "blocks.0.mlp.fc1.weight").shape[0]
    classes = _need(sd, "head.weight").shape[0]
    avg = "fc_norm.weight" in sd
    out = {k: v.float() for k, v in sd.items() if k not in ("pos_embed", "cls_pos_embed")}
    pe = _need(sd, "pos_embed").float()
    if "cls_pos_embed" in sd:
        pe = torch.cat([sd["cls_pos_embed"].float(), pe], dim=1)
    out["pos_embed"] = pe
    grid = int(round((pe.shape[1] - 1) ** 0.5))
    if grid * grid != pe.shape[1] - 1:
        raise CheckpointError(f"official pos_embed {list(pe.shape)} is not a square grid plus a class token")
    heads = num_heads or HEADS.get(dim)
    if heads is None:
        raise CheckpointError(f"width {dim} is not an official model: pass --num-heads")
    layer_scale = "blocks.0.ls1.gamma" in sd
    args = {"img_size": grid * patch, "patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads,
            "mlp_ratio": hidden / dim, "qkv_bias": True, "class_token": True, "global_pool": "avg" if avg else "token",
            "fc_norm": avg, "final_norm": True, "num_classes": classes}  # timm: final_norm + avg = fc_norm
    if layer_scale:
        args["init_values"] = 1.0  # any non-None value: the gammas come from the checkpoint
    return args, out, _ARCH.get((dim, patch), "vit_base_patch16_224")


def export_finetuned(sd: dict[str, torch.Tensor], out: Path, num_heads: int | None = None) -> tuple[Path, dict]:
    """Write the timm export (model.safetensors + config.json); every tensor must load strictly."""
    from simscale.export import write_timm

    args, timm_sd, arch = to_timm(sd, num_heads)
    cfg = build_config("vit_b16", overrides=[
        f"model.arch={arch}", f"model.img_size={args['img_size']}", f"model.patch_size={args['patch_size']}",
        f"model.embed_dim={args['embed_dim']}", f"model.depth={args['depth']}", f"model.num_heads={args['num_heads']}",
        f"model.mlp_ratio={args['mlp_ratio']}", f"model.pool={args['global_pool']}",
        f"model.final_norm={str(args['global_pool'] == 'token').lower()}"])  # simscale's own flag: the norm before pooling
    cfg.preset = "official-finetuned"
    write_timm(cfg, timm_sd, out, tag="official_finetuned", model_args=args)
    return out, args

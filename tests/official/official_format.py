"""Official-format SIM checkpoints for tests, from the names and shapes of the official repository
(OpenGVLab/Siamese-Image-Modeling: models_sim.SiameseIMViT with loss_type 'sim', models_vit.VisionTransformer,
util/misc.save_model's layout). Written here from those names and shapes; no official code is used.

`pretrain_state(...)` -> the `model` state dict: online and momentum (`mm_*`) branches, BatchNorm
blocks wrapped as `normK.bn.*` (PermuteBN), the fixed sin-cos tables computed by their formula.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

VIT_B = dict(img=224, patch=16, dim=768, depth=12, dec=768, proj=2, pred=4, mlp=4.0)  # the 1600-epoch release
MICRO = dict(img=32, patch=8, dim=64, depth=2, dec=64, proj=2, pred=2, mlp=4.0)  # simscale's `tiny` shape


def sincos_table(dim: int, grid: int) -> torch.Tensor:
    """SIM's fixed 2D table [1, 1+G*G, dim]: zero class row; per patch (row r, column c), first half
    [sin(r w), cos(r w)], second half [sin(c w), cos(c w)], w_k = 10000^(-k/(dim/4)), row-major."""
    w = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        a = np.einsum("m,d->md", pos, w)
        parts += [np.sin(a), np.cos(a)]
    table = np.concatenate([np.zeros((1, dim)), np.concatenate(parts, axis=1)], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def _block(prefix: str, d: int, hidden: int, bn: bool) -> dict[str, tuple]:
    out = {}
    for k in ("norm1", "norm2"):
        if bn:
            out.update({f"{prefix}{k}.bn.weight": (d,), f"{prefix}{k}.bn.bias": (d,),
                        f"{prefix}{k}.bn.running_mean": (d,), f"{prefix}{k}.bn.running_var": (d,),
                        f"{prefix}{k}.bn.num_batches_tracked": ()})
        else:
            out.update({f"{prefix}{k}.weight": (d,), f"{prefix}{k}.bias": (d,)})
    out.update({f"{prefix}attn.qkv.weight": (3 * d, d), f"{prefix}attn.qkv.bias": (3 * d,),
                f"{prefix}attn.proj.weight": (d, d), f"{prefix}attn.proj.bias": (d,),
                f"{prefix}mlp.fc1.weight": (hidden, d), f"{prefix}mlp.fc1.bias": (hidden,),
                f"{prefix}mlp.fc2.weight": (d, hidden), f"{prefix}mlp.fc2.bias": (d,)})
    return out


def pretrain_shapes(img, patch, dim, depth, dec, proj, pred, mlp) -> dict[str, tuple]:
    n = (img // patch) ** 2
    branch = {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "cls_token": (1, 1, dim), "decoder_embed.weight": (dec, dim), "decoder_embed.bias": (dec,),
              "mask_token": (1, 1, dec)}
    for i in range(depth):
        branch.update(_block(f"blocks.{i}.", dim, int(dim * mlp), bn=False))
    for i in range(proj):
        branch.update(_block(f"projector_decoder_blocks.{i}.", dec, int(dec * mlp), bn=True))
    shapes = dict(branch)
    shapes.update({f"mm_{k}": v for k, v in branch.items()})  # mm_patch_embed, mm_cls_token, mm_blocks, ...
    for i in range(pred):
        shapes.update(_block(f"predictor_decoder_blocks.{i}.", dec, int(dec * mlp), bn=True))
    shapes.update({"pos_embed": (1, n + 1, dim), "decoder_pos_embed": (1, n + 1, dec),
                   "decoder_pred.weight": (dec, dec), "decoder_pred.bias": (dec,),
                   "decoder_pos_mlp.weight": (dec, 2 * dec), "decoder_pos_mlp.bias": (dec,)})
    return shapes


def pretrain_state(shape: dict, seed: int = 0, meta: bool = False) -> dict[str, torch.Tensor]:
    """Random official-format weights (distinct online and momentum values), real fixed tables."""
    g = torch.Generator().manual_seed(seed)
    grid = shape["img"] // shape["patch"]
    sd = {}
    for name, s in pretrain_shapes(**shape).items():
        if name == "pos_embed":
            sd[name] = sincos_table(shape["dim"], grid)
        elif name == "decoder_pos_embed":
            sd[name] = sincos_table(shape["dec"], grid)
        elif name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(1000 + len(sd), dtype=torch.long)
        elif meta:
            sd[name] = torch.empty(s, device="meta")
        elif name.endswith("running_var"):
            sd[name] = 0.5 + torch.rand(s, generator=g)
        else:
            sd[name] = 0.05 * torch.randn(s, generator=g)
    return sd


def save_like_official(path, model: dict[str, torch.Tensor], **shape_args) -> None:
    """misc.save_model's layout: model, optimizer, epoch, scaler and the argparse Namespace."""
    args = argparse.Namespace(model="sim_vit_base_patch16", loss_type="sim", decoder_embed_dim=768, projector_depth=2,
                              predictor_depth=4, use_proj_ln=False, use_pred_ln=False, online_ln=False,
                              init_values=None, input_size=224, **shape_args)
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                "epoch": 1599, "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}, path)


def finetune_state(shape: dict, classes: int = 10, global_pool: bool = True, seed: int = 1) -> dict[str, torch.Tensor]:
    """models_vit.VisionTransformer names: global_pool -> fc_norm and no norm, pos_embed [1, 1+N, D];
    token -> norm, pos_embed [1, N, D] + cls_pos_embed [1, 1, D]; head [classes, D]."""
    g = torch.Generator().manual_seed(seed)
    d, grid = shape["dim"], shape["img"] // shape["patch"]
    shapes = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, 3, shape["patch"], shape["patch"]),
              "patch_embed.proj.bias": (d,), "head.weight": (classes, d), "head.bias": (classes,)}
    for i in range(shape["depth"]):
        shapes.update(_block(f"blocks.{i}.", d, int(d * shape["mlp"]), bn=False))
    shapes.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,)} if global_pool else {"norm.weight": (d,), "norm.bias": (d,)})
    sd = {k: 0.05 * torch.randn(s, generator=g) + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
          for k, s in shapes.items()}
    table = sincos_table(d, grid)
    if global_pool:
        sd["pos_embed"] = table
    else:
        sd["pos_embed"], sd["cls_pos_embed"] = table[:, 1:], table[:, :1]
    return sd


def reference_features(sd: dict[str, torch.Tensor], images: torch.Tensor, heads: int, prefix: str = "") -> torch.Tensor:
    """The official encoder forward (models_sim target path / models_vit.forward_features) in plain
    torch ops on official-named tensors: conv patches + fixed table, class token, pre-norm blocks
    (LayerNorm eps 1e-6, softmax attention, exact GELU MLP); no final norm. -> [B, 1+N, D]."""
    import torch.nn.functional as F

    w = sd[f"{prefix}patch_embed.proj.weight"]
    x = F.conv2d(images, w, sd[f"{prefix}patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    pe = sd["pos_embed"] if "cls_pos_embed" not in sd else torch.cat([sd["cls_pos_embed"], sd["pos_embed"]], 1)
    x = torch.cat([sd[f"{prefix}cls_token"].expand(x.shape[0], -1, -1), x], 1) + pe
    b, n, d = x.shape
    i = 0
    while f"{prefix}blocks.{i}.norm1.weight" in sd:
        p = f"{prefix}blocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(
            b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        i += 1
    return x

"""Analytic training FLOPs per sample of SIM (for throughput and MFU), 2 FLOPs per MAC.

Counted: every matmul (Linear, patch-embedding conv, attention's QK^T and AV), forward and
backward; not counted: norms, softmax, GELU, adds (a few % of a ViT's time, not of its FLOPs).
- online encoder blocks on 1+V tokens: forward + backward = 3x forward, + the recomputation
  under activation checkpointing (one forward less each block's fc2, see `_recompute`): counted
  in `train_flops_per_sample` (hardware FLOPs, HFU), not in `model_flops_per_sample` (MFU);
- online patch embedding: forward only (frozen, input needs no gradient);
- projector on 1+V tokens and predictor blocks on 1+V+N tokens, head on N tokens: 3x forward;
  the relative-embedding Linear(2D->D): 2x (its input needs no gradient: weight gradient only);
- target (EMA) patch embedding, encoder and projector on 1+N tokens: forward only;
- UniGrad: C = t^T t, p C forward and its input gradient: 3 x 2 N D^2 per sample (dense term),
  3 x 2 D^2 (global term).
"""
from __future__ import annotations

from simscale.config import Config


def block_macs(tokens: int, dim: int, mlp_hidden: int) -> int:
    """MACs of one pre-norm ViT block on one sequence: qkv + proj + MLP + QK^T + AV."""
    return tokens * 4 * dim * dim + 2 * tokens * dim * mlp_hidden + 2 * tokens * tokens * dim


def forward_flops_breakdown(cfg: Config) -> dict[str, int]:
    """FLOPs of one forward pass per image, by part (no backward, no loss)."""
    m = cfg.model
    grid = m.img_size // m.patch_size
    n = grid * grid
    visible = n - round(cfg.data.mask.ratio * n)
    e, d = m.embed_dim, m.decoder_dim
    enc_hidden, dec_hidden = int(e * m.mlp_ratio), int(d * m.mlp_ratio)
    out_dim = m.patch_size**2 * 3 if m.target == "pixel" else d
    patch = 2 * n * 3 * m.patch_size**2 * e
    parts = {
        "online_patch_embed": patch,
        "online_encoder": 2 * m.depth * block_macs(1 + visible, e, enc_hidden),
        "projector": 2 * ((1 + visible) * e * d + m.projector_depth * block_macs(1 + visible, d, dec_hidden)),
        "predictor": 2 * (m.predictor_depth * block_macs(1 + visible * m.predictor_visible + n, d, dec_hidden)
                          + n * d * out_dim),
        "relative_embed": 2 * n * 2 * d * d,
        "target": 0,
    }
    if m.target != "pixel":
        parts["target"] = (
            patch
            + 2 * m.depth * block_macs(1 + n, e, enc_hidden)
            + 2 * ((1 + n) * e * d + m.projector_depth * block_macs(1 + n, d, dec_hidden))
        )
    parts["total"] = sum(parts.values())
    return parts


def _recompute(cfg: Config) -> int:
    """Checkpointed blocks re-run in backward, except each block's last matmul (fc2): torch's
    non-reentrant checkpoint stops recomputing once every saved tensor is back (early stop)."""
    m = cfg.model
    n = (m.img_size // m.patch_size) ** 2
    tokens = 1 + n - round(cfg.data.mask.ratio * n)
    fc2 = 2 * tokens * int(m.embed_dim * m.mlp_ratio) * m.embed_dim
    return forward_flops_breakdown(cfg)["online_encoder"] - m.depth * fc2


def train_flops_breakdown(cfg: Config) -> dict[str, int]:
    """FLOPs of one training step per image, by part, and their "total"."""
    m = cfg.model
    fwd = forward_flops_breakdown(cfg)
    n = (m.img_size // m.patch_size) ** 2
    out_dim = m.patch_size**2 * 3 if m.target == "pixel" else m.decoder_dim
    parts = {
        "online_patch_embed": fwd["online_patch_embed"],
        "online_encoder": 3 * fwd["online_encoder"] + (_recompute(cfg) if m.grad_checkpointing else 0),
        "projector": 3 * fwd["projector"],
        "predictor": 3 * fwd["predictor"] + 2 * fwd["relative_embed"],
        "target": fwd["target"],
        "loss": 0,
    }
    if cfg.loss.a_dense:
        parts["loss"] += 3 * 2 * n * out_dim * out_dim
    if cfg.loss.a_global:
        parts["loss"] += 3 * 2 * out_dim * out_dim
    parts["total"] = sum(parts.values())
    return parts


def train_flops_per_sample(cfg: Config) -> int:
    """FLOPs of one training step per image (online fwd+bwd, target fwd, loss), as executed:
    activation recomputation included when checkpointing is on. The numerator of HFU."""
    return train_flops_breakdown(cfg)["total"]


def model_flops_per_sample(cfg: Config) -> int:
    """FLOPs the training step needs per image without any recomputation: the numerator of MFU
    (the same for a run with and without activation checkpointing)."""
    total = train_flops_per_sample(cfg)
    return total - _recompute(cfg) if cfg.model.grad_checkpointing else total

"""Projector (Linear + blocks) and predictor (mask-token queries + blocks + Linear) of SIM.

Their transformer blocks are timm's Block with either a token BatchNorm synced across ranks
("bn", the release) or LayerNorm ("ln") as norm layer.
"""
from __future__ import annotations

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from simscale.config import ModelConfig
from simscale.model.encoder import gather_tokens
from simscale.model.pos_embed import abs_pos_embed_2d, relative_pos_embed
from simscale.model.sync_batchnorm import TokenBatchNorm


def norm_layer(kind: str):
    if kind == "bn":
        return TokenBatchNorm
    if kind == "ln":
        return LayerNorm
    raise ValueError(f"decoder norm must be 'bn' or 'ln', got {kind!r}")


def decoder_blocks(m: ModelConfig, depth: int) -> nn.ModuleList:
    norm = norm_layer(m.decoder_norm)
    return nn.ModuleList(
        Block(m.decoder_dim, m.decoder_heads, m.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
    )


class Projector(nn.Module):
    """Linear(embed_dim -> D) then `projector_depth` blocks of width D; keeps the sequence length."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(m.embed_dim, m.decoder_dim)
        self.blocks = decoder_blocks(m, m.projector_depth)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class Predictor(nn.Module):
    """Predicts view B's N patch targets from projected [cls; visible A] tokens.

    Input sequence (1+V+N): projected cls; projected visible A tokens + fixed sin-cos PE (width D)
    of their A positions; N copies of the learned mask token, each + Linear(2D->D) of the
    relative position/scale embedding of its view-B patch. Output: head(last N tokens).
    """

    def __init__(self, m: ModelConfig, out_dim: int):
        super().__init__()
        self.grid = m.img_size // m.patch_size
        self.dim = m.decoder_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, m.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", abs_pos_embed_2d(self.grid, m.decoder_dim).unsqueeze(0), persistent=False)
        self.rel_proj = nn.Linear(2 * m.decoder_dim, m.decoder_dim)
        self.blocks = decoder_blocks(m, m.predictor_depth)
        self.head = nn.Linear(m.decoder_dim, out_dim)
        self.visible = m.predictor_visible

    def forward(self, z: Tensor, ids_keep: Tensor, geometry: Tensor) -> Tensor:
        """z [B, 1+V, D] projected tokens, ids_keep [B, V] their A positions, geometry [B, 6]
        -> predictions [B, G*G, out_dim] in view-B raster order."""
        b = z.shape[0]
        pe = gather_tokens(self.pos_embed.expand(b, -1, -1), ids_keep).to(z.dtype)
        rel = relative_pos_embed(geometry, self.dim, self.grid).to(z.dtype)
        queries = self.mask_token.to(z.dtype) + self.rel_proj(rel)
        n = queries.shape[1]
        parts = [z[:, :1], z[:, 1:] + pe] if self.visible else [z[:, :1]]
        x = torch.cat([*parts, queries.to(z.dtype)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[:, -n:])

"""The ViT encoder of both branches: timm's PatchEmbed and Blocks, fixed sin-cos PE, masking.

One module owns patch embedding, cls token, PE buffer and blocks, and does the masking inside its
own forward: under ZeRO-3 a parameter is gathered only while its own module runs, so no parent
may read `cls_token` or the patch-embedding weight. Parameter names are timm's
(`patch_embed.proj.*`, `cls_token`, `blocks.N.*`, `norm.*`), so the online encoder exports to
`timm.create_model(arch)` by adding timm's `pos_embed` (= `Encoder.pos_embed`) and, when
`final_norm` is off, an identity final norm.
"""
from __future__ import annotations

import torch
from timm.layers import LayerNorm, PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from simscale.config import ModelConfig
from simscale.model.pos_embed import abs_pos_embed_2d


def visible_indices(mask: Tensor, num_visible: int | None = None) -> Tensor:
    """mask bool [B, L] (True = masked, the same count in every row) -> kept indices [B, V].

    Ascending (raster) order. Pass `num_visible` (known from the mask ratio and grid) and nothing
    waits for the device: the equal-count check is an asynchronous assert (immediate on CPU).
    Without it V is read from the first row (one host sync). Gathering by index avoids boolean
    indexing's syncs.
    """
    keep = ~mask
    if num_visible is None:
        num_visible = int(keep[0].sum())
    try:
        torch._assert_async((keep.sum(1) == num_visible).all(),
                            "every row of the mask must hide the same number of patches")
    except RuntimeError as exc:  # raised right away on CPU
        raise ValueError(f"every row of the mask must hide the same number of patches "
                         f"({mask.shape[1] - num_visible})") from exc
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible first, raster order
    return order[:, :num_visible]


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x [B, L, C], ids [B, V] -> x[b, ids[b]]: [B, V, C]."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Encoder(nn.Module):
    """Patch embed (frozen) + fixed 2D sin-cos PE + drop masked + cls (zero PE) + ViT blocks."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.grid = m.img_size // m.patch_size
        self.embed_dim = m.embed_dim
        self.patch_embed = PatchEmbed(img_size=m.img_size, patch_size=m.patch_size, in_chans=3, embed_dim=m.embed_dim)
        self.patch_embed.requires_grad_(not m.freeze_patch_embed)  # frozen at init (MoCo-v3 trick)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, m.embed_dim))
        nn.init.normal_(self.cls_token, std=0.02)
        # cls row of zeros by padding: torch.zeros would be bf16 under zero.Init (see pos_embed.py)
        pe = nn.functional.pad(abs_pos_embed_2d(self.grid, m.embed_dim), (0, 0, 1, 0))
        self.register_buffer("pos_embed", pe.unsqueeze(0), persistent=False)  # [1, 1+G*G, C], timm layout
        rates = [m.drop_path * i / max(m.depth - 1, 1) for i in range(m.depth)]  # timm's linear rule
        self.blocks = nn.ModuleList(
            Block(m.embed_dim, m.num_heads, m.mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=LayerNorm)
            for r in rates
        )
        self.norm = LayerNorm(m.embed_dim) if m.final_norm else nn.Identity()
        self.grad_checkpointing = m.grad_checkpointing

    def forward(self, images: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """images [B, 3, H, W], ids_keep [B, V] (`visible_indices(mask)`) or None for all patches
        -> tokens [B, 1+V, C] (cls first)."""
        x = self.patch_embed(images)
        x = x + self.pos_embed[:, 1:].to(x.dtype)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)  # zero PE
        x = torch.cat([cls, x], dim=1)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return self.norm(x)

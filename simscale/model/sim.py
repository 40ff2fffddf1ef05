"""SIM: online encoder + projector + predictor, and the momentum target (encoder + projector).

    model = SIM(cfg)
    out = model(view_a, view_b, geometry, mask)   # out["pred"], out["target"]: [B, N, D_out]
    loss, stats = model.loss(out)
    model.ema_pairs()          # [(name, online_param, target_param)], fixed order
    model.online_parameters()  # what the optimizer trains

Online and target branches are built by the same function (`build_branch`), so their parameter
names and shapes line up by construction; the target starts as an exact copy and never gets
gradients. Everything works under `deepspeed.zero.Init` (parameters gathered for init and copy).

Pixel target (cfg.model.target == "pixel"): no target branch; the target of each view-B patch is
its pixels (the already mean/std-normalised view B), flattened (p, p, 3) as in MAE and then
normalised per patch (mean 0, var 1 over the patch, torch's unbiased var, eps 1e-6: MAE's
norm_pix_loss); the predictor's head then outputs patch_size^2 * 3 values and the loss is the
same UniGrad with cfg.loss (lam=0 gives plain MSE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simscale.config import Config, ModelConfig
from simscale.data.masking import num_masked
from simscale.loss import unigrad_loss
from simscale.model.decoder import Predictor, Projector
from simscale.model.encoder import Encoder, visible_indices
from simscale.zero import gathered as _gathered  # imports deepspeed only for ZeRO-3 params


class Branch(nn.Module):
    """Encoder + projector: the online branch before the predictor, and the target branch."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.encoder = Encoder(m)
        self.projector = Projector(m)

    def forward(self, images: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        return self.projector(self.encoder(images, ids_keep))


def build_branch(m: ModelConfig) -> Branch:
    branch = Branch(m)
    init_weights(branch)
    return branch


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """MAE-style init: xavier-uniform Linear (bias 0) and patch projection (as a Linear)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            with _gathered([sub.weight] + ([sub.bias] if sub.bias is not None else [])):
                nn.init.xavier_uniform_(sub.weight)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Conv2d) and name.endswith("patch_embed.proj"):
            with _gathered([sub.weight]):
                nn.init.xavier_uniform_(sub.weight.view(sub.weight.shape[0], -1))


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, 3, H, W] -> [B, (H/p)*(W/p), p*p*3], patches row-major, pixels (p, p, c) as in MAE."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def pixel_target(images: Tensor, patch: int, eps: float = 1e-6) -> Tensor:
    x = patchify(images.float(), patch)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / (var + eps).sqrt()


class SIM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.pixel = m.target == "pixel"
        self.grid = m.img_size // m.patch_size
        self.out_dim = m.patch_size**2 * 3 if self.pixel else m.decoder_dim
        self.online = build_branch(m)
        self.predictor = Predictor(m, self.out_dim)
        init_weights(self.predictor)
        self.target: Branch | None = None
        if not self.pixel:
            self.target = build_branch(m)
            self.target.encoder.grad_checkpointing = False
            self.target.requires_grad_(False)
            self.copy_online_to_target()

    # -- structure ---------------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        """The online encoder: what downstream uses and `simscale export` writes."""
        return self.online.encoder

    def ema_pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        if self.target is None:
            return []
        pairs = []
        for (name, po), (name_t, pt) in zip(self.online.named_parameters(), self.target.named_parameters()):
            assert name == name_t, (name, name_t)
            pairs.append((name, po, pt))
        return pairs

    def online_parameters(self) -> list[nn.Parameter]:
        params = list(self.online.parameters()) + list(self.predictor.parameters())
        return [p for p in params if p.requires_grad]

    def compile_encoder_blocks(self) -> None:
        """torch.compile each encoder block in place (names and parameters unchanged, so
        checkpoints and the EMA pairing do not see it). Not under ZeRO-3 (config refuses it)."""
        for branch in (self.online, self.target):
            if branch is not None:
                for blk in branch.encoder.blocks:
                    blk.compile()

    @torch.no_grad()
    def copy_online_to_target(self) -> None:
        for _, po, pt in self.ema_pairs():
            with _gathered([po, pt]):
                pt.copy_(po)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, view_a: Tensor, view_b: Tensor, geometry: Tensor, mask: Tensor) -> dict[str, Tensor]:
        ids_keep = visible_indices(mask, mask.shape[1] - num_masked(self.grid, self.cfg.data.mask.ratio))
        z = self.online(view_a, ids_keep)
        pred = self.predictor(z, ids_keep, geometry)
        with torch.no_grad():
            if self.target is None:
                target = pixel_target(view_b, self.cfg.model.patch_size)
            else:
                t = self.target(view_b)[:, 1:]
                target = F.layer_norm(t.float(), t.shape[-1:], eps=1e-5)
        return {"pred": pred, "target": target}

    def loss(self, out: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return unigrad_loss(out["pred"], out["target"], self.cfg.loss)


def build_sim(cfg: Config) -> SIM:
    return SIM(cfg)

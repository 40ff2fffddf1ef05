"""Sanity baselines for bench/learning_curve.py: other self-supervised methods on SIM's encoder.

Every SIM number is read against a method known to learn on the same encoder, views, data order,
optimizer, schedule and k-NN protocol. The baselines are SIM-shaped modules (same `forward(view_a,
view_b, geometry, mask)` / `loss(out)` / `encoder` interface), so simscale's own Trainer trains
them unchanged: `learning_curve.py` swaps the class the Trainer builds (`method=simclr`).

- SimCLR (Chen et al. 2020): both views unmasked through the encoder, the readout of
  `model.pool` (class token or mean patch token) -> MLP head (Linear-BN-ReLU-Linear, 128-d) ->
  NT-Xent over the 2B embeddings of the batch (temperature 0.2).
- MAE-style (He et al. 2022) on SIM's inputs: view A masked as SIM masks it, the predictor
  reconstructs view A's own patches (normalised pixels, MAE's norm_pix_loss); the loss is
  MAE's, on the masked patches only; no second view, no target network.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simscale.data.masking import num_masked
from simscale.model.encoder import visible_indices
from simscale.model.sim import SIM, pixel_target
from simscale.train.online_knn import pool_tokens


def _without_target(cfg):
    cfg = copy.deepcopy(cfg)
    cfg.model.target = "pixel"  # no EMA branch: these methods have none
    return cfg


class SimCLR(SIM):
    temperature = 0.2

    def __init__(self, cfg):
        super().__init__(_without_target(cfg))
        d, hidden, out = cfg.model.embed_dim, 4 * cfg.model.embed_dim, 128
        self.online.projector = nn.Identity()  # unused; removed so no parameter goes without gradient
        self.predictor = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, out))

    def forward(self, view_a: Tensor, view_b: Tensor, geometry: Tensor, mask: Tensor) -> dict[str, Tensor]:
        h = pool_tokens(self.online.encoder(torch.cat([view_a, view_b])), self.cfg.model.pool)
        return {"z": F.normalize(self.predictor(h).float(), dim=-1)}

    def loss(self, out: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        z = out["z"]
        n = z.shape[0] // 2
        logits = (z @ z.T / self.temperature).fill_diagonal_(float("-inf"))
        labels = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # the other view of the image
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss_simclr": loss.detach()}


class MAE(SIM):
    """The pixel-target SIM with view B := view A and identity geometry: same-view reconstruction."""

    def __init__(self, cfg):
        super().__init__(_without_target(cfg))

    def forward(self, view_a: Tensor, view_b: Tensor, geometry: Tensor, mask: Tensor) -> dict[str, Tensor]:
        ident = geometry.new_tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0]).expand_as(geometry)
        ids_keep = visible_indices(mask, mask.shape[1] - num_masked(self.grid, self.cfg.data.mask.ratio))
        pred = self.predictor(self.online(view_a, ids_keep), ids_keep, ident)
        return {"pred": pred, "target": pixel_target(view_a, self.cfg.model.patch_size), "mask": mask}

    def loss(self, out: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # MAE's loss: mean squared error per patch, averaged over the masked patches only (the
        # visible ones are in the input; counting them would reward copying).
        per_patch = (out["pred"].float() - out["target"]).pow(2).mean(-1)
        masked = out["mask"].to(per_patch.dtype)
        loss = (per_patch * masked).sum() / masked.sum()
        return loss, {"loss_mae": loss.detach()}


METHODS = {"simclr": SimCLR, "mae": MAE}

"""Online k-NN monitor: what the encoders learned, measured while they train (`eval.every=N`).

It is `simscale eval knn` on the live modules: the same shard reader and eval transform
(`simscale.eval.features`), the same pooled feature a timm user gets from the export (`model.pool`:
the class token by default, no final norm in the release), the same weighted vote
(`simscale.eval.knn`). Checked against the exported model in tests/train/test_online_knn.py.

Why the images are decoded once and kept: an evaluation then costs two encoder forwards over the
labelled images and one similarity matmul, so it can run often (the quickstart's goal is <= 5% of
training time). Each rank keeps and encodes only its own contiguous share, padded so that every
rank runs the same number of forwards: under ZeRO-3 every forward is a collective (parameters
are gathered layer by layer), so the ranks must step through it together. Features and labels
are then all-gathered and every rank computes the same top-1.

The first evaluation of each start (step 0 on a fresh run: the random-init figure) also logs
`knn_pixels_top1`, the same k-NN on the eval-transformed images themselves (`simscale eval knn
--pixels`), computed by rank 0 while every rank still holds the whole split: with step 0's encoder
figure, the two reference lines of `report`'s knn.png.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from simscale.config import EvalConfig
from simscale.data.remote import IOOptions
from simscale.data.shards import resolve_shards
from simscale.errors import DataError
from simscale.knn import knn_top1


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def decode_split(spec: str, img_size: int, limit: int, opts: IOOptions | None = None) -> tuple[Tensor, Tensor]:
    """The whole labelled split (at most `limit` samples) as eval-transformed float images + labels."""
    from simscale.data.labelled import IMAGENET_MEAN, IMAGENET_STD, eval_transform, labelled_batches

    shards = resolve_shards(spec, opts)
    transform = eval_transform(img_size, IMAGENET_MEAN, IMAGENET_STD)
    images, labels = [], []
    for x, y in labelled_batches(shards, transform, batch_size=256, workers=0, opts=opts):
        images.append(x)
        labels.append(y)
        if sum(len(t) for t in labels) >= limit:
            break
    if not images:
        raise DataError(f"eval shards '{spec}' hold no samples")
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


def rank_share(images: Tensor, labels: Tensor, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """This rank's contiguous share, padded to the same length on every rank (labels -1 on padding)."""
    total = len(labels)
    per_rank = math.ceil(total / world)
    lo, hi = min(rank * per_rank, total), min((rank + 1) * per_rank, total)
    own_x, own_y = images[lo:hi], labels[lo:hi]
    pad = per_rank - len(own_y)
    if pad:
        own_x = torch.cat([own_x, own_x.new_zeros(pad, *images.shape[1:])])
        own_y = torch.cat([own_y, own_y.new_full((pad,), -1)])
    return own_x.contiguous(), own_y


# The raw-pixel baseline costs n_train x n_val x 3 S^2 multiply-adds on rank 0's device, once; past
# this budget (e.g. 20000 images a split at 224 px) no pixel figure is logged (knn.png then has no
# raw-pixel line) and `simscale eval knn --pixels` is the way to it.
PIXEL_BUDGET_MACS = 2e12


def pixels_top1(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], cfg: EvalConfig,
                device: torch.device) -> float | None:
    """k-NN top-1 (%) of the eval-transformed images themselves, as `simscale eval knn --pixels`:
    the figure an encoder must beat. None when over PIXEL_BUDGET_MACS."""
    (tx, ty), (vx, vy) = train, val
    if len(ty) * len(vy) * tx[0].numel() > PIXEL_BUDGET_MACS:
        return None
    n_classes = int(max(ty.max(), vy.max())) + 1
    return 100.0 * knn_top1(tx.flatten(1).to(device), ty, vx.flatten(1).to(device), vy, cfg.k, cfg.temperature,
                            n_classes)


POOLS = ("token", "avg")


def pool_tokens(tokens: Tensor, pool: str = "token") -> Tensor:
    """[B, 1+N, C] -> [B, C]: the class token, or the mean of the patch tokens (timm's avg pool
    skips the class token)."""
    return tokens[:, 0] if pool == "token" else tokens[:, 1:].mean(1)


def pooled(encoder: nn.Module, images: Tensor, pool: str = "token") -> Tensor:
    """The exported timm model's pre-logits (no final norm in the release) for `model.pool`."""
    return pool_tokens(encoder(images), pool)


class OnlineKNN:
    def __init__(self, cfg: EvalConfig, img_size: int, device: torch.device, dtype: torch.dtype,
                 pool: str = "token", io: IOOptions | None = None):
        """`io`: the run's shard I/O options (data.io_*, data.cache_*), as the training stream uses."""
        self.cfg, self.device, self.dtype, self.pool = cfg, device, dtype, pool
        self.rank, self.world = _world()
        train = decode_split(cfg.train, img_size, cfg.max_samples, io)
        val = decode_split(cfg.val, img_size, cfg.max_samples, io)
        self.n_train, self.n_val = len(train[1]), len(val[1])
        # Rank 0 logs the metrics: only it scores the raw pixels (logged with this start's first evaluation).
        self.pixels = pixels_top1(train, val, cfg, device) if self.rank == 0 else None
        self.train_x, self.train_y = rank_share(*train, self.rank, self.world)
        self.val_x, self.val_y = rank_share(*val, self.rank, self.world)

    @torch.no_grad()
    def _features(self, encoder: nn.Module, images: Tensor) -> dict[str, Tensor]:
        """Both readouts from one forward: {pool: [n, C]}."""
        out: dict[str, list[Tensor]] = {p: [] for p in POOLS}
        bs = self.cfg.batch_size
        for s in range(0, len(images), bs):  # same count on every rank (equal padded shares)
            tokens = encoder(images[s:s + bs].to(self.device, self.dtype, non_blocking=True))
            for p in POOLS:
                out[p].append(pool_tokens(tokens, p).float())
        return {p: torch.cat(v) for p, v in out.items()}

    def _gather(self, t: Tensor) -> Tensor:
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def split_features(self, encoder: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """This rank's (train, val) features, both readouts, the encoder in eval mode meanwhile."""
        was = encoder.training
        encoder.eval()
        try:
            return self._features(encoder, self.train_x), self._features(encoder, self.val_x)
        finally:
            encoder.train(was)

    def _top1(self, encoder: nn.Module) -> dict[str, float]:
        """{pool: percent} for both readouts."""
        tf, vf = self.split_features(encoder)
        ty, vy = self._gather(self.train_y.to(self.device)), self._gather(self.val_y.to(self.device))
        tk, vk = ty >= 0, vy >= 0  # drop the padding rows
        n_classes = int(max(ty.max(), vy.max())) + 1
        return {p: 100.0 * knn_top1(self._gather(tf[p])[tk].cpu(), ty[tk].cpu(), self._gather(vf[p])[vk].cpu(),
                                    vy[vk].cpu(), self.cfg.k, self.cfg.temperature, n_classes)
                for p in POOLS}

    def evaluate(self, encoders: dict[str, nn.Module]) -> dict[str, float]:
        """{'knn_<name>_top1': percent of the exported readout (`model.pool`), 'knn_<name>_<other
        pool>_top1': the other readout (monitored, not exported), ..., 'eval_time': s};
        collective: every rank calls it."""
        t0 = time.perf_counter()
        out = {}
        for name, enc in encoders.items():
            top1 = self._top1(enc)
            out[f"knn_{name}_top1"] = top1[self.pool]
            for p in POOLS:
                if p != self.pool:
                    out[f"knn_{name}_{p}_top1"] = top1[p]
        out["eval_time"] = time.perf_counter() - t0
        if self.pixels is not None:  # the reference line, once per start: with its first evaluation
            out["knn_pixels_top1"], self.pixels = self.pixels, None
        return out

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


def load_split(spec: str, img_size: int, limit: int, rank: int, world: int,
               opts: IOOptions | None = None) -> tuple[Tensor, Tensor, int]:
    """This rank's share of a labelled split as eval-transformed float images.

    Returns (images [n_pad, 3, S, S], labels [n_pad] with -1 on padding rows, total count).
    """
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
    images, labels = torch.cat(images)[:limit], torch.cat(labels)[:limit]
    total = len(labels)
    per_rank = math.ceil(total / world)
    lo, hi = min(rank * per_rank, total), min((rank + 1) * per_rank, total)
    own_x, own_y = images[lo:hi], labels[lo:hi]
    pad = per_rank - len(own_y)
    if pad:
        own_x = torch.cat([own_x, own_x.new_zeros(pad, *images.shape[1:])])
        own_y = torch.cat([own_y, own_y.new_full((pad,), -1)])
    return own_x.contiguous(), own_y, total


def pooled(encoder: nn.Module, images: Tensor, pool: str = "token") -> Tensor:
    """The exported timm model's pre-logits (no final norm in the release): the class token, or
    for `model.pool=avg` the mean of the patch tokens (timm's avg pool skips the class token)."""
    tokens = encoder(images)
    return tokens[:, 0] if pool == "token" else tokens[:, 1:].mean(1)


class OnlineKNN:
    def __init__(self, cfg: EvalConfig, img_size: int, device: torch.device, dtype: torch.dtype,
                 pool: str = "token", io: IOOptions | None = None):
        """`io`: the run's shard I/O options (data.io_*, data.cache_*), as the training stream uses."""
        self.cfg, self.device, self.dtype, self.pool = cfg, device, dtype, pool
        self.rank, self.world = _world()
        self.train_x, self.train_y, self.n_train = load_split(cfg.train, img_size, cfg.max_samples,
                                                              self.rank, self.world, io)
        self.val_x, self.val_y, self.n_val = load_split(cfg.val, img_size, cfg.max_samples,
                                                        self.rank, self.world, io)

    @torch.no_grad()
    def _features(self, encoder: nn.Module, images: Tensor) -> Tensor:
        out = []
        bs = self.cfg.batch_size
        for s in range(0, len(images), bs):  # same count on every rank (equal padded shares)
            x = images[s:s + bs].to(self.device, self.dtype, non_blocking=True)
            out.append(pooled(encoder, x, self.pool).float())
        return torch.cat(out)

    def _gather(self, t: Tensor) -> Tensor:
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def _top1(self, encoder: nn.Module) -> float:
        was = encoder.training
        encoder.eval()
        try:
            tf = self._gather(self._features(encoder, self.train_x))
            vf = self._gather(self._features(encoder, self.val_x))
        finally:
            encoder.train(was)
        ty, vy = self._gather(self.train_y.to(self.device)), self._gather(self.val_y.to(self.device))
        tk, vk = ty >= 0, vy >= 0  # drop the padding rows
        n_classes = int(max(ty.max(), vy.max())) + 1
        return 100.0 * knn_top1(tf[tk].cpu(), ty[tk].cpu(), vf[vk].cpu(), vy[vk].cpu(), self.cfg.k,
                                self.cfg.temperature, n_classes)

    def evaluate(self, encoders: dict[str, nn.Module]) -> dict[str, float]:
        """{'knn_<name>_top1': percent, ..., 'eval_time': s}; collective: every rank calls it."""
        t0 = time.perf_counter()
        out = {f"knn_{name}_top1": self._top1(enc) for name, enc in encoders.items()}
        out["eval_time"] = time.perf_counter() - t0
        return out

"""The two-view stream each rank iterates: shards -> (rank, worker) slots -> decoded batches.

Exact-epoch mode ("epoch"), the default:
- Per epoch the shard order is a permutation drawn from (seed, epoch) only. Consecutive shards
  of that order form groups of `data.shard_interleave`; inside a group the samples of its shards
  alternate (round-robin in stored order, a shard that runs out drops out), so any stretch of the
  sequence mixes several shards even when the shards themselves are sorted. The groups,
  concatenated, form one global sequence of samples, computed from the manifest's counts alone.
- Each rank takes `batches_per_epoch * B` consecutive positions of it (batches_per_epoch =
  total // (B * world_size), the same on every rank, so no rank waits at a collective). The
  remainder that does not fill a last global batch is DROPPED; it lies at the end of the
  permuted order, so which samples are dropped changes from epoch to epoch.
- Within a rank, batch k belongs to virtual slot k % S (S = max(1, num_workers)). Each slot owns
  a contiguous range, opens only the shards overlapping it and skips (reads, never decodes) to
  its start. The DataLoader asks workers round-robin, so on a resume at batch `skip` worker w
  serves slot (skip + w) % S: the batch -> samples map never depends on which process decodes.
- Inside a slot, samples are shuffled in chunks (a multiple of B, about data.shuffle_buffer)
  with a permutation from (seed, epoch, chunk start): a shuffle buffer that can be replayed.
Resampled mode ("resampled"): each slot draws shards with replacement (wds.ResampledShards,
seeded from (seed, epoch, rank, slot)); an epoch is data.samples_per_epoch samples (default:
the manifest total) and ends after batches_per_epoch batches on every rank (the role of
webdataset's with_epoch, counted here per slot so that resume can replay it). `index` is then
a unique per-epoch id (slot base + position in the slot's stream), not a manifest position.

Per-sample randomness (flips, boxes, mask, photometric parameters) comes from a generator
seeded with (seed, epoch, index), `index` being the sample's position in the epoch's global
sequence, so any sample can be reproduced alone. A resume position is (epoch, batches this
rank already consumed in it); resuming needs the same world size and num_workers.
"""
from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from simscale.data import remote
from simscale.data.masking import block_mask
from simscale.data.photometric import draw_params, sigma_range_for
from simscale.data.shards import ShardSet, resolve_shards
from simscale.data.views import TwoViewCrop
from simscale.errors import DataError

_SHARD_ORDER, _CHUNK_ORDER = 1, 2  # stream ids so the seeds of different draws never collide


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The epoch's shard permutation: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(num_shards)


def group_sequence(counts: list[int]) -> list[tuple[int, int]]:
    """(member, offset) pairs of one interleave group: round-robin over its shards' samples."""
    return [(i, r) for r in range(max(counts, default=0)) for i, c in enumerate(counts) if r < c]


def epoch_sequence(seed: int, epoch: int, counts: list[int], interleave: int):
    """The epoch's global sample order as (shard, offset) pairs, lazily, group by group.

    Yields (group_start, shards, sequence) per group so that a reader can skip whole groups by
    their sample counts without building the sequence of the whole epoch."""
    order = shard_order(seed, epoch, len(counts))
    pos = 0
    for g in range(0, len(order), max(1, interleave)):
        shards = [int(s) for s in order[g:g + max(1, interleave)]]
        size = sum(counts[s] for s in shards)
        yield pos, shards, size
        pos += size


def sample_rngs(seed: int, epoch: int, index: int) -> list[np.random.Generator]:
    """Independent generators (crop, mask, photometric) for one sample of one epoch."""
    ss = np.random.SeedSequence([seed, epoch, int(index)])
    return [np.random.Generator(np.random.PCG64(s)) for s in ss.spawn(3)]


class _Unreadable(Exception):
    """A sample that cannot become a training example (no image member, undecodable bytes)."""


_reported: set[tuple[str, str]] = set()


def _report(url: str, key: str, text: str) -> None:
    """Name a bad shard or sample once per process, on stderr (rank/worker processes included)."""
    if (url, key) in _reported:
        return
    _reported.add((url, key))
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]{text}[/yellow]", highlight=False, soft_wrap=True)


def _read_shard(url: str, skip: int = 0) -> Iterator[dict]:
    """Samples of one tar in stored order, raw bytes only (no member is ever decoded here); the
    first `skip` are read but not yielded. The tar is a local file or a URL streamed with retries
    (remote.py; a store still failing after its retries is a DataError naming it). An unreadable
    or truncated tar ends early: the caller counts what is missing (a damaged shard is data to
    skip, not a crash)."""
    try:
        with remote.open_shard(url) as f:
            members = (dict(m, __url__=url) for m in tar_file_iterator(f))
            for n, sample in enumerate(group_by_keys(members)):
                if n >= skip:
                    yield sample
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile/OS/webdataset errors all mean "the rest is unreadable"
        _report(url, "", f"shard '{url}' is unreadable from here on ({type(exc).__name__}): its remaining "
                "samples count as bad; `simscale prepare --verify` checks a shard set")


@dataclass
class _Plan:
    """Everything a worker needs to produce its batches, picklable."""
    urls: list[str]
    counts: list[int] | None
    mode: str
    seed: int
    batch_size: int
    slots: int
    rank: int
    world_size: int
    batches_per_epoch: int
    chunk: int
    img_size: int
    grid: int
    crop: TwoViewCrop
    mask_ratio: float
    min_block: int
    min_aspect: float
    color_aug: bool
    sigma_range: tuple[float, float]
    interleave: int = 1
    io: remote.IOOptions | None = None  # remote shard I/O (retries, cache), set in each worker
    max_bad_fraction: float = 0.01

    def slot_batches(self, slot: int) -> int:
        return max(0, (self.batches_per_epoch - slot + self.slots - 1) // self.slots)

    def slot_start(self, slot: int) -> int:
        rank_start = self.rank * self.batches_per_epoch * self.batch_size
        return rank_start + self.batch_size * sum(self.slot_batches(s) for s in range(slot))

    # ------------------------------------------------------------------ raw samples per slot
    def _exact_raw(self, epoch: int, start: int) -> Iterator[tuple[int, dict]]:
        """(global index, raw sample) from position `start` of the epoch's global sequence."""
        for pos, shards, size in epoch_sequence(self.seed, epoch, self.counts, self.interleave):
            if pos + size <= start:
                continue  # a whole group before the start: never opened
            seq = group_sequence([self.counts[s] for s in shards])
            first = max(0, start - pos)
            skip = [0] * len(shards)  # samples of each member that lie before `first`
            for member, _ in seq[:first]:
                skip[member] += 1
            readers = [_read_shard(self.urls[s], skip=k) for s, k in zip(shards, skip)]
            short = set()
            for n, (member, offset) in enumerate(seq[first:], start=first):
                sample = None if member in short else next(readers[member], None)
                if sample is None:
                    url = self.urls[shards[member]]
                    if member not in short:
                        short.add(member)
                        _report(url, "#short", f"shard '{url}' ends after {offset} of its "
                                f"{self.counts[shards[member]]} samples (truncated or damaged): the missing "
                                "ones count as bad")
                    # a placeholder keeps every position (and rank) in step
                    sample = {"__key__": f"#{offset}", "__url__": url, "__missing__": True}
                yield pos + n, sample
            start = pos + size

    def _resampled_raw(self, epoch: int, slot: int, base: int) -> Iterator[tuple[int, dict]]:
        gid = self.rank * self.slots + slot
        shards = wds.ResampledShards(self.urls, seed=self.seed, deterministic=True,
                                     worker_seed=lambda: gid)
        shards.epoch = epoch - 1  # ResampledShards counts epochs itself, +1 per iteration
        k, empty = base, 0
        for entry in shards:
            before = k
            for sample in _read_shard(entry["url"]):
                yield k, sample
                k += 1
            empty = empty + 1 if k == before else 0
            if empty > 4 * len(self.urls):  # every shard drawn lately was unreadable: never loop forever
                raise _NoData(f"no readable sample in the last {empty} shards drawn from '{self.urls[0]}'...: "
                              "check the shards with `simscale prepare --verify DIR`")

    # ------------------------------------------------------------------ decoded batches
    def _decode(self, epoch: int, index: int, sample: dict) -> dict:
        crop_rng, mask_rng, photo_rng = sample_rngs(self.seed, epoch, index)
        if sample.get("__missing__"):
            raise _Unreadable("missing from its shard")
        data = sample.get("jpg") or sample.get("jpeg") or sample.get("png") or sample.get("webp")
        if not isinstance(data, bytes):
            raise _Unreadable("no .jpg/.jpeg/.png/.webp member")
        try:
            view_a, view_b, geometry = self.crop(data, crop_rng)
        except Exception as exc:  # noqa: BLE001 - any decoder failure: this sample is bad, not the run
            raise _Unreadable(f"cannot be decoded ({type(exc).__name__})") from None
        mask = block_mask(mask_rng, self.grid, self.mask_ratio, self.min_block, self.min_aspect)
        return {"view_a": view_a, "view_b": view_b, "geometry": geometry, "mask": mask,
                "photo_a": draw_params(photo_rng, "a", self.color_aug, self.sigma_range),
                "photo_b": draw_params(photo_rng, "b", self.color_aug, self.sigma_range),
                "label": _label(sample.get("cls")), "index": index}

    def _decode_or_substitute(self, epoch: int, pos: int, items: list, budget: list[int], slot_start) -> dict:
        """Decode items[pos]; if it is bad, count it and decode the next good sample of the same
        chunk in its place (with the bad sample's index, so its crops/mask stay its own draw); if
        the whole chunk is bad, the first good one of the slot's first chunks (`slot_start()`
        re-reads them). Deterministic, so every rank still yields the same number of full
        batches, and a resume replays it exactly."""
        index, sample = items[pos]
        try:
            return self._decode(epoch, index, sample)
        except _Unreadable as why:
            url, key = str(sample.get("__url__", "?")), str(sample.get("__key__", "?"))
            budget[0] -= 1
            if not sample.get("__missing__"):
                _report(url, key, f"skipping sample '{key}' in shard '{url}': {why}; a sample of the same "
                        "chunk stands in for it")
            if budget[0] < 0:
                raise _NoData(f"more than data.max_bad_fraction={self.max_bad_fraction:g} of the samples of "
                              f"this epoch are unreadable (last: '{key}' in '{url}'): check the shards with "
                              "`simscale prepare --verify DIR` and re-run `simscale prepare`") from None
        candidates = [items[(pos + step) % len(items)][1] for step in range(1, len(items))]
        for other in itertools.chain(candidates, (s for _, s in itertools.islice(slot_start(), 4 * self.chunk))):
            try:
                return self._decode(epoch, index, other)
            except _Unreadable:
                continue
        raise _NoData(f"no readable sample in a chunk of {len(items)} around '{sample.get('__key__')}' in "
                      f"'{sample.get('__url__', '?')}': check the shards with `simscale prepare --verify DIR`")

    def batches(self, epoch: int, slot: int, first_local: int) -> Iterator[dict]:
        """Local batches first_local, first_local+1, ... of one slot."""
        B, nb = self.batch_size, self.slot_batches(slot)
        if first_local >= nb:
            return
        length = nb * B
        base = self.slot_start(slot)
        chunk0 = (first_local * B) // self.chunk

        def slot_start():
            return self._exact_raw(epoch, base) if self.mode == "epoch" else self._resampled_raw(epoch, slot, base)

        pos = chunk0 * self.chunk
        # Bad samples this slot may still replace in this epoch (counted from where it starts); at
        # least one unless data.max_bad_fraction=0, so one bad image never stops a small run.
        frac = self.max_bad_fraction
        budget = [max(int(frac * length), 1 if frac > 0 else 0)]
        try:
            if self.mode == "epoch":
                raw = self._exact_raw(epoch, base + chunk0 * self.chunk)
            else:
                raw = self._resampled_raw(epoch, slot, base)
                for _ in range(chunk0 * self.chunk):  # replay without decoding
                    next(raw)
            while pos < length:
                size = min(self.chunk, length - pos)
                items = [next(raw) for _ in range(size)]
                perm = np.random.default_rng([self.seed, epoch, _CHUNK_ORDER, base + pos]).permutation(size)
                for b in range(size // B):
                    local = (pos + b * B) // B
                    if local < first_local:
                        continue
                    yield collate([self._decode_or_substitute(epoch, int(i), items, budget, slot_start)
                                   for i in perm[b * B:(b + 1) * B]])
                pos += size
        except _NoData as exc:
            # Raised in the main process by TwoViewStream.batches: an exception inside a DataLoader
            # worker would reach the user as a multi-line traceback.
            yield {STOP: str(exc)}


class _NoData(Exception):
    """Too many bad samples: the run must stop (one line, raised in the main process)."""


STOP = "__stop__"


def _label(cls) -> int:
    """A .cls member as an ASCII integer; anything else is 'unlabelled' (-1), never an exception."""
    try:
        return int(cls.decode("ascii").strip()) if isinstance(cls, bytes) and len(cls) < 32 else -1
    except (UnicodeDecodeError, ValueError):
        return -1


def collate(samples: list[dict]) -> dict:
    def stack(key):
        return torch.from_numpy(np.stack([s[key] for s in samples]))

    return {
        "view_a": stack("view_a").permute(0, 3, 1, 2).contiguous(),
        "view_b": stack("view_b").permute(0, 3, 1, 2).contiguous(),
        "geometry": stack("geometry"),
        "mask": stack("mask"),
        "photo_a": stack("photo_a"),
        "photo_b": stack("photo_b"),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
    }


class _EpochBatches(IterableDataset):
    def __init__(self, plan: _Plan, epoch: int, skip: int, workers: int):
        self.plan, self.epoch, self.skip, self.workers = plan, epoch, skip, max(1, workers)

    def __iter__(self):
        remote.configure(self.plan.io)
        info = get_worker_info()
        wid = info.id if info is not None else 0
        first = self.skip + wid  # the DataLoader asks worker 0 first, then round-robin
        if first >= self.plan.batches_per_epoch:
            return iter(())
        slot = first % self.plan.slots
        return self.plan.batches(self.epoch, slot, first // self.plan.slots)


def io_options(d) -> remote.IOOptions:
    """Remote shard I/O options from the data config (data.io_*, data.cache_*)."""
    return remote.IOOptions(retries=d.io_retries, timeout=d.io_timeout, cache_dir=d.cache_dir,
                            cache_bytes=int(d.cache_gb * 2**30))


class TwoViewStream:
    """Batches of two views + geometry + mask + photometric parameters for one rank."""

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        d = cfg.data
        io = io_options(d)
        remote.configure(io)  # before resolve_shards: a remote manifest is read with these
        self.shards: ShardSet = resolve_shards(d.train)
        if self.shards.sizes:
            io.expected = {u: (b, h) for u, b, h in zip(self.shards.urls, self.shards.sizes,
                                                        self.shards.sha256 or [None] * len(self.shards.urls))}
        self.rank, self.world_size = rank, world_size
        self.num_workers = d.num_workers
        B = cfg.optim.batch_size
        slots = max(1, d.num_workers)
        if d.mode == "epoch":
            if self.shards.counts is None:
                raise DataError(f"exact-epoch mode needs per-shard sample counts but '{d.train}' has no "
                                "manifest.json: point data.train at a `simscale prepare` output "
                                "(or its manifest), or set data.mode=resampled")
            samples = self.shards.total
        else:
            samples = d.samples_per_epoch or (self.shards.total or 0)
            if not samples:
                raise DataError("resampled mode without a manifest needs data.samples_per_epoch=N")
            if len(self.shards.urls) < slots * world_size:
                warnings.warn(f"{len(self.shards.urls)} shards for {slots * world_size} "
                              "(rank, worker) slots: resampling will repeat shards often; "
                              "write more, smaller shards", stacklevel=2)
        self.samples_per_epoch = samples
        self.batches_per_epoch = samples // (B * world_size)
        if self.batches_per_epoch < 1:
            raise DataError(f"{samples} samples cannot fill one global batch of {B} x {world_size} "
                            "ranks: lower optim.batch_size or add data")
        m = cfg.model
        self.plan = _Plan(
            urls=self.shards.urls, counts=self.shards.counts, mode=d.mode, seed=cfg.run.seed,
            batch_size=B, slots=slots, rank=rank, world_size=world_size,
            batches_per_epoch=self.batches_per_epoch,
            chunk=max(1, d.shuffle_buffer // B) * B, img_size=m.img_size,
            grid=m.img_size // m.patch_size,
            crop=TwoViewCrop(m.img_size, tuple(d.crop_scale), tuple(d.crop_ratio), d.same_view),
            mask_ratio=d.mask.ratio, min_block=d.mask.min_block_patches,
            min_aspect=d.mask.min_aspect, color_aug=d.color_aug,
            sigma_range=sigma_range_for(m.img_size, tuple(d.blur_sigma)), interleave=d.shard_interleave,
            io=io, max_bad_fraction=d.max_bad_fraction)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """Batches skip, skip+1, ... of `epoch` for this rank; ends after batches_per_epoch."""
        if not 0 <= skip <= self.batches_per_epoch:
            raise DataError(f"resume position skip={skip} is outside epoch of "
                            f"{self.batches_per_epoch} batches: the checkpoint's data position "
                            "does not match this data set")
        dataset = _EpochBatches(self.plan, epoch, skip, self.num_workers)
        # A generator of its own: creating a DataLoader iterator otherwise draws a seed from the
        # global torch RNG, so a resumed run (a new iterator mid-epoch) would shift drop-path
        # randomness. All sample randomness comes from (seed, epoch, index) anyway.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(),
                            prefetch_factor=4 if self.num_workers else None,
                            generator=torch.Generator().manual_seed(epoch))
        for batch in loader:
            if STOP in batch:
                raise DataError(batch[STOP])
            yield batch

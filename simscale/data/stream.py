"""The two-view stream each rank iterates: shards -> canonical partitions -> decoded batches.

Exact-epoch mode ("epoch"), the default:
- Per epoch the shard order is a permutation drawn from (seed, epoch) only. Consecutive shards
  of that order form groups of `data.shard_interleave`; inside a group the samples of its shards
  alternate (round-robin in stored order, a shard that runs out drops out), so any stretch of the
  sequence mixes several shards even when the shards themselves are sorted. The groups,
  concatenated, form one global sequence of N samples, computed from the manifest's counts alone.
- That sequence is cut into P contiguous partitions (`data.partitions`, sizes differing by at
  most 1; P is fixed for the life of a run, see partitions.py for the auto rule and the checks).
  Inside a partition, samples are shuffled in chunks of ceil(data.shuffle_buffer / P) with a
  permutation from (seed, epoch, partition, chunk start): a shuffle buffer that can be replayed.
  `data.shuffle_buffer` is thus the whole job's window, and the job holds about that many raw
  samples in all, however many ranks and workers read it (one chunk per partition; the chunk
  depends on P, fixed for the run, as MosaicML streaming's shuffle block does on its canonical
  nodes, so the order stays world-size free).
- With W ranks of micro-batch B the micro-step global batch is GM = W * B (P divides GM, W
  divides P). Global micro-batch g is, for p = 0..P-1 in order, samples [g*GM/P, (g+1)*GM/P) of
  partition p's shuffled sequence; rank r's micro-batch g is the slice of its partitions
  [r*P/W, (r+1)*P/W). So WHICH samples form global micro-batch g (and in which order) depends on
  (seed, epoch, P, GM, g) only, never on the world size or the number of workers.
  batches_per_epoch = (N // P) // (GM / P) (= N // GM), the same on every rank, so no rank waits
  at a collective; the tail of each partition that does not fill a part-batch is DROPPED.
- Each DataLoader worker of a rank owns a fixed, equal, contiguous share of the rank's partitions
  (the worker count is the largest divisor of P/W not above data.num_workers), opens only the
  shards overlapping them, skips to its start without decoding (a local tar seeks there from a
  header-only pass; a URL reads through the skipped members), and yields, per micro-step,
  its partitions' slices concatenated; the DataLoader hands out items round-robin over workers,
  so concatenating one item of each worker in worker order is the rank's micro-batch: identical
  to num_workers=0.
- The data position is (epoch, samples consumed in the epoch's global order), a multiple of P:
  at position c every partition continues at offset c / P. A resume at c with any world size,
  num_workers or batch size (GM' still a multiple of P) therefore sees every remaining sample of
  the epoch exactly once.
Resampled mode ("resampled"): the same partitions, but partition p draws shards with replacement
(wds.ResampledShards seeded from (seed, epoch, p)) and holds its share of data.samples_per_epoch
(default: the manifest total) split over P; an epoch ends after batches_per_epoch micro-steps
(the role of webdataset's with_epoch, counted per partition so that resume can replay it).
`index` is then a unique per-epoch id (partition start + position in its stream), not a
manifest position.

Per-sample randomness (flips, boxes, mask, photometric parameters) comes from a generator
seeded with (seed, epoch, index), `index` being the sample's position in the epoch's global
sequence, so any sample can be reproduced alone.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import tarfile
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
from simscale.data.opener import open_shard
from simscale.data.partitions import auto_partitions, partition_problem, partition_span, worker_count
from simscale.data.photometric import draw_params, sigma_range_for
from simscale.data.shards import ShardSet, resolve_shards
from simscale.data.views import TwoViewCrop
from simscale.errors import ConfigError, DataError

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
    from simscale.console import make_console

    make_console(stderr=True).print(f"[yellow]{text}[/yellow]", highlight=False, soft_wrap=True)


_offsets: dict[tuple, list[int]] = {}  # (path, size, mtime) -> byte offset of each sample, per process


def _sample_offsets(f, url: str) -> list[int]:
    """Where each sample of a local tar starts (its first member's header chain), from one pass over
    the headers only (member data is seeked over), with webdataset's own member filter and
    grouping, so that reading from offsets[k] yields exactly what a full read yields after k
    samples. Cached per process: a shard is walked once however many partitions skip into it."""
    st = os.fstat(f.fileno())
    key = (url, st.st_size, st.st_mtime_ns)
    if key not in _offsets:
        try:
            members = list(_ustar_members(f))
        except _NotPlainUstar:  # pax or GNU long-name headers: let tarfile read them
            f.seek(0)
            members = list(_tarfile_members(f))

        def kept():
            for start, name, regular in members:
                if not regular or re.match(r"__[^/]*__($|/)", name) or (
                        "/" not in name and name.startswith("__") and name.endswith("__")):
                    continue  # what tar_file_iterator drops
                yield {"fname": name, "data": start, "__url__": url}

        _offsets[key] = [min(v for k, v in s.items() if not k.startswith("__")) for s in group_by_keys(kept())]
    return _offsets[key]


class _NotPlainUstar(Exception):
    pass


def _ustar_members(f) -> Iterator[tuple[int, str, bool]]:
    """(header offset, name, is a regular file) of each member of a plain ustar/GNU tar (what
    `simscale prepare` and img2dataset write), reading 512-byte headers only and checking each
    one's checksum; several times faster than tarfile's header parsing, which a partition's
    skip would otherwise pay for every member it passes."""
    while True:
        start = f.tell()
        buf = f.read(512)
        if len(buf) < 512 or buf == bytes(512):
            return
        if int(buf[148:156].strip(b" \0") or b"0", 8) != sum(buf) - sum(buf[148:156]) + 8 * 32:
            raise ValueError("bad tar header checksum")
        kind = buf[156:157]
        if kind in (b"x", b"g", b"L", b"K", b"S"):
            raise _NotPlainUstar
        name = buf[0:100].split(b"\0", 1)[0]
        if buf[257:262] == b"ustar" and buf[345:500].strip(b"\0"):
            name = buf[345:500].split(b"\0", 1)[0] + b"/" + name
        size = int(buf[124:136].strip(b" \0") or b"0", 8)
        yield start, name.decode("utf-8", "surrogateescape"), kind in (b"0", b"\0", b"7")
        f.seek(start + 512 + (size + 511) // 512 * 512)


def _tarfile_members(f) -> Iterator[tuple[int, str, bool]]:
    tar = tarfile.open(fileobj=f, mode="r:")
    while True:
        start = tar.offset  # before the member's header chain (pax/GNU headers included)
        info = tar.next()
        if info is None:
            return
        yield start, info.name, info.isreg()


def _seek_to_sample(f, url: str, skip: int) -> bool:
    """Move a local tar file to its sample number `skip` without reading the data before it (a
    partition that starts inside an interleave group would otherwise read the group's earlier
    members in full). False (file back at 0) for a streamed URL (seeking would cost a request per
    member) or anything unexpected: the caller then reads through the skipped samples."""
    if not isinstance(getattr(f, "raw", None), io.FileIO):
        return False
    try:
        offsets = _sample_offsets(f, url)
        if skip < len(offsets):
            f.seek(offsets[skip])
            return True
    except Exception:  # noqa: BLE001 - a damaged tar: fall back to reading through it
        pass
    f.seek(0)
    return False


def _read_shard(url: str, opts: remote.IOOptions | None, skip: int = 0) -> Iterator[dict]:
    """Samples of one tar in stored order, raw bytes only (no member is ever decoded here); the
    first `skip` are not yielded (a local file seeks past them, a URL reads through them). The tar
    is a local file or a URL streamed with retries (remote.py; a store still failing after its
    retries is a DataError naming it). An unreadable or truncated tar ends early: the caller
    counts what is missing (a damaged shard is data to skip, not a crash)."""
    try:
        with open_shard(url, opts) as f:
            if skip and _seek_to_sample(f, url, skip):
                skip = 0
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
    total: int  # N: samples in the epoch's global sequence (manifest total or data.samples_per_epoch)
    partitions: int  # P
    part_batch: int  # GM / P: samples each partition gives to one micro-step global batch
    owned: list[int]  # this rank's partitions, in order
    chunk: int
    img_size: int
    grid: int
    crop: TwoViewCrop
    mask_ratio: float
    min_block: int
    min_aspect: float
    color_aug: bool
    sigma_range: tuple[float, float]
    solarize_b: float
    jitter: tuple[float, float, float, float]
    grayscale_p: float
    interleave: int = 1
    io: remote.IOOptions | None = None  # remote shard I/O (retries, cache), passed to every shard opened
    max_bad_fraction: float = 0.01

    def steps_from(self, offset: int) -> int:
        """Micro-steps left in the epoch when every partition stands at `offset`."""
        return max(0, (self.total // self.partitions - offset) // self.part_batch)

    # ------------------------------------------------------------------ raw samples per partition
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
            readers = [_read_shard(self.urls[s], self.io, skip=k) for s, k in zip(shards, skip)]
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

    def _resampled_raw(self, epoch: int, p: int, base: int) -> Iterator[tuple[int, dict]]:
        shards = wds.ResampledShards(self.urls, seed=self.seed, deterministic=True,
                                     worker_seed=lambda: p)
        shards.epoch = epoch - 1  # ResampledShards counts epochs itself, +1 per iteration
        k, empty = base, 0
        for entry in shards:
            before = k
            for sample in _read_shard(entry["url"], self.io):
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
                "photo_a": draw_params(photo_rng, "a", self.color_aug, self.sigma_range, None, self.jitter,
                                       self.grayscale_p),
                "photo_b": draw_params(photo_rng, "b", self.color_aug, self.sigma_range, self.solarize_b,
                                       self.jitter, self.grayscale_p),
                "label": _label(sample.get("cls")), "index": index}

    def _decode_or_substitute(self, epoch: int, pos: int, items: list, budget: list[int], fallback) -> dict:
        """Decode items[pos]; if it is bad, count it and decode the next good sample of the same
        chunk in its place (with the bad sample's index, so its crops/mask stay its own draw); if
        the whole chunk is bad, the first good one of the partition's first chunks, then of
        partition 0's (`fallback()` re-reads them; tiny partitions may hold no good sample).
        Deterministic and independent of ranks and workers, so every rank still yields the same
        number of full batches, and a resume (on any world size) replays it."""
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
        for other in itertools.chain(candidates, (s for _, s in fallback())):
            try:
                return self._decode(epoch, index, other)
            except _Unreadable:
                continue
        raise _NoData(f"no readable sample in a chunk of {len(items)} around '{sample.get('__key__')}' in "
                      f"'{sample.get('__url__', '?')}': check the shards with `simscale prepare --verify DIR`")

    def _partition_raw(self, epoch: int, p: int, first: int) -> Iterator[tuple[int, dict]]:
        """(index, raw sample) of partition p from its stored-order offset `first` to its end."""
        start, length = partition_span(self.total, self.partitions, p)
        if self.mode == "epoch":
            yield from itertools.islice(self._exact_raw(epoch, start + first), length - first)
            return
        raw = self._resampled_raw(epoch, p, start)
        for _ in range(first):  # replay without decoding
            next(raw)
        yield from itertools.islice(raw, length - first)

    def _partition_samples(self, epoch: int, p: int, offset: int) -> Iterator[dict]:
        """Decoded samples of partition p from position `offset` of its shuffled sequence on."""
        _, length = partition_span(self.total, self.partitions, p)
        pos = offset // self.chunk * self.chunk
        raw = self._partition_raw(epoch, p, pos)
        # Bad samples this partition may still replace in this epoch (counted from where it starts);
        # at least one unless data.max_bad_fraction=0, so one bad image never stops a small run.
        frac = self.max_bad_fraction
        budget = [max(int(frac * (length - offset)), 1 if frac > 0 else 0)]
        while pos < length:
            size = min(self.chunk, length - pos)
            items = [next(raw) for _ in range(size)]
            perm = np.random.default_rng([self.seed, epoch, _CHUNK_ORDER, p, pos]).permutation(size)
            for i in perm[max(0, offset - pos):]:
                yield self._decode_or_substitute(epoch, int(i), items, budget, lambda: itertools.chain(
                    *(itertools.islice(self._partition_raw(epoch, q, 0), 4 * self.chunk) for q in (p, 0))))
            pos += size

    def worker_batches(self, epoch: int, parts: list[int], offset: int) -> Iterator[dict]:
        """Per micro-step from partition offset `offset` on: the slices of `parts`, concatenated in order."""
        try:
            streams = [self._partition_samples(epoch, p, offset) for p in parts]
            for _ in range(self.steps_from(offset)):
                yield collate([x for s in streams for x in itertools.islice(s, self.part_batch)])
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
    def __init__(self, plan: _Plan, epoch: int, offset: int):
        self.plan, self.epoch, self.offset = plan, epoch, offset

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        share = len(self.plan.owned) // n  # n divides it (worker_count)
        return self.plan.worker_batches(self.epoch, self.plan.owned[wid * share:(wid + 1) * share], self.offset)


def _concat(items: list[dict], pin: bool) -> dict:
    """The rank's micro-batch from its workers' items (in worker order: partition order)."""
    if len(items) == 1:
        return items[0]
    out = {}
    for k in items[0]:
        parts = [x[k] for x in items]
        shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
        # pinned from torch's caching host allocator: the trainer's non-blocking copies stay async
        out[k] = torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin))
    return out


def _fit_open_files(readers: int) -> None:
    """Each partition a process reads keeps its interleave group's shards open at once: raise the
    soft open-file limit to fit them (never past the hard one), or say what to change."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = readers + 256  # room for the rest of the process: libraries, sockets, DataLoader pipes
    if soft == resource.RLIM_INFINITY or want <= soft:
        return
    if hard != resource.RLIM_INFINITY and want > hard:
        raise DataError(f"each data-loading process would keep {readers} shards open, above the open-file "
                        f"limit {hard}: raise it (`ulimit -n {want}`), use more data.num_workers, or a smaller "
                        "data.shard_interleave or data.partitions")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class TwoViewStream:
    """Batches of two views + geometry + mask + photometric parameters for one rank."""

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        d = cfg.data
        io = remote.IOOptions.from_config(d)
        B = cfg.optim.batch_size
        # data.partitions=0 resolves here for a fresh start; the trainer records the result and a
        # resume passes the recorded P back in (loop.py).
        P = d.partitions or auto_partitions(world_size, B, d.num_workers)
        problem = partition_problem(P, world_size, B)
        if problem:
            raise ConfigError(f"{problem}, or data.partitions=0 on a fresh run to choose one")
        self.shards: ShardSet = resolve_shards(d.train, io)
        if self.shards.sizes:
            io.expected = {u: (b, h) for u, b, h in zip(self.shards.urls, self.shards.sizes,
                                                        self.shards.sha256 or [None] * len(self.shards.urls))}
        self.rank, self.world_size = rank, world_size
        self.partitions, self.global_batch = P, world_size * B
        per_rank = P // world_size
        self.num_workers = worker_count(per_rank, d.num_workers)
        if self.num_workers != d.num_workers and rank == 0:
            _report("", f"#workers {P} {world_size} {d.num_workers}",
                    f"data.num_workers={d.num_workers}: {self.num_workers} worker processes per rank read its "
                    f"{per_rank} data partitions (data.partitions={P} over {world_size} ranks); a worker count "
                    "that divides them uses more")
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
            if len(self.shards.urls) < P:
                warnings.warn(f"{len(self.shards.urls)} shards for {P} data partitions: resampling will "
                              "repeat shards often; write more, smaller shards", stacklevel=2)
        self.samples_per_epoch = samples
        self.batches_per_epoch = (samples // P) // (self.global_batch // P)
        if self.batches_per_epoch < 1:
            fix = (f"set optim.batch_size <= {samples // world_size} or add data" if samples >= world_size
                   else f"add data (at least one sample per rank, {world_size})")
            raise DataError(f"{samples} samples cannot fill one global batch of optim.batch_size={B} x "
                            f"{world_size} ranks = {B * world_size}: {fix}")
        if d.mode == "epoch":
            _fit_open_files(per_rank // max(1, self.num_workers) * min(d.shard_interleave, len(self.shards.urls)))
        m = cfg.model
        self.plan = _Plan(
            urls=self.shards.urls, counts=self.shards.counts, mode=d.mode, seed=cfg.run.seed,
            total=samples, partitions=P, part_batch=self.global_batch // P,
            owned=list(range(rank * per_rank, (rank + 1) * per_rank)),
            chunk=-(-d.shuffle_buffer // P), img_size=m.img_size,
            grid=m.img_size // m.patch_size,
            crop=TwoViewCrop(m.img_size, tuple(d.crop_scale), tuple(d.crop_ratio), d.same_view),
            mask_ratio=d.mask.ratio, min_block=d.mask.min_block_patches,
            min_aspect=d.mask.min_aspect, color_aug=d.color_aug,
            sigma_range=sigma_range_for(m.img_size, tuple(d.blur_sigma)), interleave=d.shard_interleave,
            solarize_b=d.solarize_b, jitter=tuple(d.color_jitter), grayscale_p=d.grayscale_p, io=io,
            max_bad_fraction=d.max_bad_fraction)

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """This rank's micro-batches of `epoch` from data position `start` (samples of the epoch's
        global order already consumed, on any world size) to the end of the epoch."""
        P = self.partitions
        if start % P or not 0 <= start // P <= self.samples_per_epoch // P:
            raise DataError(f"data position {start} (samples consumed in epoch {epoch}) does not fit "
                            f"{P} partitions of {self.samples_per_epoch // P} samples: the checkpoint's data "
                            "position does not match this data set or data.partitions")
        dataset = _EpochBatches(self.plan, epoch, start // P)
        pin = torch.cuda.is_available()
        # A generator of its own: creating a DataLoader iterator otherwise draws a seed from the
        # global torch RNG, so a resumed run (a new iterator mid-epoch) would shift drop-path
        # randomness. All sample randomness comes from (seed, epoch, index) anyway.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=pin and self.num_workers <= 1,
                            prefetch_factor=4 if self.num_workers else None,
                            generator=torch.Generator().manual_seed(epoch))
        items = []
        for item in loader:
            if STOP in item:
                raise DataError(item[STOP])
            items.append(item)
            if len(items) == max(1, self.num_workers):
                yield _concat(items, pin)
                items = []

"""The two-view stream: exact-once epochs across ranks x workers, equal batch counts, resume;
canonical partitions: the same global micro-batches on any world size / num_workers, and exactly
once across a resize."""
import json
import shutil

import numpy as np
import pytest
import torch

import images
from simscale.config import build_config
from simscale.data.prepare import Options, prepare
from simscale.data.shards import resolve_shards
from simscale.data.partitions import auto_partitions, worker_count
from simscale.data.stream import TwoViewStream, shard_order
from simscale.errors import ConfigError, DataError

N = 37  # samples: 2 ranks x batch 4 -> 4 batches per rank per epoch, 5 samples dropped


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """N distinct real images, label = sample id, 8 shards of <= 5 (the last one short)."""
    return images.id_shards(tmp_path_factory.mktemp("stream"), N, (160, 120), shuffle=False)


def expected_sequence(shards, epoch, interleave=8, seed=3):
    """Written out independently of the stream: shards in `shard_order`, groups of `interleave`
    consecutive ones, round-robin inside a group; values are sample ids (= labels here)."""
    man = json.loads((shards / "manifest.json").read_text())
    counts = [x["samples"] for x in man["shards"]]
    order = list(shard_order(seed, epoch, len(counts)))
    seq = []
    for g in range(0, len(order), interleave):
        runs = [list(range(sum(counts[:s]), sum(counts[:s]) + counts[s])) for s in order[g:g + interleave]]
        for r in range(max(len(x) for x in runs)):
            seq += [x[r] for x in runs if r < len(x)]
    return seq


def expected_partitions(shards, epoch, partitions, chunk, seed=3, interleave=8):
    """Written out independently of the stream: the epoch's sequence cut into `partitions` ranges
    (the first N % P one longer), each shuffled in chunks of `chunk` with the permutation drawn
    from (seed, epoch, 2, partition, chunk start); values are sample ids."""
    seq = expected_sequence(shards, epoch, interleave, seed)
    base, extra = divmod(len(seq), partitions)
    out, start = [], 0
    for p in range(partitions):
        part = seq[start:start + base + (p < extra)]
        start += len(part)
        shuffled = []
        for c in range(0, len(part), chunk):
            block = part[c:c + chunk]
            shuffled += [block[i] for i in np.random.default_rng([seed, epoch, 2, p, c]).permutation(len(block))]
        out.append(shuffled)
    return out


def expected_global_batches(parts, global_batch, first=0):
    """Global micro-batch g = for each partition in order, its slice [g*GM/P, (g+1)*GM/P)."""
    q = global_batch // len(parts)
    steps = min(len(p) for p in parts) // q
    return [[x for p in parts for x in p[first + g * q:first + (g + 1) * q]] for g in range((steps * q - first) // q)]


def cfg_for_overrides(out, batch=4, workers=0, **data):
    overrides = [f"data.train={out}", f"data.num_workers={workers}", f"optim.batch_size={batch}",
                 "data.shuffle_buffer=32", "run.seed=3"]
    return overrides + [f"data.{k}={v}" for k, v in data.items()]


def cfg_for(out, workers=0, batch=4, **data):
    return build_config("tiny", overrides=cfg_for_overrides(out, batch, workers, **data))


def collect(stream, epoch, skip=0):
    """Batches from `skip` micro-steps of this stream's global batch on."""
    return list(stream.batches(epoch=epoch, start=skip * stream.global_batch))


def global_batches(shards, world, batch, workers, epoch, start=0, **data):
    """Every rank's micro-batches, concatenated in rank order: the global micro-batches (sample ids)."""
    per_rank = [collect_from(TwoViewStream(cfg_for(shards, workers=workers, batch=batch, **data), rank=r,
                                           world_size=world), epoch, start) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank yields the same number of batches
    return [[int(i) for b in step for i in b["label"]] for step in zip(*per_rank)]


def collect_from(stream, epoch, start):
    return list(stream.batches(epoch=epoch, start=start))


def test_batch_fields_shapes_and_types(shards):
    cfg = cfg_for(shards)
    (b, *_) = collect(TwoViewStream(cfg), 0)
    B, S, G = 4, cfg.model.img_size, cfg.model.img_size // cfg.model.patch_size
    assert b["view_a"].shape == b["view_b"].shape == (B, 3, S, S) and b["view_a"].dtype == torch.uint8
    assert b["geometry"].shape == (B, 6) and b["geometry"].dtype == torch.float32
    assert b["mask"].shape == (B, G * G) and b["mask"].dtype == torch.bool
    assert (b["mask"].sum(1) == round(cfg.data.mask.ratio * G * G)).all()
    assert b["photo_a"].dtype == torch.float32 and b["photo_a"].shape[0] == B
    assert b["label"].dtype == b["index"].dtype == torch.int64


def test_exact_once_per_epoch_across_two_ranks_and_two_workers(shards):
    seen, counts = [], []
    for rank in range(2):
        stream = TwoViewStream(cfg_for(shards, workers=2), rank=rank, world_size=2)
        batches = collect(stream, 1)
        counts.append(len(batches))
        assert stream.batches_per_epoch == N // 8 and stream.partitions == 8  # auto: GM 8, 2 ranks x 2 workers
        seen += [int(i) for b in batches for i in b["label"]]
    assert counts == [N // 8, N // 8]  # every rank yields the same number of batches
    assert len(seen) == len(set(seen)) == (N // 8) * 8  # each sample at most once
    # The dropped remainder is the shuffled tail of each partition (here: of the 5 longer ones).
    assert set(seen) == {x for p in expected_partitions(shards, 1, 8, 32 // 8) for x in p[:N // 8]}


def test_index_is_the_position_in_the_epoch_sequence(shards):
    for interleave in (1, 3, 8):
        seq = expected_sequence(shards, epoch=2, interleave=interleave)
        for b in collect(TwoViewStream(cfg_for(shards, shard_interleave=interleave)), 2):
            assert [seq[i] for i in b["index"].tolist()] == b["label"].tolist()


def test_each_stretch_of_the_sequence_mixes_several_sorted_shards(shards):
    # The shards hold sample ids in sorted runs of 5; with interleave 8 any 8 consecutive
    # positions of a full group come from 8 different shards.
    seq = expected_sequence(shards, epoch=0, interleave=8)
    owner = [i // 5 for i in seq]
    assert len(set(owner[:8])) == 8
    seen = [int(i) for b in collect(TwoViewStream(cfg_for(shards, shard_interleave=8)), 0) for i in b["label"]]
    assert len({i // 5 for i in seen[:8]}) >= 4  # two batches of 4 partitions span many shards


def test_shard_order_is_a_function_of_seed_and_epoch(shards):
    assert np.array_equal(shard_order(3, 4, 8), shard_order(3, 4, 8))
    assert not np.array_equal(shard_order(3, 4, 8), shard_order(3, 5, 8))
    assert not np.array_equal(shard_order(3, 4, 8), shard_order(4, 4, 8))
    s = TwoViewStream(cfg_for(shards))
    e0, again, e1 = collect(s, 0), collect(TwoViewStream(cfg_for(shards)), 0), collect(s, 1)
    for a, b in zip(e0, again):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert [b["label"].tolist() for b in e0] != [b["label"].tolist() for b in e1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_sample_for_sample(shards, workers):
    full = collect(TwoViewStream(cfg_for(shards, workers=workers, batch=2)), 1)
    assert len(full) == N // 2
    for skip in (1, 5, 8):
        resumed = collect(TwoViewStream(cfg_for(shards, workers=workers, batch=2)), 1, skip=skip)
        assert len(resumed) == len(full) - skip
        for a, b in zip(full[skip:], resumed):
            for k in a:
                assert torch.equal(a[k], b[k]), (skip, k)


def test_workers_do_not_change_the_batches(shards):
    # The batch -> sample map depends on (world, workers) only through the slot layout; with the
    # same worker count, in-process and multi-process decoding agree (covered above); here: one
    # sample's views are reproducible from (seed, epoch, index) alone, whichever batch holds it.
    a = collect(TwoViewStream(cfg_for(shards, workers=0, batch=4)), 0)
    b = collect(TwoViewStream(cfg_for(shards, workers=0, batch=2)), 0)
    where = {int(i): (bi, j) for bi, bt in enumerate(b) for j, i in enumerate(bt["index"])}
    hits = 0
    for bt in a:
        for j, i in enumerate(bt["index"].tolist()):
            if i in where:
                bi, jj = where[i]
                assert torch.equal(bt["view_a"][j], b[bi]["view_a"][jj])
                assert torch.equal(bt["mask"][j], b[bi]["mask"][jj])
                hits += 1
    assert hits > 10


def test_same_view_and_resampled_mode(shards):
    (b, *_) = collect(TwoViewStream(cfg_for(shards, same_view=True)), 0)
    assert torch.equal(b["view_a"], b["view_b"])
    s = TwoViewStream(cfg_for(shards, workers=2, mode="resampled", samples_per_epoch=24), rank=1,
                      world_size=2)
    assert s.batches_per_epoch == 3
    r1, r2 = collect(s, 0), collect(s, 0)
    assert len(r1) == 3
    for a, b in zip(r1, r2):
        assert torch.equal(a["view_a"], b["view_a"]) and torch.equal(a["label"], b["label"])
    resumed = collect(s, 0, skip=1)
    assert all(torch.equal(a["view_b"], b["view_b"]) for a, b in zip(r1[1:], resumed))


def test_view_b_solarize_probability_is_a_setting_that_leaves_everything_else_alone(shards):
    from simscale.data.photometric import SOLAR
    def batches(**data):
        return collect(TwoViewStream(cfg_for(shards, **data)), 0)
    recipe, never, always = batches(), batches(solarize_b=0.0), batches(solarize_b=1.0)
    solar = lambda bs: torch.cat([b["photo_b"][:, SOLAR] for b in bs])  # noqa: E731
    assert solar(never).sum() == 0 and (solar(always) == 1).all() and 0 < solar(recipe).sum() < len(solar(recipe))
    for r, n in zip(recipe, never):  # the same draws otherwise: the coin flip is still drawn
        assert torch.equal(r["view_b"], n["view_b"]) and torch.equal(r["photo_a"], n["photo_a"])
        keep = [i for i in range(r["photo_b"].shape[1]) if i != SOLAR]
        assert torch.equal(r["photo_b"][:, keep], n["photo_b"][:, keep])


def test_colour_jitter_strengths_and_grayscale_are_settings_that_leave_everything_else_alone(shards):
    from simscale.data.photometric import BRIGHT, GRAY, HUE, SAT

    def batches(**data):
        return collect(TwoViewStream(cfg_for(shards, **data)), 0)
    recipe, kept = batches(), batches(color_jitter="[0.4,0.4,0,0]", grayscale_p=0.0)
    for view in ("photo_a", "photo_b"):
        r, k = (torch.cat([b[view] for b in bs]) for bs in (recipe, kept))
        assert (k[:, SAT] == 1).all() and (k[:, HUE] == 0).all() and (k[:, GRAY] == 0).all()
        assert (r[:, SAT] != 1).all() and (r[:, HUE] != 0).all() and 0 < r[:, GRAY].sum() < len(r)
        keep = [i for i in range(r.shape[1]) if i not in (SAT, HUE, GRAY)]  # the same draws otherwise
        assert torch.equal(r[:, keep], k[:, keep]) and (r[:, BRIGHT] != 1).all()
    for r, k in zip(recipe, kept):
        assert torch.equal(r["view_a"], k["view_a"]) and torch.equal(r["mask"], k["mask"])


def test_exact_mode_without_counts_is_a_clear_error(shards, tmp_path):
    for p in shards.glob("shard-*.tar"):
        shutil.copy(p, tmp_path / p.name)
    with pytest.raises(DataError, match="data.mode=resampled"):
        TwoViewStream(cfg_for(tmp_path))
    s = TwoViewStream(cfg_for(tmp_path, mode="resampled", samples_per_epoch=8))
    assert len(collect(s, 0)) == 2
    assert resolve_shards(str(tmp_path)).counts is None
    with pytest.raises(DataError, match="global batch"):
        TwoViewStream(cfg_for(shards, batch=64))


def test_fewer_shards_than_partitions_still_covers_each_sample_once(shards, tmp_path, capsys):
    # One shard, 2 ranks x batch 3: 6 partitions, each rank's 3 read by one worker (2 do not divide
    # 3: said once); each partition skips to its own range of that shard.
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p} {k}\n" for k, p in enumerate(sorted((shards.parent / "img").glob("*.jpg")))))
    prepare([str(lst)], tmp_path / "one", Options(shard_size=1000, shuffle=False), workers=1, progress=False)
    assert len(resolve_shards(str(tmp_path / "one")).urls) == 1
    seen, counts = [], []
    for rank in range(2):
        stream = TwoViewStream(cfg_for(tmp_path / "one", workers=2, batch=3), rank=rank, world_size=2)
        assert (stream.partitions, stream.num_workers) == (6, 1)
        batches = collect(stream, 0)
        counts.append(len(batches))
        seen += [int(i) for b in batches for i in b["label"]]
    assert counts == [N // 6] * 2
    assert len(seen) == len(set(seen)) == (N // 6) * 6
    assert set(seen) <= set(range(N))
    assert capsys.readouterr().err.count("data.num_workers=2: 1 worker processes") == 1


def test_undecodable_sample_past_max_bad_fraction_is_a_data_error_naming_it(tmp_path):
    import io
    import tarfile
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tf:
        for k in range(4):
            data = b"not a jpeg" if k == 2 else images.jpeg_bytes(images.variant(k, (64, 48)))
            info = tarfile.TarInfo(f"{k:09d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    from simscale.data.shards import write_manifest
    write_manifest(tmp_path, [{"name": "shard-000000.tar", "samples": 4, "bytes": 0, "sha256": ""}], None)
    with pytest.raises(DataError, match="000000002"):  # strict: no bad sample allowed
        collect(TwoViewStream(cfg_for(tmp_path, batch=4, shuffle_buffer=4, max_bad_fraction=0)), 0)
    # by default one bad sample is a named skip with a stand-in (tests/data/test_bad_samples.py)
    assert len(collect(TwoViewStream(cfg_for(tmp_path, batch=4, shuffle_buffer=4)), 0)) == 1


# ---------------------------------------------------------------- canonical partitions (issue 14)
# P = 4 partitions of the 37 samples (10, 9, 9, 9), shuffle chunks of 16 / 4 = 4, micro-step
# global batch GM = 8 (2 samples of each partition): 4 global micro-batches per epoch.
PARTS = {"partitions": 4, "shuffle_buffer": 16}


@pytest.mark.parametrize("world,batch,workers", [(1, 8, 0), (2, 4, 0), (4, 2, 0), (1, 8, 3), (2, 4, 2), (4, 2, 2)])
def test_global_micro_batches_are_the_same_on_any_world_size_and_worker_count(shards, world, batch, workers):
    for epoch in (0, 1):
        want = expected_global_batches(expected_partitions(shards, epoch, 4, 4), 8)
        assert len(want) == N // 8
        assert global_batches(shards, world, batch, workers, epoch, **PARTS) == want  # same samples, same order


@pytest.mark.parametrize("before,after", [((2, 4, 2), (1, 8, 0)), ((1, 8, 0), (2, 4, 1)),  # same GM
                                          ((2, 4, 2), (1, 4, 0)), ((1, 8, 0), (2, 2, 1))])  # GM 8 -> 4
def test_a_resize_mid_epoch_sees_every_sample_of_the_epoch_exactly_once(shards, before, after):
    epoch, k = 1, 2  # k micro-steps before the resize: data position k * 8 samples
    first = global_batches(shards, *before, epoch, **PARTS)[:k]
    rest = global_batches(shards, *after, epoch, start=k * 8, **PARTS)
    gm = after[0] * after[1]
    parts = expected_partitions(shards, epoch, 4, 4)
    assert rest == expected_global_batches(parts, gm, first=k * 2)  # each partition continues at k*8/4
    seen = [x for b in first + rest for x in b]
    assert len(seen) == len(set(seen))  # no sample twice
    # every sample of the epoch except each partition's tail that fills no part-batch of the new GM
    usable = min(len(p) for p in parts) // (gm // 4) * (gm // 4)
    assert set(seen) == {x for p in parts for x in p[:usable]} and len(seen) == 4 * usable
    assert len(seen) >= N - 4 * (gm // 4)


def test_partitions_that_do_not_fit_the_world_or_batch_are_one_line_errors(shards):
    with pytest.raises(ConfigError, match=r"data.partitions=3 does not divide .* multiple of 3 ") as err:
        TwoViewStream(cfg_for(shards, batch=8, partitions=3))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"data.partitions=4 is not a multiple of the world size 8: .*1, 2, 4\)"):
        TwoViewStream(cfg_for(shards, batch=1, partitions=4), rank=0, world_size=8)
    with pytest.raises(DataError, match="data position 6 .* 4 partitions"):
        collect_from(TwoViewStream(cfg_for(shards, batch=8, partitions=4)), 0, 6)


def test_auto_partitions_follow_the_documented_rule():
    # The lead's rule wherever it applies: the largest divisor of GM that is a multiple of
    # W x max(1, workers) and <= max(256, W x max(1, workers)).
    for world in range(1, 9):
        for batch in range(1, 65):
            for workers in range(0, 5):
                gm, step = world * batch, world * max(1, workers)
                fits = [d for d in range(step, max(256, step) + 1, step) if gm % d == 0]
                p = auto_partitions(world, batch, workers)
                assert gm % p == 0 and p % world == 0
                if fits:
                    assert p == max(fits)
    assert auto_partitions(8, 256, 4) == 256 and auto_partitions(64, 64, 8) == 512
    # No multiple of W x workers divides GM: the most workers first (2 of 3 here), then the largest P.
    assert auto_partitions(2, 1000, 3) == 200 and worker_count(100, 3) == 2
    assert worker_count(4, 0) == 0 and worker_count(4, 3) == 2 and worker_count(7, 4) == 1


def test_resampled_mode_is_partitioned_like_exact_mode(shards):
    data = dict(mode="resampled", samples_per_epoch=32, **PARTS)
    one = global_batches(shards, 1, 8, 0, 0, **data)
    assert len(one) == 4 and global_batches(shards, 2, 4, 1, 0, **data) == one
    s = TwoViewStream(cfg_for(shards, batch=8, **data))
    index = [[int(i) for i in b["index"]] for b in collect(s, 0)]
    assert len({i for b in index for i in b}) == 32 and all(i // 8 == j // 2 for b in index for j, i in enumerate(b))
    # resumed on 2 ranks at position 16: the same last two global micro-batches
    assert global_batches(shards, 2, 4, 0, 0, start=16, **data) == one[2:]


def test_many_partitions_per_process_fit_the_open_file_limit_or_say_what_to_change(shards, tmp_path):
    # 32 partitions read by one process, each keeping its interleave group's 8 shards open: 256.
    import resource
    import subprocess
    import sys

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
    try:
        TwoViewStream(cfg_for(shards, batch=32, partitions=32))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 256 + 256  # raised to fit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # a hard limit below it: one line naming the limit and the fixes (in a process of its own)
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))\n"
            "from simscale.config import build_config; from simscale.data.stream import TwoViewStream\n"
            "from simscale.errors import DataError\n"
            f"cfg = build_config('tiny', overrides={cfg_for_overrides(shards, 32, partitions=32)!r})\n"
            "try: TwoViewStream(cfg)\nexcept DataError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "would keep 256 shards open, above the open-file limit 300: raise it (`ulimit -n 512`)" in out.stdout, \
        out.stdout + out.stderr


def test_a_local_shard_seeks_past_skipped_samples_and_yields_the_same_ones(shards, monkeypatch):
    # A partition starting inside an interleave group skips the group's earlier samples of each
    # shard: on a local file by reading headers only, with the result of a full read.
    import simscale.data.stream as st

    url = str(shards / "shard-000001.tar")
    full = list(st._read_shard(url, None))
    read = []
    plain = st.tar_file_iterator

    def counting(f, *args, **kw):
        for m in plain(f, *args, **kw):
            read.append(m["fname"])
            yield m
    monkeypatch.setattr(st, "tar_file_iterator", counting)
    assert len(full) == 5
    for k in range(len(full)):
        read.clear()
        got = list(st._read_shard(url, None, skip=k))
        assert [{x: v for x, v in g.items()} for g in got] == full[k:]
        assert len(read) == sum(len([x for x in s if not x.startswith("__")]) for s in full[k:])  # no more read


def test_skipping_into_a_shard_with_long_member_names_yields_the_same_samples(tmp_path):
    # Names past ustar's 100 bytes get pax headers (the header walk then defers to tarfile).
    import io
    import tarfile

    import simscale.data.stream as st

    url = str(tmp_path / "long.tar")
    with tarfile.open(url, "w", format=tarfile.PAX_FORMAT) as tf:
        for k in range(4):
            for ext, data in (("jpg", b"x" * (700 + k)), ("cls", str(k).encode())):
                info = tarfile.TarInfo(f"{'d' * 120}/{k:04d}.{ext}" if k % 2 else f"{k:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    full = list(st._read_shard(url, None))
    assert len(full) == 4
    for k in range(4):
        assert list(st._read_shard(url, None, skip=k)) == full[k:]


def test_too_little_data_for_one_global_batch_names_the_batch_that_fits(shards):
    with pytest.raises(DataError, match=rf"^{N} samples cannot fill one global batch of optim.batch_size=64 x 2 "
                                        rf"ranks = 128: set optim.batch_size <= {N // 2} or add data$"):
        TwoViewStream(cfg_for(shards, batch=64), rank=0, world_size=2)

"""Damaged shards in the training stream: an unreadable sample or a truncated shard is a counted,
named skip with a deterministic stand-in from the same chunk, so every rank still yields the same
number of full batches; past data.max_bad_fraction the run stops with one line."""
import shutil
import tarfile

import pytest
import torch

import images
from simscale.config import build_config
from simscale.data.stream import TwoViewStream
from simscale.errors import DataError

N = 40  # 2 ranks x batch 4 -> 5 batches per rank per epoch


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return images.id_shards(tmp_path_factory.mktemp("bad_samples"), N, (96, 72))


@pytest.fixture
def shards(clean, tmp_path):
    return shutil.copytree(clean, tmp_path / "shards")


def stream(out, rank=0, world=2, workers=0, frac=0.3):
    cfg = build_config("tiny", overrides=[f"data.train={out}", f"data.num_workers={workers}", "optim.batch_size=4",
                                          "data.shuffle_buffer=32", f"data.max_bad_fraction={frac}"])
    return TwoViewStream(cfg, rank=rank, world_size=world)


def break_jpeg(shard, member_index=0):
    """Overwrite the JPEG signature of one .jpg member in place (same size: only a hash can tell)."""
    with tarfile.open(shard) as tf:
        m = [m for m in tf.getmembers() if m.name.endswith(".jpg")][member_index]
    with open(shard, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"\x00" * 16)
    return m.name[:-4]


def run_all(out, **kw):
    return [list(stream(out, rank=r, **kw).batches(epoch=0)) for r in range(2)]


def test_a_corrupt_jpeg_is_replaced_named_once_and_batch_counts_stay_equal(shards, capsys):
    key = break_jpeg(shards / "shard-000002.tar", 1)
    got = run_all(shards)
    err = capsys.readouterr().err
    assert [len(b) for b in got] == [5, 5] and all(b["view_a"].shape[0] == 4 for r in got for b in r)
    assert err.count(f"'{key}'") == 1 and "shard-000002.tar" in err and "Traceback" not in err
    again = run_all(shards)  # the stand-in is deterministic
    for a, b in zip(got, again):
        for x, y in zip(a, b):
            assert torch.equal(x["view_a"], y["view_a"]) and torch.equal(x["index"], y["index"])
    # every index of the epoch is still there (the stand-in keeps the bad sample's own index)
    assert sorted(i for r in got for b in r for i in b["index"].tolist()) == list(range(N))


def test_a_truncated_shard_is_counted_not_a_traceback(shards, capfd):
    shard = shards / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    got = run_all(shards, workers=1)  # from a DataLoader worker process
    assert [len(b) for b in got] == [5, 5]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "shard-000003.tar" in err and "ends after" in err


def test_resume_after_a_bad_sample_replays_the_same_batches(shards):
    break_jpeg(shards / "shard-000000.tar", 0)
    s = stream(shards)
    full = list(s.batches(epoch=1))
    tail = list(s.batches(epoch=1, start=2 * s.global_batch))
    for x, y in zip(full[2:], tail):
        assert torch.equal(x["view_b"], y["view_b"]) and torch.equal(x["mask"], y["mask"])


@pytest.mark.parametrize("workers", [0, 1])
def test_past_max_bad_fraction_the_stream_stops_with_one_line(shards, workers):
    for name in ("shard-000000.tar", "shard-000001.tar"):
        (shards / name).write_bytes(b"not a tar at all")
    with pytest.raises(DataError, match="max_bad_fraction=0.1") as exc:
        for r in range(2):
            list(stream(shards, rank=r, workers=workers, frac=0.1).batches(epoch=0))
    assert "\n" not in str(exc.value) and "Traceback" not in str(exc.value)


def test_a_label_that_is_not_an_integer_is_unlabelled_not_an_error(shards):
    from simscale.data.stream import _label

    assert _label(b"7") == 7 and _label(b"\xff\xfe") == -1 and _label(b"x" * 100) == -1 and _label(None) == -1


def test_one_bad_sample_is_skipped_under_the_default_fraction_and_zero_means_strict(shards):
    break_jpeg(shards / "shard-000004.tar", 2)
    assert [len(b) for b in run_all(shards, frac=0.01)] == [5, 5]
    with pytest.raises(DataError, match="max_bad_fraction=0 "):
        run_all(shards, frac=0)

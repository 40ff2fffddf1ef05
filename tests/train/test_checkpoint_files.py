"""What makes a checkpoint count: a COMPLETE marker, every listed file at its listed size and sha256."""
import hashlib
import json

import pytest

from simscale.errors import CheckpointError
from simscale.train.checkpoint import Checkpointer, tag_for, verify
from simscale.train.resume import fingerprint_changes


def make_tag(root, step, complete=True):
    d = root / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    (d / "a.pt").write_bytes(b"x" * 100)
    (d / "sub").mkdir()
    (d / "sub" / "b.pt").write_bytes(b"y" * 10)
    if complete:
        files = {n: {"bytes": (d / n).stat().st_size, "sha256": hashlib.sha256((d / n).read_bytes()).hexdigest()}
                 for n in ("a.pt", "sub/b.pt")}
        (d / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 2, "files": files}))
    return d


def test_complete_checkpoint_verifies(tmp_path):
    assert verify(make_tag(tmp_path, 5)) is None


def test_missing_marker_and_truncated_file_are_reported(tmp_path):
    assert "COMPLETE" in verify(make_tag(tmp_path, 5, complete=False))
    d = make_tag(tmp_path, 6)
    (d / "sub" / "b.pt").write_bytes(b"y" * 3)
    assert "truncated" in verify(d)
    (d / "a.pt").unlink()
    assert "missing" in verify(d)


def test_auto_resume_picks_newest_complete(tmp_path):
    make_tag(tmp_path, 10)
    make_tag(tmp_path, 20)
    bad = make_tag(tmp_path, 30)
    (bad / "a.pt").write_bytes(b"x")
    make_tag(tmp_path, 40, complete=False)
    ck = Checkpointer(tmp_path, rank=1, world_size=2, keep_last=3)
    assert ck.find_resumable("auto").name == tag_for(20)
    assert ck.find_resumable("none") is None
    with pytest.raises(CheckpointError, match="truncated"):
        ck.find_resumable(str(bad))


def test_no_checkpoints_means_fresh_start(tmp_path):
    assert Checkpointer(tmp_path, 0, 1, 3).find_resumable("auto") is None


def test_incompatible_model_is_refused_with_the_key():
    old = {"model": {"embed_dim": 64, "depth": 2}, "deepspeed": {"zero_stage": 2}}
    new = {"model": {"embed_dim": 128, "depth": 2}, "deepspeed": {"zero_stage": 2}}
    with pytest.raises(CheckpointError, match="model.embed_dim=64"):
        fingerprint_changes(old, new, 2, 2, "ck")
    assert fingerprint_changes(old, old, 2, 2, "ck") == []


def test_keep_last_prunes_old_and_dead_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 5, complete=False)  # dead leftover older than the newest complete one
    make_tag(tmp_path, 6)
    ck = Checkpointer(tmp_path, rank=0, world_size=2, keep_last=2)
    ck._prune()
    assert [p.name for p in ck.tags()] == [tag_for(4), tag_for(6)]


def test_flipped_bytes_are_caught_by_the_content_check_only(tmp_path):
    d = make_tag(tmp_path, 7)
    raw = bytearray((d / "a.pt").read_bytes())
    raw[40:44] = b"ZZZZ"  # same size, other content
    (d / "a.pt").write_bytes(bytes(raw))
    assert verify(d) is None  # sizes alone cannot see it
    assert "does not match its sha256" in verify(d, content=True)


def test_auto_resume_skips_a_damaged_checkpoint_with_one_line(tmp_path, capsys):
    make_tag(tmp_path, 10)
    d = make_tag(tmp_path, 20)
    (d / "sub" / "b.pt").write_bytes(b"z" * 10)
    ck = Checkpointer(tmp_path, rank=0, world_size=1, keep_last=3)
    assert ck.find_resumable("auto").name == tag_for(10)
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000020" in err and "sub/b.pt" in err
    with pytest.raises(CheckpointError, match="does not match"):
        ck.find_resumable(str(d))


def test_size_only_marker_of_older_versions_is_not_trusted(tmp_path):
    d = make_tag(tmp_path, 3)
    (d / "COMPLETE").write_text(json.dumps({"step": 3, "world_size": 2, "files": {"a.pt": 100, "sub/b.pt": 10}}))
    assert "no sha256" in verify(d)


def test_pruning_keeps_the_newest_and_the_one_latest_names(tmp_path):
    for step in (1, 2, 3):
        make_tag(tmp_path, step)
    (tmp_path / "checkpoints" / "latest").write_text(tag_for(2))
    ck = Checkpointer(tmp_path, rank=0, world_size=2, keep_last=0)  # below the config's minimum of 1
    ck._prune()
    assert [p.name for p in ck.tags()] == [tag_for(2), tag_for(3)]

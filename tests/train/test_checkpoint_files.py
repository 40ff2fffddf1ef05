"""What makes a checkpoint count: a COMPLETE marker and every listed file at its listed size."""
import json

import pytest

from simscale.errors import CheckpointError
from simscale.train.checkpoint import Checkpointer, check_compatible, tag_for, verify


def make_tag(root, step, complete=True):
    d = root / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    (d / "a.pt").write_bytes(b"x" * 100)
    (d / "sub").mkdir()
    (d / "sub" / "b.pt").write_bytes(b"y" * 10)
    if complete:
        (d / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 2,
                                                "files": {"a.pt": 100, "sub/b.pt": 10}}))
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
        check_compatible(old, new, "ck")
    check_compatible(old, old, "ck")


def test_keep_last_prunes_old_and_dead_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 5, complete=False)  # dead leftover older than the newest complete one
    make_tag(tmp_path, 6)
    ck = Checkpointer(tmp_path, rank=0, world_size=2, keep_last=2)
    ck._prune()
    assert [p.name for p in ck.tags()] == [tag_for(4), tag_for(6)]

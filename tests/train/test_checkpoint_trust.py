"""A real run's checkpoints under attack (one process, `python -m simscale train`): flipped bytes
are caught before loading and resume/export fall back with one line; planted pickles in
DeepSpeed's files never run, even with matching checksums; a full disk during a save is one line
and the previous checkpoint stays intact; metrics.jsonl holds each step once after a resume."""
import hashlib
import json
import shutil
import subprocess

import pytest

from simscale.train.checkpoint import Checkpointer, tag_for, verify
from tests.distrun import simscale_cli
from tests.hostile import torch_bytes

pytestmark = pytest.mark.slow


def train(shards, run_dir, steps, *extra):
    return simscale_cli(["train", "--preset", "tiny", f"data.train={shards}", "data.num_workers=0",
                         "optim.batch_size=4", f"optim.max_steps={steps}", "run.save_every=1", "run.keep_last=5",
                         "log.tensorboard=false", f"run.dir={run_dir}", *extra], timeout=240)


def out(proc):
    return proc.stdout + proc.stderr


def flip64(path, at=4096):
    raw = bytearray(path.read_bytes())
    raw[at:at + 64] = bytes(b ^ 0x5A for b in raw[at:at + 64])
    path.write_bytes(bytes(raw))


def plant(tag_dir, name, marker):
    """Replace a file by a pickle payload and make COMPLETE agree (the attacker owns the directory)."""
    (tag_dir / name).write_bytes(torch_bytes(marker))
    meta = json.loads((tag_dir / "COMPLETE").read_text())
    meta["files"][name] = {"bytes": (tag_dir / name).stat().st_size,
                           "sha256": hashlib.sha256((tag_dir / name).read_bytes()).hexdigest()}
    (tag_dir / "COMPLETE").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def run3(train_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    proc = train(train_shards, run_dir, 3)
    assert proc.returncode == 0, out(proc)[-3000:]
    return run_dir


def test_flipped_optimizer_bytes_are_detected_and_resume_falls_back(run3, train_shards, tmp_path):
    run_dir = shutil.copytree(run3, tmp_path / "run")
    newest = run_dir / "checkpoints" / tag_for(3)
    flip64(newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert verify(newest) is None and "does not match" in verify(newest, content=True)
    proc = train(train_shards, run_dir, 4)
    assert proc.returncode == 0, out(proc)[-3000:]
    assert f"skipping checkpoint {tag_for(3)}" in out(proc) and f"resumed from {run_dir / 'checkpoints' / tag_for(2)}" \
        in out(proc).replace("\n", "")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # records count steps completed; step 3 was replayed and is logged once
    # the damaged one was rewritten by the replay (same step), all checkpoints now verify
    assert all(verify(t, content=True) is None for t in Checkpointer(run_dir, 0, 1, 5).tags())


def test_export_falls_back_past_a_damaged_checkpoint(run3, tmp_path):
    run_dir = shutil.copytree(run3, tmp_path / "run")
    flip64(run_dir / "checkpoints" / tag_for(3) / "simscale_rank00000.safetensors", at=2000)
    proc = simscale_cli(["export", str(run_dir), "--out", str(tmp_path / "exp"), "--encoder", "target"])
    assert proc.returncode == 0, out(proc)[-3000:]
    assert f"skipping checkpoint {tag_for(3)}" in out(proc)
    proc = simscale_cli(["export", str(run_dir), "--out", str(tmp_path / "exp3"), "--step", "3"])
    assert proc.returncode == 2 and "Traceback" not in out(proc) and "does not match" in out(proc)


def test_planted_pickle_in_optimizer_states_never_runs_at_resume(run3, train_shards, tmp_path):
    run_dir = shutil.copytree(run3, tmp_path / "run")
    marker = tmp_path / "RAN"
    plant(run_dir / "checkpoints" / tag_for(3), "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    proc = train(train_shards, run_dir, 4)
    assert proc.returncode == 2 and "refused unread" in proc.stderr, out(proc)[-3000:]
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_planted_pickle_in_model_states_never_runs_at_export(run3, tmp_path):
    run_dir = shutil.copytree(run3, tmp_path / "run")
    marker = tmp_path / "RAN"
    plant(run_dir / "checkpoints" / tag_for(3), "mp_rank_00_model_states.pt", marker)
    proc = simscale_cli(["export", str(run_dir), "--out", str(tmp_path / "exp")])
    assert proc.returncode == 2 and "refused unread" in proc.stderr, out(proc)[-3000:]
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(run3, train_shards, tmp_path):
    one = sum(p.stat().st_size for p in (run3 / "checkpoints" / tag_for(1)).iterdir())
    mnt = tmp_path / "small"
    mnt.mkdir()
    size_kb = (one * 3 // 2 + (64 << 10)) >> 10  # room for one checkpoint, not two
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        proc = train(train_shards, mnt / "run", 3)
        err = proc.stderr
        assert proc.returncode == 2, out(proc)[-3000:]
        assert "Traceback" not in err and "No space left on device" in err, err[-3000:]
        assert f"the previous checkpoint {tag_for(1)} is intact" in err.replace("\n", "")
        ck = Checkpointer(mnt / "run", 0, 1, 5)
        assert [t.name for t in ck.tags()] == [tag_for(1)] and verify(ck.tags()[0], content=True) is None
        # the same file system read-only (what a permission problem looks like to root): one line too
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        proc = train(train_shards, mnt / "run", 3)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, out(proc)[-3000:]
        assert "Read-only file system" in proc.stderr and f"{tag_for(1)} is intact" in proc.stderr.replace("\n", "")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)

"""No job hangs, on 2 real gloo ranks (torchrun; one case with two DeepSpeed launchers): a rank that
raises, a rank that is stopped, ranks whose checkpoint listings differ. Six launches in all.

- A rank raising an ordinary exception ends the other within seconds, with a line on that rank
  naming who failed (the failure notice, not the collective timeout, which is set to 300 s).
- Resuming that run while rank 1 lists a stale directory holding an extra, newer checkpoint (a copy
  of an older one): both ranks resume from rank 0's choice and finish.
- A rank stopped with SIGSTOP: the other rank exits after run.collective_timeout_s with one line
  naming the phase and the timeout (torchrun then needs its 30 s grace to SIGKILL the stopped one).
- Checkpoint choice where each rank sees its own directory (plain gloo, no training): a stale extra
  checkpoint, a newest one a rank cannot see, one damaged in a rank's own file, an explicit --resume.
- Rank 0 raising on one of two 'nodes' (two DeepSpeed launchers): rank 1 on the other ends in seconds.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from simscale.train.checkpoint import tag_for
from tests.distrun import ROOT, cpu_env, free_port, tail, torchrun

pytestmark = pytest.mark.slow


def launch(args: list[str], timeout: int) -> tuple[int, str, float]:
    """torchrun 2 ranks of `python -m tests.train.faults ARGS` in a session of its own, so that a
    timeout kills the stopped rank too; returns (exit code, output, unix time it ended)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "-m", "tests.train.faults", *args]
    proc = subprocess.Popen(cmd, env=cpu_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the job hung for {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out, time.time()


def fault_time(out: str) -> float:
    # not anchored to a line start: the other rank's output shares the pipe and may not have ended
    # its line when the fault line lands (a CI run failed on the anchored form)
    return float(re.search(r"fault: rank \d \w+ after step \d+ at (\d+\.\d{3})", out).group(1))


def common(shards, run_dir, timeout_s: int) -> list[str]:
    return ["train", "--preset", "tiny", f"data.train={shards}", "data.num_workers=1", "optim.batch_size=4",
            "optim.max_steps=9", "run.save_every=3", "log.tensorboard=false", f"run.dir={run_dir}",
            f"run.collective_timeout_s={timeout_s}"]


def test_a_raising_rank_ends_the_job_in_seconds_then_rank_0_chooses_the_checkpoint(train_shards, tmp_path):
    run = tmp_path / "run"
    rc, out, ended = launch(["--raise-after", "6", "1", *common(train_shards, run, 300)], timeout=400)
    assert rc != 0, out[-3000:]
    took = ended - fault_time(out)
    print(f"raise on rank 1 -> job ended in {took:.1f} s")
    assert took < 30, (took, out[-3000:])  # the collective timeout is 300 s
    assert "error: rank 1: RuntimeError during" in out and "injected failure on rank 1 after step 6" in out
    assert re.search(r"error: rank 0: stopping during '[\w ]+' because rank 1 failed: RuntimeError", out), out[-3000:]
    ckpts = run / "checkpoints"
    assert (ckpts / tag_for(6) / "COMPLETE").is_file() and not (ckpts / tag_for(9)).exists()

    # Rank 1's listing: the two real checkpoints and a newer-named one that holds step 3's state.
    view = tmp_path / "stale_view"
    view.mkdir()
    for step in (3, 6):
        (view / tag_for(step)).symlink_to(ckpts / tag_for(step))
    shutil.copytree(ckpts / tag_for(3), view / tag_for(7))
    rc, out, _ = launch(["--stale-view", str(view), "1", *common(train_shards, run, 300)], timeout=400)
    assert rc == 0, out[-3000:]
    assert "fault: rank 0 resumes from step_00000006" in out and "fault: rank 1 resumes from step_00000006" in out
    assert f"resumed from {ckpts / tag_for(6)} at step 6" in out.replace("\n", "")
    assert (ckpts / tag_for(9) / "COMPLETE").is_file()


def test_a_stopped_rank_ends_the_job_after_the_collective_timeout(train_shards, tmp_path):
    timeout_s = 20
    rc, out, ended = launch(["--stop-after", "2", "1", *common(train_shards, tmp_path, timeout_s)], timeout=300)
    assert rc != 0, out[-3000:]
    line = re.search(r"error: rank 0: collective '([\w ]+)' timed out after 20 s waiting for another rank "
                     r"\(stopped or hung\); raise run.collective_timeout_s or find the stuck rank", out)
    assert line, out[-3000:]
    assert line.group(1) in ("train step", "data", "checkpoint save")
    # timeout + the notice's linger (3 s) + torchrun's 30 s before it SIGKILLs the stopped rank
    took = ended - fault_time(out)
    print(f"SIGSTOP on rank 1 -> job ended in {took:.1f} s (timeout {timeout_s} s)")
    assert timeout_s <= took < timeout_s + 3 + 30 + 30, (took, out[-3000:])


def make_tag(run_dir, step: int):
    """A complete checkpoint with one file of each rank's (rank 1 hashes its simscale_rank00001 file)."""
    d = run_dir / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    files = {}
    for name, size in (("mp_rank_00_model_states.pt", 64), ("simscale_rank00001.safetensors", 32)):
        (d / name).write_bytes(bytes([step]) * size)
        files[name] = {"bytes": size, "sha256": hashlib.sha256((d / name).read_bytes()).hexdigest()}
    (d / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 2, "files": files}))


def scenario(root, name: str, rank0_steps, rank1_steps, resume=("auto", "auto")):
    for rank, steps in enumerate((rank0_steps, rank1_steps)):
        (root / name / f"rank{rank}").mkdir(parents=True)
        for step in steps:
            make_tag(root / name / f"rank{rank}", step)
    (root / name / "resume.json").write_text(json.dumps({"0": resume[0], "1": resume[1]}))
    return root / name


def test_rank_0_chooses_and_every_rank_verifies_its_choice(tmp_path):
    """One launch of 2 plain gloo ranks, each looking at its own copy of the run directory."""
    root = tmp_path / "scenarios"
    scenario(root, "stale_extra_on_rank1", (3, 6), (3, 6, 9))
    scenario(root, "newest_unseen_on_rank1", (3, 6), (3,))
    damaged = scenario(root, "damaged_on_rank1", (3, 6), (3, 6))
    victim = damaged / "rank1" / "checkpoints" / tag_for(6) / "simscale_rank00001.safetensors"
    victim.write_bytes(b"\x00" * victim.stat().st_size)  # same size, other bytes: only rank 1's hash sees it
    scenario(root, "explicit_missing_on_rank1", (3, 6), (3,),
             resume=("checkpoints/step_00000006", "checkpoints/step_00000003"))
    proc = torchrun(["tests.train.choice_worker", str(root), str(tmp_path)], timeout=120)
    assert proc.returncode == 0, tail(proc)
    ranks = [json.loads((tmp_path / f"choice_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # never a split choice
    got = ranks[0]
    assert got["stale_extra_on_rank1"] == {"chosen": tag_for(6)}  # rank 1's extra step 9 is not rank 0's
    assert got["newest_unseen_on_rank1"]["error"].startswith(
        "rank 1 cannot see checkpoint 'checkpoints/step_00000006' that rank 0 chose (it does not exist)")
    assert got["damaged_on_rank1"] == {"chosen": tag_for(3)}
    assert "skipping checkpoint step_00000006: rank 1: file 'simscale_rank00001.safetensors' does not match its " \
           "sha256" in proc.stderr.replace("\n", "")
    assert got["explicit_missing_on_rank1"]["error"].startswith(
        "cannot resume from 'checkpoints/step_00000006': rank 1: it does not exist")


def test_a_failing_rank_0_ends_rank_1_on_another_node(train_shards, tmp_path):
    """Two DeepSpeed launchers (no-ssh, one rank per 'node', as launchers/multi_node.sh starts them):
    no launcher ends the other node's ranks, and rank 0's process hosts the rendezvous store."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
                               "--master_port", port, "--no_ssh", "--node_rank", str(r), "--no_local_rank",
                               "--module", "tests.train.faults", "--raise-after", "2", "0",
                               *common(train_shards, tmp_path / "run", 300)],
                              cwd=ROOT, env=cpu_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
             for r in (0, 1)]
    outs, ended = [], []
    try:
        for n in nodes:
            outs.append(n.communicate(timeout=300)[0])
            ended.append(time.time())
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    assert [n.returncode != 0 for n in nodes] == [True, True], outs[0][-2000:] + outs[1][-2000:]
    took = max(ended) - fault_time(outs[0])
    print(f"raise on rank 0 of 2 launchers -> both ended in {took:.1f} s")
    assert took < 30, (took, outs[0][-2000:], outs[1][-2000:])  # the collective timeout is 300 s
    assert "error: rank 0: RuntimeError during" in outs[0]
    assert re.search(r"error: rank 1: stopping during '[\w ]+' because rank 0 failed: RuntimeError", outs[1]), \
        outs[1][-3000:]

"""No job hangs: the one line for each way a rank can end, and the failure notice between processes.

The 2-rank runs (a raising rank, a stopped rank, a stale checkpoint listing) are in
test_no_hang.py; these are the fast parts: real gloo error texts, a real TCPStore.
"""
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from simscale.config import build_config
from simscale.errors import CheckpointError, ConfigError
from simscale.train import watchdog
from simscale.train.checkpoint import Checkpointer
from tests.distrun import ROOT, cpu_env

# What gloo raised in this repository's 2-rank runs (torch 2.14.1), a stopped and a dead peer.
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
                "Timed out waiting 20000ms for recv operation to complete")
GLOO_PEER_GONE = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by "
                  "peer [127.0.0.1]:30919. This is typically caused by a remote worker crashing.")


def test_collective_timeout_is_one_line_naming_the_phase_and_the_key():
    watchdog.set_phase("checkpoint save")
    try:
        raise RuntimeError("deepspeed wrapper") from RuntimeError(GLOO_TIMEOUT)
    except RuntimeError as exc:
        line, code, bug = watchdog.describe(exc, 20)
    assert line == ("collective 'checkpoint save' timed out after 20 s waiting for another rank (stopped or "
                    "hung); raise run.collective_timeout_s or find the stuck rank")
    assert code != 0 and not bug


def test_a_dead_peer_a_user_error_and_a_bug_are_told_apart():
    watchdog.set_phase("train step")
    line, code, bug = watchdog.describe(RuntimeError(GLOO_PEER_GONE), 600)
    assert "another rank left during 'train step'" in line and code != 0 and not bug
    line, code, bug = watchdog.describe(CheckpointError("cannot resume from 'x': it does not exist"), 600)
    assert line == "cannot resume from 'x': it does not exist" and code == 2 and not bug
    line, code, bug = watchdog.describe(ZeroDivisionError("division by zero\nmore"), 600)
    assert line == "ZeroDivisionError during 'train step': division by zero" and bug


def test_collective_timeout_key_default_and_range():
    assert build_config("tiny").run.collective_timeout_s == 600
    assert build_config("tiny", overrides=["run.collective_timeout_s=20"]).run.collective_timeout_s == 20
    for bad in ("0", "4", str(8 * 86400)):
        with pytest.raises(ConfigError, match=r"run.collective_timeout_s' must lie in \[5, 604800\]"):
            build_config("tiny", overrides=[f"run.collective_timeout_s={bad}"])
    with pytest.raises(ConfigError, match="collective_timeout_s"):
        build_config("tiny", overrides=["run.collective_timeout_s=1.5"])


def test_explicit_resume_of_a_missing_directory_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="it does not exist") as exc:
        Checkpointer(tmp_path, 0, 1, 1).find_resumable(str(tmp_path / "step_00000009"))
    assert "\n" not in str(exc.value)


_LISTENER = """
import sys, time
from simscale.train import watchdog
watchdog.set_phase("eval")
watchdog.start_failure_notice("127.0.0.1", int(sys.argv[1]), 1, 2, "simscale/failed/test")
print("listening", flush=True)
time.sleep(60)
print("never told", flush=True)
"""


def test_failure_notice_ends_another_process_within_seconds():
    """A real TCPStore (as the rendezvous runs it) and a real second process waiting on it."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    proc = subprocess.Popen([sys.executable, "-c", _LISTENER, str(server.port)], env=cpu_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
        time.sleep(0.5)  # its thread is blocked in the store's wait by now (or sees the key at once)
        told = time.monotonic()
        server.compare_set("simscale/failed/test", "", "rank 0 failed: disk on fire")
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - told
    finally:
        proc.kill()
    assert proc.returncode == 1 and "never told" not in out
    assert "rank 1: stopping during 'eval' because rank 0 failed: disk on fire" in err.replace("\n", "")
    assert took < 5, took  # a blocking wait on the server, no polling interval
    assert server.add("simscale/failed/test/seen", 0) == 1  # it said it saw the notice


def test_an_interrupted_rank_names_its_step_and_the_resume_command():
    watchdog.set_phase("train step")
    assert watchdog.describe(KeyboardInterrupt(), 600)[0] == "interrupted during 'train step'"
    watchdog.set_resume_hint(lambda: "at step 7; resume with: simscale train --preset tiny --config r/config.yaml "
                                     "--resume auto")
    try:
        line, code, bug = watchdog.describe(KeyboardInterrupt(), 600)
    finally:
        watchdog.set_resume_hint(None)
    assert line == ("interrupted at step 7; resume with: simscale train --preset tiny --config r/config.yaml "
                    "--resume auto (during 'train step')") and code == 130 and not bug

"""The training step never waits for the device: no host syncs from simscale's code on a
non-logging step, counted by tests/train/host_sync_worker.py in a real one-process Trainer."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distrun import ROOT, cpu_env, free_port

WORKER = Path(__file__).with_name("host_sync_worker.py")


@pytest.fixture(scope="module")
def counts(train_shards, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("host_syncs") / "run"
    proc = subprocess.run([sys.executable, str(WORKER), str(train_shards), str(run_dir)],
                          env=cpu_env(MASTER_PORT=str(free_port())), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_all_steps_ran_and_every_loss_was_read(counts):
    assert counts["steps"] == 5 and counts["losses"] == 5


@pytest.mark.parametrize("path", ["cpu_path", "device_path"])
def test_non_logging_step_makes_no_host_sync(counts, path):
    assert counts[path] == {}


def test_the_counter_sees_a_sync(counts):
    assert sum(counts["injected"].values()) == 1 and all("simscale.train.loop" in k for k in counts["injected"])

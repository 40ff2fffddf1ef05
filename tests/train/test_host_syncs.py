"""The training step never waits for the device: no host syncs from simscale's code on a
non-logging step, counted by tests/train/host_sync_worker.py in a real one-process Trainer."""
from pathlib import Path

import pytest

from tests.distrun import worker_json

WORKER = Path(__file__).with_name("host_sync_worker.py")


@pytest.fixture(scope="module")
def counts(train_shards, tmp_path_factory) -> dict:
    return worker_json(WORKER, str(train_shards), str(tmp_path_factory.mktemp("host_syncs") / "run"))


def test_all_steps_ran_and_every_loss_was_read(counts):
    assert counts["steps"] == 5 and counts["losses"] == 5


@pytest.mark.parametrize("path", ["cpu_path", "device_path"])
def test_non_logging_step_makes_no_host_sync(counts, path):
    assert counts[path] == {}


def test_the_counter_sees_a_sync(counts):
    assert sum(counts["injected"].values()) == 1 and all("simscale.train.loop" in k for k in counts["injected"])

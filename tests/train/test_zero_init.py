"""Every ZeRO-3 engine simscale or its benchmarks build leaves torch as it found it.

DeepSpeed's zero.Init replaces torch.nn.functional.linear process-wide and never puts it back; on
torch 2.11 the compiled blocks of a later engine then got almost no weight gradient (issue 21).
Run in a subprocess (tests/train/zero_init_worker.py): the patches are process-wide.
"""
from pathlib import Path

import pytest

from tests.distrun import worker_json

WORKER = Path(__file__).with_name("zero_init_worker.py")
CLEAN = {"linear_is_torch": True, "changed": []}


@pytest.fixture(scope="module")
def report(train_shards, tmp_path_factory) -> dict:
    return worker_json(WORKER, str(train_shards), str(tmp_path_factory.mktemp("zero_init") / "run"))


@pytest.mark.slow
def test_trainer_zero3_engine_leaves_torch_alone(report):
    assert report["start"] == CLEAN
    assert report["trainer_steps"] == 2
    assert report["trainer_built"] == CLEAN  # not even while the engine lives: torch's own F.linear trains
    assert report["trainer"] == CLEAN


@pytest.mark.slow
def test_bench_zero3_engine_leaves_torch_alone(report):
    assert report["bench_loss_finite"]
    assert report["bench"] == CLEAN


@pytest.mark.slow
def test_guard_restores_what_zero_init_patched(report):
    # with DeepSpeed's linear replacement on, it is active inside the build and gone after it ...
    assert report["guard_inside_linear_is_torch"] is False
    assert report["guard"] == CLEAN
    # ... and the check sees a plain zero.Init leave it behind (so the checks above can fail)
    assert report["raw"]["linear_is_torch"] is False and "functional.linear" in " ".join(report["raw"]["changed"])
    assert report["raw_restored"] == CLEAN

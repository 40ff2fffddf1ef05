"""Shared test setup: CPU DeepSpeed, one thread per process, quiet logs."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util
from pathlib import Path

import pytest

_IMAGES = Path(__file__).parent / "data" / "images.py"


def load_images_module():
    """tests/data/images.py (real photographs from installed packages), importable from any test."""
    spec = importlib.util.spec_from_file_location("simscale_test_images", _IMAGES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """Real JPEG shards (36 photos in 3 classes, 4 shards) made by `simscale prepare`, shared by tests."""
    from simscale.data.prepare import Options, prepare

    root = tmp_path_factory.mktemp("train_data")
    load_images_module().class_folders(root / "src", per_class=12)
    prepare([str(root / "src")], root / "shards", Options(shard_size=10, max_side=96), workers=1, progress=False)
    return root / "shards"


# A 3-step ZeRO-3 run on 2 ranks (torchrun): tests/test_export.py exports it, tests/test_multinode.py
# trains the same recipe on two 'nodes' and compares; one launch serves both.
ZERO3_RECIPE = ["optim.batch_size=4", "optim.max_steps=3", "data.num_workers=0", "deepspeed.zero_stage=3",
                "log.tensorboard=false", "optim.base_lr=1e-2"]


@pytest.fixture(scope="session")
def zero3_run(train_shards, tmp_path_factory) -> Path:
    from tests.distrun import tail, train_cli

    run = tmp_path_factory.mktemp("zero3_run")
    proc = train_cli([f"data.train={train_shards}", *ZERO3_RECIPE, f"run.dir={run}"])
    assert proc.returncode == 0, tail(proc)
    return run


# A finished world-1 run of 2 steps at batch 4 (a checkpoint each step, no warmup): the resume tests
# (tests/train/test_resume.py, test_resume_record.py) each go on from a copy of it.
FINISHED_RECIPE = ["data.num_workers=0", "log.tensorboard=false", "run.save_every=1", "optim.warmup_steps=0"]


@pytest.fixture(scope="session")
def finished_run(train_shards, tmp_path_factory) -> Path:
    from tests.distrun import simscale_cli, tail

    run = tmp_path_factory.mktemp("finished") / "run"
    proc = simscale_cli(["train", "--preset", "tiny", f"data.train={train_shards}", *FINISHED_RECIPE,
                         "optim.batch_size=4", "optim.max_steps=2", f"run.dir={run}"])
    assert proc.returncode == 0, tail(proc)
    return run

"""The README's first command, shortened: real images -> shards -> SIM under the deepspeed
launcher on 2 CPU processes (online k-NN on) -> export to timm -> k-NN numbers (trained, random
init, raw pixels); on Fashion-MNIST and on a user's own class folders."""
import json
import os
import re
import subprocess
import sys

import pytest

from simscale.data.fashion_mnist import DEFAULT_ROOT
from tests.conftest import load_images_module
from tests.distrun import ROOT, cpu_env, free_port

pytestmark = pytest.mark.slow


SHORT = dict(PER_CLASS="20", VAL_PER_CLASS="10", STEPS="4", EVAL_EVERY="2", BATCH="8")


def quickstart(work, eval_steps=(0, 2, 4), timeout=600, **extra):
    """Runs launchers/quickstart.sh with `extra` in its environment (a None value: left unset)
    and checks every part of its output; returns stdout + stderr."""
    extra = {k: v for k, v in extra.items() if v is not None}
    env = cpu_env(WORK=str(work), PYTHON=sys.executable, MASTER_PORT=str(free_port()), SIMSCALE_NO_PROGRESS="0",
                  **extra)
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run(["bash", "launchers/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert step in out
    assert (work / "export" / "model.safetensors").is_file()
    top1 = [float(x) for x in re.findall(r"│\s+20 │\s+0\.07 │\s+([\d.]+) │", out)]
    assert len(top1) == 3 and all(0 <= x <= 100 for x in top1)  # SIM, random init, raw pixels
    assert "raw pixels at 32 px" in out
    evals = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "knn_online_top1" in r] == list(eval_steps)
    # The closing line reads the three numbers and names the next commands.
    reading = [line for line in out.splitlines() if line.startswith("reading: ")]
    assert len(reading) == 1 and f"SIM {top1[0]:.2f}% vs random init {top1[1]:.2f}%" in reading[0]
    assert f"raw pixels {top1[2]:.2f}%" in reading[0] and "simscale report" in reading[0] and "timm" in reading[0]
    # Redirected (not a terminal): no escape codes; DeepSpeed's launcher/accelerator chatter is off.
    assert "\x1b" not in out
    for noise in ("[INFO]", "Unable to find hostfile", "unable to detect", "TCPStore"):
        assert noise not in out, noise
    return out


def test_quickstart_on_the_users_own_class_folders(tmp_path):
    images = load_images_module()
    images.class_folders(tmp_path / "mine" / "train", per_class=8)
    images.class_folders(tmp_path / "mine" / "val", per_class=3)
    # 24 images, fewer than the default 64 x 2 ranks: BATCH unset, the quickstart fits it and says so.
    out = quickstart(tmp_path / "work", TRAIN_DIR=str(tmp_path / "mine" / "train"),
                     VAL_DIR=str(tmp_path / "mine" / "val"), **{**SHORT, "BATCH": None})
    assert "your images" in out and "Fashion-MNIST" not in out.split("2/5")[0]
    assert "batch fitted to the data: 24 training images -> BATCH=12 per process x NPROC=2" in out


def test_quickstart_names_batch_when_an_explicit_batch_does_not_fit(tmp_path):
    images = load_images_module()
    images.class_folders(tmp_path / "mine" / "train", per_class=8)
    images.class_folders(tmp_path / "mine" / "val", per_class=3)
    env = cpu_env(WORK=str(tmp_path / "work"), TRAIN_DIR=str(tmp_path / "mine" / "train"),
                  VAL_DIR=str(tmp_path / "mine" / "val"), BATCH="64", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launchers/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: BATCH=64 x NPROC=2 needs 128 training images, there "
                                                    "are 24: set BATCH <= 12 (or leave it unset to fit the data)")
    assert not (tmp_path / "work" / "run").exists()  # stopped before training


def test_quickstart_refuses_half_a_user_data_set(tmp_path):
    env = cpu_env(WORK=str(tmp_path), TRAIN_DIR=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launchers/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "VAL_DIR" in proc.stderr


@pytest.mark.skipif(not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").exists() and os.environ.get("CI") != "true",
                    reason="needs Debian's dataset-fashion-mnist (.ci/setup installs it; in CI it must be there)")
def test_the_quickstart_learns(tmp_path):
    """Issue 20: the quickstart as the README runs it (3000 images, 900 steps of 128 on 2 ranks),
    and its SIM encoder beats the random-init encoder by >= 12 k-NN points, the issue's goal
    (measured on the whole 10,000-image test split: +14.27, 73.99 vs 59.72, on Dec 6 2026). The
    run is deterministic on one stack (same seed, data order and kernels); the margin allows for
    another CPU's kernels. 4.4 min in CI on Dec 5 2026, 5.5 min on Dec 6 with other jobs on the
    cores (~9 min on slower machines). It is also the end-to-end test of the README's first
    command on its embedded default: every output check of `quickstart` runs on it."""
    work = tmp_path / "work"
    quickstart(work, eval_steps=range(0, 901, 300), timeout=1800)
    sim, rnd, pix = (json.loads((work / f"knn_{n}.json").read_text())["top1"] for n in ("sim", "random_init", "pixels"))
    assert sim >= rnd + 12, f"SIM {sim:.2f} vs random init {rnd:.2f} (raw pixels {pix:.2f}): the encoder did not learn"

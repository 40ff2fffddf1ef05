"""The CPU rehearsal of bench/gpu.sh: the same script end to end, every phase, on CPU.

Installs this Python's wheel set (bench/make_wheels.sh host bench/wheels-host) into a fresh
target dir exactly as the GPU run installs bench/wheels, checks the imports come from there,
then runs bench/gpu_bench.py --cpu: sweep over ZeRO-2/3 x checkpointing x batches with the OOM
path (simulated above batch 16: nothing OOMs on CPU), the profile, and `simscale train` killed
and resumed. The GPU run differs only in preset/precision/batches and the torch.cuda calls.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST_WHEELS = ROOT / "bench" / "wheels-host"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not any(HOST_WHEELS.glob("*.whl")),
                       reason="bench/wheels-host not built: `bash bench/make_wheels.sh host bench/wheels-host` (.ci/run does)"),
]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_out")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run(["bash", "bench/gpu.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    return proc, out


def test_gpu_sh_rehearsal_runs_every_phase(rehearsal):
    proc, out = rehearsal
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_bench.json", "gpu_bench.log", "profile.txt"], files  # <= 8 come back from $OUT
    res = json.loads((out / "gpu_bench.json").read_text())
    assert res["errors"] == {}
    # the carried wheels, installed into the temp target, are what ran (not the venv's copies)
    assert "simscale_site." in res["deepspeed_file"], res["deepspeed_file"]
    assert "imports checked" in text

    ok = [r for r in res["sweep"] if "error" not in r]
    ooms = [r for r in res["sweep"] if r.get("error") == "oom"]
    assert {(r["zero"], r["grad_ckpt"]) for r in ok} == {(2, False), (2, True), (3, False), (3, True)}, res["sweep"]
    assert len(ooms) == 4 and all(r["batch"] == 32 for r in ooms)  # each series ends at its OOM ...
    for r in ok:  # ... and the next series still measures on a fresh engine
        assert r["img_per_s"] > 0 and r["finite"] and r["batch"] in (8, 16)
        assert r["hw_gflop_per_img"] >= r["model_gflop_per_img"] and r["mfu_of_matmul"] > 0
        assert r["mfu"] is None and r["hfu"] is None  # no datasheet peak for a CPU
    best = res["best"]
    assert best["img_per_s"] == max(r["img_per_s"] for r in ok)
    profile = (out / "profile.txt").read_text()
    assert "aten::" in profile and res["profile"]["top"]

    comp = res["compile"]  # model.compile on/off at one point: both measured, the same loss to fp32 noise
    assert comp["eager"]["img_per_s"] > 0 and comp["compiled"]["img_per_s"] > 0 and comp["speedup"] > 0, comp
    assert abs(comp["eager"]["loss_first"] - comp["compiled"]["loss_first"]) < 1e-4, comp

    census = res["syncs"]  # the real Trainer ran its 6 steps under the census (no detector on CPU)
    assert census["mode"] == "cpu" and census["steps"] == 6 and set(census["syncs_per_step"]) == {"1", "2", "3", "4"}

    train = res["train"]
    assert (train["full_rc"], train["killed_rc"], train["resumed_rc"]) == (0, 17, 0), train
    assert train["steps_full"] == 20 and train["steps_compared"] == 20 and train["resumed_steps"] == 10
    assert train["first_resumed_equal"] and train["all_losses_equal"], train  # fp32 CPU: bit-exact
    assert "SIM tiny fp32 on cpu" in text and "img/s" in text  # the one table

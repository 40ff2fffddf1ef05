"""What a user sees from a real run whose stderr is a file (SLURM, a redirect): a plain progress
line per logged step, steps numbered as the checkpoints are, and the report written at the end."""
import json
import re
import subprocess
import sys

import pytest

from simscale.train.checkpoint import tag_for
from tests.distrun import ROOT, cpu_env, free_port

pytestmark = pytest.mark.slow

STEPS, EVERY = 5, 2


@pytest.fixture(scope="module")
def run(train_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress")
    run_dir, log = tmp / "run", tmp / "stderr.log"
    cmd = [sys.executable, "-m", "simscale", "train", "--preset", "tiny", "--resume", "none",
           f"data.train={train_shards}", "data.num_workers=0", "optim.batch_size=4", f"optim.max_steps={STEPS}",
           f"log.every={EVERY}", "log.tensorboard=false", f"run.save_every={STEPS}", f"run.dir={run_dir}"]
    with open(log, "w") as err:  # a file, not a terminal; SIMSCALE_NO_PROGRESS=1 (cpu_env) must not silence it
        proc = subprocess.run(cmd, env=cpu_env(MASTER_PORT=str(free_port())), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return run_dir, text


def test_a_plain_line_per_logged_step_with_eta(run):
    _, text = run
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/5", "2/5", "4/5", "5/5"]
    for key in ("epoch", "loss", "lr", "img/s", "TFLOP/s", "mem", "data wait", "ETA"):
        assert all(key in line for line in lines), key
    assert "ETA ?" in lines[0]  # no rate yet after the first step
    assert all(re.search(r"ETA \d+m\d\ds", line) for line in lines[1:])
    assert "\x1b[" not in text  # no terminal escapes in a log file


def test_logged_steps_match_checkpoint_steps(run):
    run_dir, _ = run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4, 5]
    assert (run_dir / "checkpoints" / tag_for(rows[-1]["step"])).is_dir()
    for key in ("align_dense", "uniform_dense", "loss_dense", "target_std"):  # the tiny preset: dense term only
        assert all(isinstance(r[key], float) for r in rows), key


def test_training_writes_the_report(run):
    run_dir, text = run
    report = run_dir / "report"
    for name in ("loss.png", "schedule.png", "throughput.png", "data_wait.png", "summary.txt"):
        assert (report / name).stat().st_size > 0, name
    assert (report / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "summary.txt").read_text().startswith("run: steps 1..5")  # not "run run:" (issue 22.7)
    assert "report: 5 files" in text
    assert not (run_dir / "config.yaml").read_text().count("fault")

"""What a start records, and what a resume says (issue 22, points 2 and 4): the run's config is
written only once a start is accepted (a refused resume leaves config.yaml byte-identical), each
start keeps a dated copy, a finished run says so, and a longer schedule names the lr it moves."""
import shutil

import pytest

from tests.conftest import FINISHED_RECIPE
from tests.distrun import simscale_cli, tail

pytestmark = pytest.mark.slow


def test_a_refused_resume_keeps_the_recipe_and_a_finished_or_extended_run_says_so(finished_run, train_shards,
                                                                                  tmp_path):
    run = shutil.copytree(finished_run, tmp_path / "run")  # 2 steps at batch 4, no warmup: one start recorded
    common = ["train", "--preset", "tiny", f"data.train={train_shards}", *FINISHED_RECIPE, "optim.batch_size=4",
              f"run.dir={run}"]
    recipe = (run / "config.yaml").read_bytes()
    assert len(list((run / "starts").glob("config-*.yaml"))) == 1

    refused = simscale_cli([*common, "optim.max_steps=2", "data.partitions=8"])
    assert refused.returncode == 2, tail(refused)
    assert "data.partitions=4, this run asks for 8" in refused.stderr
    assert (run / "config.yaml").read_bytes() == recipe  # nothing the run wrote was replaced
    assert len(list((run / "starts").glob("config-*.yaml"))) == 1

    again = simscale_cli([*common, "optim.max_steps=2"])
    out = again.stdout + again.stderr
    assert again.returncode == 0, tail(again)
    assert "this run already finished: step 2 of 2; nothing to train" in out
    assert not any("resume changes" in line and "max_steps" in line for line in out.splitlines())

    longer = simscale_cli([*common, "optim.max_steps=4"])
    out = longer.stdout + longer.stderr
    assert longer.returncode == 0, tail(longer)
    changes = next(line for line in out.splitlines() if "resume changes:" in line)
    # the cosine over 2 steps had reached min_lr 0 at step 2; over 4 steps it is half-way
    assert "optim.max_steps 2 -> 4" in changes and "lr at step 2 0.000e+00 ->" in changes, changes
    assert "total steps 2 -> 4" in changes
    assert "already finished" not in out
    assert "max_steps: 4" in (run / "config.yaml").read_text()
    assert len(list((run / "starts").glob("config-*.yaml"))) == 3

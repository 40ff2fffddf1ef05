"""Exact resume under a real crash: run N steps, or run k, die (os._exit), resume to N.

Per-step losses and final online + target weights must be bit-identical (CPU, fp32). Then a
truncated newest checkpoint is refused and training resumes from the one before, again
reproducing the uninterrupted run. Each run is a real `torchrun -m simscale train` on 2 ranks.
"""
import json
import shutil

import pytest
import torch

from simscale.export import encoder_state_dict
from simscale.train.checkpoint import tag_for
from tests.conftest import FINISHED_RECIPE
from tests.distrun import simscale_cli, tail, torchrun, train_cli

pytestmark = pytest.mark.slow

STEPS, KILL_AFTER = 6, 3  # checkpoints every 3 steps: the kill comes right after step 3 and its checkpoint


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in rows:  # a resumed run appends; a re-run step would overwrite (none should be re-run)
        by_step[r["step"]] = r["loss"]
    return [by_step[s] for s in range(1, STEPS + 1)]  # step n: the n-th optimizer step (1-based)


def weights(run_dir):
    tag = run_dir / "checkpoints" / tag_for(STEPS)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    online = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    return online, encoder_state_dict(tag, "target")


def assert_same_weights(a, b):
    for part_a, part_b in zip(a, b):
        assert part_a.keys() == part_b.keys()
        for k in part_a:
            assert torch.equal(part_a[k], part_b[k]), k


@pytest.mark.parametrize("stage", [2, 3])
def test_kill_and_resume_is_bit_exact(stage, train_shards, tmp_path):
    common = [f"data.train={train_shards}", "data.num_workers=1", "optim.batch_size=4", f"optim.max_steps={STEPS}",
              "run.save_every=3", f"deepspeed.zero_stage={stage}", "log.tensorboard=false", "optim.base_lr=2e-3",
              "model.drop_path=0.1"]  # drop path draws from the torch RNG: it must be restored too
    full = train_cli(common + [f"run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, tail(full)

    crashed = torchrun(["tests.train.faults", "--crash-after", str(KILL_AFTER), "train", "--preset", "tiny",
                        *common, f"run.dir={tmp_path / 'split'}"])
    assert crashed.returncode != 0
    assert (tmp_path / "split" / "checkpoints" / tag_for(KILL_AFTER)).exists()
    assert not (tmp_path / "split" / "checkpoints" / tag_for(STEPS)).exists()
    resumed = train_cli(common + [f"run.dir={tmp_path / 'split'}"])
    assert resumed.returncode == 0, tail(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr

    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    assert_same_weights(weights(tmp_path / "split"), weights(tmp_path / "full"))

    if stage == 2:  # 64 flipped bytes (same size) in rank 1's optimizer state of the newest checkpoint:
        # the ranks' content check must refuse it and resume from the previous one
        split = tmp_path / "split"
        victim = split / "checkpoints" / tag_for(STEPS) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        raw = bytearray(victim.read_bytes())
        raw[2000:2064] = bytes(b ^ 0xFF for b in raw[2000:2064])
        victim.write_bytes(bytes(raw))
        again = train_cli(common + [f"run.dir={split}"])
        assert again.returncode == 0, tail(again)
        out = (again.stdout + again.stderr).replace("\n", "")
        assert "does not match its sha256" in out and f"resumed from {split / 'checkpoints' / tag_for(3)}" in out
        rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
        # each step once: 1..3 from before the damaged save, 4..6 replayed (step_00000003 holds 1..3)
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
        assert [r["loss"] for r in rows if "loss" in r] == losses(tmp_path / "full")
        assert_same_weights(weights(split), weights(tmp_path / "full"))


def test_incompatible_checkpoint_is_refused(finished_run, train_shards, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / "run")  # 2 steps of the tiny preset (model.depth=2)
    common = [f"data.train={train_shards}", *FINISHED_RECIPE, "optim.batch_size=4", f"run.dir={run}"]
    second = simscale_cli(["train", "--preset", "tiny", *common, "model.depth=3", "optim.max_steps=3"])
    assert second.returncode == 2, tail(second)
    assert "model.depth=2" in second.stderr and "Traceback" not in second.stderr
    # With the old checkpoints gone, the same command starts a fresh run.
    shutil.rmtree(run / "checkpoints")
    third = simscale_cli(["train", "--preset", "tiny", *common, "model.depth=3", "optim.max_steps=1"])
    assert third.returncode == 0, tail(third)


def test_a_resume_keeps_the_runs_data_partitions_and_its_global_data_position(finished_run, train_shards, tmp_path):
    """The data position is samples of the epoch's global order, counted in the partitions the run
    started with: a resume with another batch size continues from it; a resume that cannot keep
    those partitions is one line."""
    run = shutil.copytree(finished_run, tmp_path / "run")  # batch 4, 2 steps, a checkpoint each step
    common = [f"data.train={train_shards}", *FINISHED_RECIPE, f"run.dir={run}"]

    def position(step):
        meta = json.loads((run / "checkpoints" / tag_for(step) / "simscale_rank00000.json").read_text())
        return meta["loop"]["epoch"], meta["loop"]["samples_in_epoch"]

    assert "partitions: 4" in (run / "config.yaml").read_text()  # auto: the largest divisor of GM 4
    assert position(2) == (0, 8)
    # batch 8 alone would choose 8 partitions; the run keeps its 4 and goes on from sample 8
    second = simscale_cli(["train", "--preset", "tiny", *common, "optim.batch_size=8", "optim.max_steps=3"])
    assert second.returncode == 0, tail(second)
    assert "sample 8 of its global order" in second.stdout + second.stderr
    assert "data: 4 partitions of the epoch's sample order (4 per rank, 0 loader worker" in second.stdout + second.stderr
    assert position(3) == (0, 16) and "partitions: 4" in (run / "config.yaml").read_text()
    for over, said in (("data.partitions=8", "was written with data.partitions=4, this run asks for 8"),
                       ("optim.batch_size=2", "recorded data.partitions=4 does not divide the micro-step global "
                                              "batch 1 ranks x optim.batch_size=2 = 2")):
        refused = simscale_cli(["train", "--preset", "tiny", *common, over, "optim.max_steps=4"])
        assert refused.returncode == 2, tail(refused)
        assert said in refused.stderr and "Traceback" not in refused.stderr

"""The one resume fingerprint: model and loss keys must match; world and batch keys may change and are named."""
import pytest

from simscale.config import build_config, to_dict
from simscale.errors import CheckpointError
from simscale.train.resume import fingerprint_changes, global_batch_of, rank_seed


def cfg(*over):
    return to_dict(build_config("tiny", overrides=list(over)))


@pytest.mark.parametrize("key,value", [("model.depth", "3"), ("loss.lam", "0.05"), ("deepspeed.precision", "bf16"),
                                       ("deepspeed.zero_stage", "3"), ("data.same_view", "true")])
def test_a_model_or_loss_key_change_is_refused_in_one_line(key, value):
    with pytest.raises(CheckpointError) as err:
        fingerprint_changes(cfg(), cfg(f"{key}={value}"), 2, 2, "ckpt/step_00000003")
    msg = str(err.value)
    assert "\n" not in msg and f"{key}=" in msg and "step_00000003" in msg


def test_world_batch_accum_and_workers_may_change_and_are_named():
    saved = cfg("optim.batch_size=4", "optim.grad_accum=1", "data.num_workers=0")
    new = cfg("optim.batch_size=8", "optim.grad_accum=2", "data.num_workers=2")
    changes = fingerprint_changes(saved, new, 2, 1, "ck")
    assert changes == ["world size 2 -> 1", "optim.batch_size 4 -> 8", "optim.grad_accum 1 -> 2",
                       "data.num_workers 0 -> 2"]
    assert global_batch_of(saved, 2) == 8 and global_batch_of(new, 1) == 16
    assert fingerprint_changes(saved, saved, 2, 2, "ck") == []


def test_rank_seeds_differ_per_rank_and_step_and_repeat():
    seeds = {rank_seed(0, step, rank) for step in (3, 4) for rank in range(4)}
    assert len(seeds) == 8 and rank_seed(0, 3, 1) == rank_seed(0, 3, 1)

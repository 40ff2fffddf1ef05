"""Frozen parameters on a universal resume (`simscale.train.frozen`): the checkpoint's own set goes
back exactly (the EMA target excepted, its fp32 state restores it), anything else is one line.
Reading them out of real ZeRO-2/3 checkpoints across world sizes: tests/official/test_import_run.py
and tests/train/test_elastic_resume.py."""
import json
from pathlib import Path

import pytest
import torch

from simscale.errors import CheckpointError
from simscale.train import frozen
from simscale.train.universal import FORMAT, STATE, load_state


class Branchy(torch.nn.Module):
    """A frozen patch layer, a trained body, a frozen EMA target: SIM's kinds of parameter."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Linear(3, 4).requires_grad_(False)
        self.body = torch.nn.Linear(4, 4)
        self.target = torch.nn.Linear(4, 4).requires_grad_(False)


TARGET = frozen.ema_names(["weight", "bias"])


def saved_patch():
    g = torch.Generator().manual_seed(5)
    return {"patch.weight": torch.randn(4, 3, generator=g), "patch.bias": torch.randn(4, generator=g)}


def test_restore_puts_back_the_frozen_parameters_and_nothing_else():
    net = Branchy()
    body, target = net.body.weight.clone(), net.target.weight.clone()
    saved = saved_patch()
    assert not torch.equal(net.patch.weight, saved["patch.weight"])
    frozen.restore(net, saved, skip=TARGET, where=Path("u"))
    assert torch.equal(net.patch.weight, saved["patch.weight"]) and torch.equal(net.patch.bias, saved["patch.bias"])
    assert torch.equal(net.body.weight, body) and torch.equal(net.target.weight, target)


@pytest.mark.parametrize("change, words", [
    (lambda s: s.pop("patch.bias"), "lacks the frozen parameter 'patch.bias'"),
    (lambda s: s.update({"stem.weight": torch.zeros(2)}), "holds a frozen parameter 'stem.weight' the model does not"),
    (lambda s: s.update({"patch.weight": torch.zeros(4, 2)}), "holds 'patch.weight' with shape [4, 2], the model [4, 3]"),
])
def test_a_frozen_set_that_is_not_the_models_is_one_line_and_changes_nothing(change, words):
    net = Branchy()
    before = net.patch.weight.clone()
    saved = saved_patch()
    change(saved)
    with pytest.raises(CheckpointError, match="delete it to convert again") as err:
        frozen.restore(net, saved, skip=TARGET, where=Path("u"))
    assert words in str(err.value) and "\n" not in str(err.value)
    assert torch.equal(net.patch.weight, before)


def test_a_universal_folder_without_frozen_parameters_is_refused_in_one_line(tmp_path):
    (tmp_path / f"{STATE}.json").write_text(json.dumps({"format": "simscale-universal/1", "loop": {}}))
    with pytest.raises(CheckpointError, match=f"simscale-universal/1; this one reads {FORMAT}") as err:
        load_state(tmp_path)
    assert "resume from the step_* checkpoint it was converted from" in str(err.value)
    assert "\n" not in str(err.value)

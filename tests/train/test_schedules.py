"""Schedules are pure functions of the step (exact after resume) with the shapes METHOD.md gives."""
import math

import pytest

from simscale.config import build_config, resolve_lr
from simscale.train.schedules import Schedule


def schedule(**over):
    cfg = build_config("tiny", overrides=[f"{k}={v}" for k, v in over.items()])
    cfg, _ = resolve_lr(cfg, world_size=1)
    return Schedule.from_config(cfg, steps_per_epoch=10)


def test_total_and_warmup_follow_epochs():
    s = schedule(**{"optim.epochs": 3, "optim.warmup_epochs": 1})
    assert (s.total_steps, s.warmup_steps) == (30, 10)


def test_max_steps_overrides_epochs():
    s = schedule(**{"optim.max_steps": 7, "optim.warmup_steps": 2})
    assert (s.total_steps, s.warmup_steps) == (7, 2)


def test_lr_warms_up_linearly_then_cosines_to_min():
    s = schedule(**{"optim.max_steps": 100, "optim.warmup_steps": 10, "optim.min_lr": 1e-6})
    assert s.lr_at(0) == pytest.approx(s.lr / 10)
    assert s.lr_at(9) == pytest.approx(s.lr)
    assert s.lr_at(10) == pytest.approx(s.lr)
    assert s.lr_at(55) == pytest.approx(1e-6 + (s.lr - 1e-6) * 0.5)
    assert s.lr_at(100) == pytest.approx(1e-6)


def test_momentum_is_the_method_formula():
    s = schedule(**{"optim.max_steps": 50})
    for t in (0, 10, 25, 49, 50):
        assert s.momentum_at(t) == pytest.approx(1 - (1 - 0.995) * (1 + math.cos(math.pi * t / 50)) / 2)
    assert s.momentum_at(0) == pytest.approx(0.995) and s.momentum_at(50) == pytest.approx(1.0)


def test_weight_decay_cosine_between_ends():
    s = schedule(**{"optim.max_steps": 20, "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4})
    assert s.wd_at(0) == pytest.approx(0.04) and s.wd_at(20) == pytest.approx(0.4)
    assert s.wd_at(10) == pytest.approx(0.22)

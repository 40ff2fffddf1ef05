"""The fp32-master EMA on plain (unsharded) parameters: exact arithmetic and no bf16 stall."""
import torch

from simscale.train.ema import ShardedEMA, consolidate


def _pairs(dtype=torch.float32, n=3):
    torch.manual_seed(0)
    online = [torch.nn.Parameter(torch.randn(4, 5).to(dtype)) for _ in range(n)]
    target = [torch.nn.Parameter(torch.zeros(4, 5, dtype=dtype), requires_grad=False) for _ in range(n)]
    return [(f"p{i}", o, t) for i, (o, t) in enumerate(zip(online, target))]


def test_targets_start_as_exact_copies():
    pairs = _pairs()
    ShardedEMA(pairs)
    for _, o, t in pairs:
        assert torch.equal(o, t)


def test_update_matches_hand_computed_fp32_ema():
    pairs = _pairs()
    ema = ShardedEMA(pairs)
    expected = [o.detach().clone().double() for _, o, _ in pairs]
    for step, m in enumerate((0.9, 0.99, 0.5)):
        with torch.no_grad():
            for _, o, _ in pairs:
                o.add_(torch.randn_like(o))
        ema.update(m)
        for e, (_, o, t) in zip(expected, pairs):
            e.mul_(m).add_(o.double(), alpha=1 - m)
            assert torch.allclose(t.double(), e, atol=1e-6), step


def test_bf16_ema_would_stall_and_ours_does_not():
    # Online weights sit at 1.0 + delta; target at 1.0. At m = 0.9999 the per-step increment
    # (1e-4 * delta) is far below bf16 spacing at 1.0 (2^-7), so a bf16 EMA never moves.
    m, steps, delta = 0.9999, 2000, 0.5
    online = torch.nn.Parameter(torch.full((64,), 1.0 + delta, dtype=torch.bfloat16))
    target = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16), requires_grad=False)
    naive = target.detach().clone()
    for _ in range(steps):
        naive.mul_(m).add_(online.detach(), alpha=1 - m)
    true_value = 1.0 + delta * (1 - m**steps)
    assert torch.all(naive == 1.0), "bf16 EMA was expected to stall"

    ema = ShardedEMA([("w", online, target)])
    ema.master[0].fill_(1.0)  # same start as the naive one
    ema._write_targets()
    assert float(target[0]) == 1.0
    for _ in range(steps):
        ema.update(m)
    assert abs(float(ema.master[0][0]) - true_value) < 1e-4
    assert float(target[0]) != 1.0  # the compute copy moved too


def test_state_round_trip_and_consolidate():
    pairs = _pairs()
    ema = ShardedEMA(pairs)
    ema.update(0.7)
    state = ema.state_dict()
    full = consolidate([state])
    for name, _, t in pairs:
        assert torch.equal(full[name], t.detach())
    other = ShardedEMA(_pairs())
    other.load_state_dict(state)
    for a, b in zip(other.master, ema.master):
        assert torch.equal(a, b)


def test_consolidate_joins_zero3_partitions():
    full = torch.arange(10.0).view(2, 5)
    parts = [full.view(-1)[:5].clone(), torch.cat([full.view(-1)[5:], torch.zeros(0)])]
    # rank partitions of size 5 each (no padding needed), then a padded case of size 6
    states = [{"names": ["w"], "layout": "zero3_partition", "numel": [10], "shapes": [[2, 5]], "master": [p]}
              for p in parts]
    assert torch.equal(consolidate(states)["w"], full)
    padded = [full.view(-1)[:6].clone(), torch.cat([full.view(-1)[6:], torch.zeros(2)])]
    states = [{**s, "master": [p]} for s, p in zip(states, padded)]
    assert torch.equal(consolidate(states)["w"], full)


def test_load_full_restores_consolidated_targets_and_refuses_a_mismatch():
    import pytest

    from simscale.errors import CheckpointError

    pairs = _pairs()
    ema = ShardedEMA(pairs)
    ema.update(0.7)
    full = consolidate([ema.state_dict()])
    other = ShardedEMA(_pairs())  # a fresh run on another world: whole tensors under ZeRO-1/2
    other.load_full(full, rank=1)
    for a, b in zip(other.master, ema.master):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="same model"):
        other.load_full({**full, "p0": torch.zeros(3)}, rank=0)

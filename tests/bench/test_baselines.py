"""bench/baselines.py: the sanity baselines train every parameter they hand the optimizer (ZeRO-2
needs a gradient for each) and their losses mean what they claim."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simscale.config import build_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from baselines import MAE, SimCLR  # noqa: E402


def inputs(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)]
    geometry = torch.tensor([[0.1, -0.2, 1.2, 0.9, 1.0, 0.3]]).repeat(b, 1)
    mask = torch.zeros(b, 16, dtype=torch.bool)
    mask[:, :10] = True  # 10 of 16 hidden, as tiny's 0.6 ratio
    return (*views, geometry, mask)


@pytest.mark.parametrize("cls", [SimCLR, MAE])
def test_every_trained_parameter_gets_a_gradient(cls):
    torch.manual_seed(0)
    model = cls(build_config("tiny"))
    assert model.target is None and model.ema_pairs() == []
    loss, _ = model.loss(model(*inputs()))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert torch.isfinite(loss) and missing == []


def test_simclr_loss_is_nt_xent_over_the_two_views():
    torch.manual_seed(0)
    model = SimCLR(build_config("tiny"))
    z = F.normalize(torch.randn(6, 128), dim=-1)
    loss, _ = model.loss({"z": z})
    sim = z @ z.T / model.temperature
    expected = 0.0
    for i in range(6):  # positive: the other view of the same image (i +- 3)
        others = torch.cat([sim[i, :i], sim[i, i + 1:]])
        expected += -(sim[i, (i + 3) % 6] - torch.logsumexp(others, 0)) / 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mae_reconstructs_its_own_view():
    torch.manual_seed(0)
    model = MAE(build_config("tiny"))
    view_a, view_b, geometry, mask = inputs()
    out = model(view_a, view_b, geometry, mask)
    out_b = model(view_a, view_b * 0 + 5, geometry * 0 + 2, mask)  # view B and geometry are ignored
    assert torch.equal(out["target"], out_b["target"]) and torch.allclose(out["pred"], out_b["pred"])


def test_mae_loss_counts_only_the_masked_patches():
    torch.manual_seed(0)
    model = MAE(build_config("tiny"))
    view_a, view_b, geometry, mask = inputs()
    out = model(view_a, view_b, geometry, mask)
    loss, _ = model.loss(out)
    err = (out["pred"].float() - out["target"]).pow(2).mean(-1)
    assert loss.item() == pytest.approx(err[mask].mean().item(), rel=1e-6)
    # A perfect reconstruction of the visible patches alone changes nothing.
    pred = out["pred"].detach().clone()
    pred[~mask] = out["target"][~mask]
    assert model.loss({**out, "pred": pred})[0].item() == pytest.approx(loss.item(), rel=1e-6)

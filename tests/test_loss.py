"""UniGrad: float64 hand computation, gradients, fp32 under autocast, 2 gloo ranks == 1 rank."""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from simscale.config import LossConfig
from simscale.loss import unigrad_loss


def _hand_term(p, t, lam):
    """L = [mean ||p-t||^2 + lam mean p^T C p] / D with C = mean t t^T, float64, by loops."""
    m, d = p.shape
    c = sum(torch.outer(t[i], t[i]) for i in range(m)) / m
    align = sum(((p[i] - t[i]) ** 2).sum() for i in range(m)) / m
    uniform = sum(p[i] @ c @ p[i] for i in range(m)) / m
    return (align + lam * uniform) / d, c


def _hand_loss(pred, target, cfg):
    p, t = pred.double(), target.double()
    b, n, d = p.shape
    total = 0.0
    if cfg.a_global:
        total = total + cfg.a_global * _hand_term(p.mean(1), t.mean(1), cfg.lam)[0]
    if cfg.a_dense:
        if cfg.center_dense:
            p, t = p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
        total = total + cfg.a_dense * _hand_term(p.reshape(-1, d), t.reshape(-1, d), cfg.lam)[0]
    return total


VARIANTS = {
    "dense_release": LossConfig(),
    "global_plus_dense_paper": LossConfig(lam=0.05, a_global=0.7, a_dense=1.3, center_dense=True),
    "dense_centred_quickstart": LossConfig(center_dense=True),  # launchers/quickstart.sh's loss
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loss_and_gradient_equal_float64_hand_computation(name):
    cfg = VARIANTS[name]
    torch.manual_seed(0)
    pred = torch.randn(3, 5, 8, requires_grad=True)
    target = torch.randn(3, 5, 8)
    loss, stats = unigrad_loss(pred, target, cfg)
    loss.backward()
    pred64 = pred.detach().double().requires_grad_(True)
    want = _hand_loss(pred64, target, cfg)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    torch.testing.assert_close(pred.grad.double(), pred64.grad, atol=1e-6, rtol=1e-4)
    assert stats["loss"].requires_grad is False
    assert abs(stats["loss"].item() - loss.item()) < 1e-6


def test_dense_gradient_matches_closed_form():
    """Gradient per row: 2/(M D) [(p - t) + lam C p]."""
    torch.manual_seed(1)
    b, n, d, lam = 2, 6, 4, 0.02
    pred = torch.randn(b, n, d, dtype=torch.float64, requires_grad=True)
    target = torch.randn(b, n, d, dtype=torch.float64)
    loss, _ = unigrad_loss(pred, target, LossConfig(lam=lam))
    loss.backward()
    p, t = pred.detach().reshape(-1, d), target.reshape(-1, d)
    m = b * n
    c = t.T @ t / m
    want = 2 / (m * d) * ((p - t) + lam * p @ c)
    torch.testing.assert_close(pred.grad.reshape(-1, d), want, atol=1e-6, rtol=1e-4)


def test_target_gets_no_gradient_and_loss_is_float32_under_autocast():
    pred = torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = unigrad_loss(pred, target, VARIANTS["global_plus_dense_paper"])
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad is not None and target.grad is None


def test_zero_weights_are_refused():
    with pytest.raises(ValueError):
        unigrad_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 4), LossConfig(a_global=0, a_dense=0))


# --- 2 gloo ranks ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, *args, timeout: float = 60.0):
    ctx = mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world}-rank test did not finish in {timeout} s")


def _loss_worker(rank, world, port, pred, target, cfg, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        calls = []
        original = dist.all_reduce

        def counting(*a, **k):
            calls.append(1)
            return original(*a, **k)

        import simscale.loss as loss_mod

        loss_mod.dist.all_reduce = counting
        rows = pred.shape[0] // world
        p = pred[rank * rows : (rank + 1) * rows].clone().requires_grad_(True)
        loss, _ = unigrad_loss(p, target[rank * rows : (rank + 1) * rows], cfg)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": p.grad, "calls": len(calls)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_gloo_ranks_equal_one_rank_on_joined_batch(name, tmp_path):
    cfg = VARIANTS[name]
    torch.manual_seed(2)
    pred, target = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    run_ranks(_loss_worker, 2, pred, target, cfg, str(tmp_path))
    joined = pred.clone().requires_grad_(True)
    loss, _ = unigrad_loss(joined, target, cfg)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["calls"] == 1 for r in ranks)  # one all-reduce per step, both C's packed
    mean_loss = sum(r["loss"] for r in ranks) / 2  # data parallel averages the ranks
    torch.testing.assert_close(mean_loss, loss.detach(), atol=1e-6, rtol=1e-5)
    grad = torch.cat([r["grad"] for r in ranks]) / 2  # and their gradients
    torch.testing.assert_close(grad, joined.grad, atol=1e-7, rtol=1e-5)

"""Token BatchNorm synced across ranks: equals torch BatchNorm on the joined batch."""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from simscale.model.sync_batchnorm import SyncBatchNormFunction, TokenBatchNorm, merge_stats


def _reference(x, weight, bias, upstream):
    """torch BatchNorm1d semantics on [M, C] in float64: values and gradients."""
    x = x.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    b = bias.double().requires_grad_(True)
    y = F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    (y * upstream.double()).sum().backward()
    return y.detach(), x.grad, w.grad, b.grad


def test_function_without_sync_equals_batchnorm():
    torch.manual_seed(0)
    x, w, b, g = torch.randn(12, 6) * 3 + 1, torch.rand(6) + 0.5, torch.randn(6), torch.randn(12, 6)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    y, _, _ = SyncBatchNormFunction.apply(xr, wr, br, 1e-5, False)
    (y * g).sum().backward()
    ref = _reference(x, w, b, g)
    for got, want in zip((y, xr.grad, wr.grad, br.grad), ref):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_large_mean_input_keeps_its_variance():
    # |mean| >> std: E[x^2] - mean^2 in float32 cancels to noise; centred statistics do not.
    torch.manual_seed(0)
    x, w, b, g = torch.randn(600, 6) * 0.5 + 3000, torch.rand(6) + 0.5, torch.randn(6), torch.randn(600, 6)
    naive = (x * x).mean(0) - x.mean(0) ** 2
    true_var = x.double().var(0, unbiased=False)
    assert ((naive.double() - true_var).abs() / true_var).max() > 0.05  # the trap is real here
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    y, _, var = SyncBatchNormFunction.apply(xr, wr, br, 1e-5, False)
    (y * g).sum().backward()
    torch.testing.assert_close(var.double(), true_var, atol=0, rtol=1e-4)
    ref = _reference(x, w, b, g)
    for got, want in zip((y, xr.grad, wr.grad, br.grad), ref):
        torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=1e-3)


def test_chan_merge_of_rank_statistics_equals_the_joined_batch():
    torch.manual_seed(1)
    x = torch.randn(50, 4).double() * 0.1 + 1e4
    parts = [x[:7], x[7:30], x[30:]]  # unequal counts per "rank"
    stats = [torch.var_mean(p, dim=0, correction=0) for p in parts]
    mean, var = merge_stats(torch.stack([m for _, m in stats]), torch.stack([v for v, _ in stats]),
                            torch.tensor([[7.0], [23.0], [20.0]], dtype=torch.float64))
    torch.testing.assert_close(mean, x.mean(0), atol=0, rtol=1e-12)
    torch.testing.assert_close(var, x.var(0, unbiased=False), atol=0, rtol=1e-9)


def test_token_batchnorm_normalises_over_all_tokens_and_tracks_running_stats():
    torch.manual_seed(0)
    bn = TokenBatchNorm(4)
    x = torch.randn(3, 5, 4) * 2 + 3
    y = bn(x)
    flat = y.reshape(-1, 4)
    torch.testing.assert_close(flat.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    assert torch.all(bn.running_mean > 0.1)
    bn.eval()
    assert bn(x).shape == x.shape


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_worker(rank, world, port, x, w, b, g, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = x.shape[0] // world
        sl = slice(rank * rows, (rank + 1) * rows)
        bn = TokenBatchNorm(x.shape[-1])
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        xr = x[sl].clone().requires_grad_(True)
        y = bn(xr.reshape(rows // 3, 3, -1))  # [B, L, C] tokens
        (y.reshape(rows, -1) * g[sl]).sum().backward()
        result = {"y": y.detach().reshape(rows, -1), "dx": xr.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad.clone(),
                  "running_mean": bn.running_mean.clone()}
        xl = (x[sl] * 0.25 + 1000).requires_grad_(True)  # large mean: the statistics must not cancel
        yl = bn(xl.reshape(rows // 3, 3, -1))
        (yl.reshape(rows, -1) * g[sl]).sum().backward()
        result.update(y_large=yl.detach().reshape(rows, -1), dx_large=xl.grad)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_batchnorm_on_joined_batch(tmp_path):
    torch.manual_seed(3)
    x, w, b, g = torch.randn(12, 5) * 2 - 1, torch.rand(5) + 0.5, torch.randn(5), torch.randn(12, 5)
    x[:6] += 4.0  # ranks see different distributions: only global statistics give the reference
    ctx = mp.spawn(_bn_worker, args=(2, _free_port(), x, w, b, g, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError("2-rank SyncBN test hung")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    y, dx, dw, db = _reference(x, w, b, g)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]).double(), y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]).double(), dx, atol=1e-5, rtol=1e-4)
    # parameter gradients are per-rank sums; the engine's reduction adds them up
    torch.testing.assert_close((ranks[0]["dw"] + ranks[1]["dw"]).double(), dw, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close((ranks[0]["db"] + ranks[1]["db"]).double(), db, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ranks[0]["running_mean"], ranks[1]["running_mean"])
    torch.testing.assert_close(ranks[0]["running_mean"], 0.1 * x.mean(0), atol=1e-5, rtol=1e-4)
    y, dx, _, _ = _reference(x * 0.25 + 1000, w, b, g)
    torch.testing.assert_close(torch.cat([r["y_large"] for r in ranks]).double(), y, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(torch.cat([r["dx_large"] for r in ranks]).double(), dx, atol=2e-2, rtol=1e-2)

"""BatchNorm over all tokens, synchronised across ranks, on any backend (gloo on CPU, NCCL).

torch's SyncBatchNorm refuses CPU tensors, so this is a small autograd Function with torch's
own fused kernels on CUDA (`batch_norm_stats`, `batch_norm_gather_stats_with_counts`,
`batch_norm_elemt`, `batch_norm_backward_reduce/_elemt`, as nn.SyncBatchNorm) and the same
arithmetic in plain ops elsewhere. Either way the statistics are numerically safe: each rank
computes its own mean and centred variance (Welford / `var_mean`), and ranks are merged with
Chan's formula, never E[x^2] - mean^2 (which cancels to noise when |mean| >> std). One
collective per layer per direction (all-gather of [mean, var or invstd, count] forward,
all-reduce of [sum dy, sum dy*xhat] backward) on a process group of its own under NCCL, so it
does not queue behind ZeRO's bucketed gradient reductions on the default group (gloo: the default group). Statistics and gradients
are float32 whatever the input dtype. With no process group (or world size 1) the module is
plain `F.batch_norm`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

_GROUP: dict[str, object] = {}  # the default group it was made for, and the group


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def bn_group():
    """The statistics' own process group on NCCL: every rank, created once (lazily, on the first
    synced forward, which every rank reaches in the same order), so BatchNorm's collectives get
    their own communicator instead of queueing behind ZeRO's bucketed reductions. gloo (CPU) runs
    every collective synchronously in call order, so a second group buys nothing there, and a
    cached gloo group outliving `destroy_process_group` aborts the process at exit: the default
    group is used."""
    if dist.get_backend() != "nccl":
        return None
    world = dist.group.WORLD
    if _GROUP.get("world") is not world:  # first use, or the default group was re-initialised
        _GROUP.update(world=world, group=dist.new_group(backend=dist.get_backend()))
    return _GROUP["group"]


def _all_gather_rows(packed: Tensor, sync: bool) -> Tensor:
    """[K] on every rank -> [world, K] (one collective); [1, K] without sync."""
    if not sync:
        return packed.view(1, -1)
    group = bn_group()
    out = torch.empty(dist.get_world_size(group) * packed.numel(), dtype=packed.dtype, device=packed.device)
    dist.all_gather_into_tensor(out, packed, group=group)
    return out.view(dist.get_world_size(group), -1)


def merge_stats(mean_all: Tensor, var_all: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Chan et al.'s parallel merge of per-rank (mean, biased var, count) rows [R, C] -> (mean,
    biased var) [C]: var = sum n_r (var_r + (mean_r - mean)^2) / N, no cancellation."""
    n = counts.view(-1, 1)
    total = n.sum()
    mean = (n * mean_all).sum(0) / total
    var = (n * (var_all + (mean_all - mean) ** 2)).sum(0) / total
    return mean, var


class SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with global batch statistics.

    x: [M, C] (rows of this rank). Returns (y, mean, biased var); mean/var carry no gradient.
    Parameter gradients are this rank's sums (the data-parallel engine averages them, exactly as
    for every other parameter); the input gradient is that of the sum of all ranks' losses.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, sync: bool):
        x = x.contiguous()
        c = x.shape[1]
        if x.is_cuda:  # torch's fused kernels (Welford per rank, Chan merge across ranks)
            mean, invstd = torch.batch_norm_stats(x, eps)
            count = torch.full((1,), x.shape[0], dtype=mean.dtype, device=x.device)
            rows = _all_gather_rows(torch.cat([mean, invstd, count]), sync)
            mean_all, invstd_all, count_all = rows.split([c, c, 1], dim=1)
            mean, invstd = torch.batch_norm_gather_stats_with_counts(
                x, mean_all, invstd_all, None, None, 0.0, eps, count_all.view(-1))
            var = (invstd.reciprocal() ** 2 - eps).clamp_min(0.0)
            w = weight.float()
            y = torch.batch_norm_elemt(x, w, bias.float(), mean, invstd, eps)
            ctx.save_for_backward(x, weight, mean, invstd, count_all.view(-1).to(torch.int32))
            ctx.fused = True
        else:
            xf = x.float()
            var, mean = torch.var_mean(xf, dim=0, correction=0)  # one pass, centred: no cancellation
            count = torch.full((1,), x.shape[0], dtype=torch.float32, device=x.device)
            rows = _all_gather_rows(torch.cat([mean, var, count]), sync)
            mean_all, var_all, count_all = rows.split([c, c, 1], dim=1)
            mean, var = merge_stats(mean_all, var_all, count_all)
            invstd = torch.rsqrt(var + eps)
            xhat = (xf - mean).mul_(invstd)
            y = torch.addcmul(bias.float(), xhat, weight.float())
            ctx.save_for_backward(xhat, weight, invstd, count_all.sum())
            ctx.fused = False
        ctx.sync = sync
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        dy = dy.contiguous()
        if ctx.fused:
            x, weight, mean, invstd, counts = ctx.saved_tensors
            w = weight.float()
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
                dy, x, mean, invstd, w, True, True, True)
            packed = torch.cat([sum_dy, sum_dy_xmu])
            if ctx.sync:
                dist.all_reduce(packed, group=bn_group())
            sum_dy, sum_dy_xmu = packed.split(sum_dy.shape[0])
            dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, counts)
        else:
            xhat, weight, invstd, total = ctx.saved_tensors
            dyf = dy.float()
            grad_bias = dyf.sum(0)
            grad_weight = (dyf * xhat).sum(0)
            packed = torch.cat([grad_bias, grad_weight])
            if ctx.sync:
                dist.all_reduce(packed, group=bn_group())
            c = xhat.shape[1]
            mean_dy = packed[:c] / total
            mean_dy_xhat = packed[c:] / total
            dx = (dyf - mean_dy - xhat * mean_dy_xhat) * (invstd * weight.float())
        return dx.to(dy.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None, None


class TokenBatchNorm(nn.Module):
    """BatchNorm over every token of [..., C] (all leading dims joined), synced across ranks.

    A drop-in `norm_layer` for timm's Block. Parameter/buffer names follow nn.BatchNorm1d.
    Training: global batch statistics (running statistics updated from them); eval: running ones.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features, **dd))
        self.bias = nn.Parameter(torch.zeros(num_features, **dd))
        self.register_buffer("running_mean", torch.zeros(num_features, **dd))
        self.register_buffer("running_var", torch.ones(num_features, **dd))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # bf16 under ZeRO-1/2 leaves the running statistics float32 next to bf16 weights, a mix
        # F.batch_norm refuses: then float32 math, as the synced path does.
        same = x2.dtype == self.weight.dtype == self.running_mean.dtype
        if not self.training:
            args = (self.running_mean, self.running_var, self.weight, self.bias)
            y = F.batch_norm(x2 if same else x2.float(), *(a if same else a.float() for a in args), False, 0.0, self.eps)
            return y.to(x.dtype).reshape(shape)
        if _world_size() == 1 and same:
            y = F.batch_norm(x2, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps)
            self.num_batches_tracked.add_(1)
            return y.reshape(shape)
        y, mean, var = SyncBatchNormFunction.apply(x2, self.weight, self.bias, self.eps, _world_size() > 1)
        with torch.no_grad():
            n = x2.shape[0] * _world_size()
            unbiased = var * (n / max(n - 1, 1))
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, synced"

"""BatchNorm over all tokens, synchronised across ranks, on any backend (gloo on CPU, NCCL).

torch's SyncBatchNorm refuses CPU tensors, so this is a small autograd Function: forward
all-reduces (sum, sum of squares, count) once, backward all-reduces (sum dy, sum dy*xhat) once.
Statistics and gradients are computed in float32 whatever the input dtype. With no process group
(or world size 1) the module is plain `F.batch_norm` when input, weights and statistics share a dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with global batch statistics.

    x: [M, C] (rows of this rank). Returns (y, mean, biased var); mean/var carry no gradient.
    Parameter gradients are this rank's sums (the data-parallel engine averages them, exactly as
    for every other parameter); the input gradient is that of the sum of all ranks' losses.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, sync: bool):
        xf = x.float()
        count = torch.full((1,), xf.shape[0], dtype=torch.float32, device=x.device)
        packed = torch.cat([xf.sum(0), (xf * xf).sum(0), count])
        if sync:
            dist.all_reduce(packed)
        c = xf.shape[1]
        total = packed[-1]
        mean = packed[:c] / total
        var = (packed[c : 2 * c] / total - mean * mean).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        xhat = (xf - mean) * invstd
        y = xhat * weight.float() + bias.float()
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.total = total
        ctx.sync = sync
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        xhat, invstd, weight = ctx.saved_tensors
        dyf = dy.float()
        grad_bias = dyf.sum(0)
        grad_weight = (dyf * xhat).sum(0)
        packed = torch.cat([grad_bias, grad_weight])
        if ctx.sync:
            dist.all_reduce(packed)
        c = xhat.shape[1]
        mean_dy = packed[:c] / ctx.total
        mean_dy_xhat = packed[c:] / ctx.total
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

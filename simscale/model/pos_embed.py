"""Fixed sin-cos position embeddings: absolute (2D grid) and SIM's relative position + scale.

Both are plain functions computed in float32 with elementwise ops only (no matmul), so autocast
never lowers their precision. The frequencies and the absolute table are computed in numpy
float64 and only then made float32 tensors: `deepspeed.zero.Init` with bf16 patches torch's
constructors (torch.arange, torch.zeros, ...) to return bf16 even when float32 is asked for, and a
table built from them under ZeRO-3 would differ from the one `simscale export` rebuilds. Layout for a width-d 2D embedding: K = d/4 frequencies
w_k = 10000^(-k/K), k = 0..K-1, and [sin(r w), cos(r w), sin(c w), cos(c w)] (row half first),
patches in row-major order.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _frequencies_f64(num: int) -> np.ndarray:
    """w_k = 10000^(-k/K) for k = 0..K-1, float64 (numpy: untouched by DeepSpeed's patching)."""
    return np.exp(np.arange(num, dtype=np.float64) * (-np.log(10000.0) / num))


def _frequencies(num: int, device=None) -> Tensor:
    """w_k as a float32 tensor (`.to` is not patched by zero.Init; the constructors are)."""
    return torch.from_numpy(_frequencies_f64(num)).to(device=device, dtype=torch.float32)


def _axis_embed(pos: Tensor, omega: Tensor) -> Tensor:
    """[..] positions -> [.., 2K] = [sin(pos w), cos(pos w)] (float32)."""
    angles = pos.float().unsqueeze(-1) * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def _check_dim(dim: int) -> int:
    if dim % 4:
        raise ValueError(f"sin-cos 2D position embedding needs a width divisible by 4, got {dim}")
    return dim // 4


def abs_pos_embed_2d(grid: int, dim: int, device=None) -> Tensor:
    """Absolute 2D sin-cos embedding of a grid x grid patch grid: [grid*grid, dim] float32
    (computed in float64, rounded once)."""
    omega = _frequencies_f64(_check_dim(dim))
    idx = np.arange(grid * grid)
    parts = []
    for pos in (idx // grid, idx % grid):
        angles = pos[:, None].astype(np.float64) * omega
        parts += [np.sin(angles), np.cos(angles)]
    return torch.from_numpy(np.concatenate(parts, axis=-1)).to(device=device, dtype=torch.float32)


def view_b_positions(geometry: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Centres of view-B patches in view-A patch units: (y, x), each [B, grid*grid] float32.

    geometry [B, 6] = (di, dj, dh, dw, rflip, fdj) as METHOD.md defines them.
    """
    g = geometry.float()
    di, dj, dh, dw, rflip, fdj = (g[:, i : i + 1] for i in range(6))
    idx = torch.arange(grid * grid, device=g.device)
    r = (idx // grid).float().unsqueeze(0) + 0.5
    c = (idx % grid).float().unsqueeze(0) + 0.5
    y = grid * di + dh * r - 0.5
    x_keep = grid * dj + dw * c - 0.5
    x_flip = grid * fdj - dw * c - 0.5
    x = torch.where(rflip > 0.5, x_flip, x_keep)
    return y, x


def relative_pos_embed(geometry: Tensor, dim: int, grid: int) -> Tensor:
    """SIM's relative position + scale embedding of the view-B queries: [B, grid*grid, 2*dim].

    Blocks of dim/4 each: [sin(y w), cos(y w), sin(x w), cos(x w), sin(sh w), cos(sh w),
    sin(sw w), cos(sw w)] with sh = 10 ln dh, sw = 10 ln dw and the same K = dim/4 frequencies
    as `abs_pos_embed_2d(grid, dim)`. No gradient flows through it (geometry is data).
    """
    with torch.no_grad():
        omega = _frequencies(_check_dim(dim), geometry.device)
        y, x = view_b_positions(geometry, grid)
        g = geometry.float()
        sh = (10.0 * torch.log(g[:, 2:3])).expand_as(y)
        sw = (10.0 * torch.log(g[:, 3:4])).expand_as(y)
        return torch.cat(
            [_axis_embed(y, omega), _axis_embed(x, omega), _axis_embed(sh, omega), _axis_embed(sw, omega)],
            dim=-1,
        )

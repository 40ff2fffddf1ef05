"""The photometric half of the views, drawn on CPU workers and applied batched on the device.

Workers draw each sample's parameters (cheap, reproducible from the sample's seed); the device
applies them to a whole uint8 batch with vectorised torch ops. PIL's per-image colour ops were
about 2/3 of an official-style loader's time, so this moves the heavy part off the CPUs.

Recipe (METHOD.md): colour jitter (brightness .4, contrast .4, saturation .2, hue .1, the four
in a random order as torchvision does) p=.8, grayscale p=.2 on both views; view A: Gaussian
blur sigma~U(.1, 2) p=1; view B: blur p=.1, solarize (>= 128) p=.2; ImageNet normalisation.
All ops work on float images in [0, 1] with torchvision's tensor formulas, so a per-image
`torchvision.transforms.functional` reference with the same parameters gives the same result.
The blur kernel is odd, about 10% of the image side (23 at 224 px), with reflect padding.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Parameter layout of one view, float32 [K].
JITTER, BRIGHT, CONTRAST, SAT, HUE, ORDER, GRAY, BLUR, SIGMA, SOLAR = 0, 1, 2, 3, 4, 5, 9, 10, 11, 12
K = 13
RECIPE = {  # probabilities per view
    "a": {"jitter": 0.8, "gray": 0.2, "blur": 1.0, "solarize": 0.0},
    "b": {"jitter": 0.8, "gray": 0.2, "blur": 0.1, "solarize": 0.2},
}
STRENGTH = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
SIGMA_RANGE = (0.1, 2.0)  # pixels at the recipe's 224 px (METHOD.md)
RECIPE_SIZE = 224


def sigma_range_for(img_size: int, sigma_at_224: tuple[float, float] = SIGMA_RANGE) -> tuple[float, float]:
    """The blur's sigma range in pixels of an `img_size` view: the recipe's range is specified for
    224 px views, so it scales with the view (at 32 px, sigma 2 px would wipe out a 4 px patch
    detail that the 224 px recipe only softens). Unchanged at 224."""
    f = img_size / RECIPE_SIZE
    return (sigma_at_224[0] * f, sigma_at_224[1] * f)


def draw_params(rng: np.random.Generator, view: str, color_aug: bool = True,
                sigma_range: tuple[float, float] = SIGMA_RANGE, solarize: float | None = None,
                jitter: tuple[float, float, float, float] | None = None, gray: float | None = None) -> np.ndarray:
    """One view's parameters. Every value is always drawn, so the RNG use is fixed (a zero
    strength draws a factor of exactly 1, or a hue shift of 0). `solarize`, `gray`: this view's
    solarize / grayscale probability instead of the recipe's; `jitter`: (brightness, contrast,
    saturation, hue) strengths instead of the recipe's STRENGTH."""
    p = RECIPE[view]
    out = np.zeros(K, dtype=np.float32)
    u = rng.random(4)  # jitter, gray, blur, solarize coin flips
    bright, contrast, sat, hue = STRENGTH.values() if jitter is None else jitter
    out[BRIGHT] = rng.uniform(max(0.0, 1 - bright), 1 + bright)
    out[CONTRAST] = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
    out[SAT] = rng.uniform(max(0.0, 1 - sat), 1 + sat)
    out[HUE] = rng.uniform(-hue, hue)
    out[ORDER:ORDER + 4] = rng.permutation(4)
    out[SIGMA] = rng.uniform(*sigma_range)
    if color_aug:
        out[JITTER] = u[0] < p["jitter"]
        out[GRAY] = u[1] < (p["gray"] if gray is None else gray)
        out[BLUR] = u[2] < p["blur"]
        out[SOLAR] = u[3] < (p["solarize"] if solarize is None else solarize)
    return out


# ---------------------------------------------------------------------------------------------
# Batched ops on float [n, 3, H, W] in [0, 1], in place where possible; factors are [n].
# Few full-tensor passes matter: on a CPU these ops are memory-bound.

def _gray(x: torch.Tensor) -> torch.Tensor:  # ITU-R 601-2 luma, as PIL's "L" and torchvision
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _per_image(f, dims: int = 4):
    """A factor as a python float (one image, no tiny-tensor overhead) or a broadcastable [n]."""
    return f if isinstance(f, float) else f.view(-1, *([1] * (dims - 1)))


def _brightness(x, f):  # blend with black
    return x.mul_(_per_image(f)).clamp_(0, 1)


def _contrast(x, f):  # blend with the mean grey level
    f = _per_image(f)
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return x.mul_(f).add_((1 - f) * m).clamp_(0, 1)


def _saturation(x, f):  # blend with the grey image
    f = _per_image(f)
    g = _gray(x).mul_(1 - f)  # before x changes in place
    return x.mul_(f).add_(g).clamp_(0, 1)


def _hue(x, f):
    """Rotate the hue by f turns through HSV. Works in sixths of a turn: with c = max - min,
    channel n of the result is v - c * clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6, so
    saturation never needs to be formed and grey pixels (c = 0) come back unchanged.
    Masks are multiplied in rather than selected with torch.where (10x slower on CPU)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    inv = c.clamp_min(1e-12).reciprocal_()  # c = 0 -> numerators are 0 too
    is_r = (v == r).to(x.dtype)
    is_g = (v == g).to(x.dtype).mul_(1 - is_r)
    is_b = 1 - is_r - is_g
    hue6 = (g - b).mul_(inv).mul_(is_r)
    hue6.add_((b - r).mul_(inv).add_(2).mul_(is_g)).add_((r - g).mul_(inv).add_(4).mul_(is_b))
    hue6.add_(6 * _per_image(f, 3))
    out = torch.empty_like(x)
    for ch, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(hue6 + n, 6.0)
        torch.minimum(k, 4 - k, out=k)
        out[:, ch] = torch.addcmul(v, c, k.clamp_(0, 1), value=-1)
    return out


def blur_kernel_size(side: int) -> int:
    return max(3, int(0.1 * side) | 1)


def _gauss_weights(sigma, k: int, x: torch.Tensor):
    if isinstance(sigma, float):  # one image: python floats for add_(alpha=...)
        w = [math.exp(-0.5 * ((i - (k - 1) / 2) / sigma) ** 2) for i in range(k)]
        total = math.fsum(w)
        return [v / total for v in w]
    t = torch.arange(k, dtype=torch.float64, device=x.device) - (k - 1) / 2  # made on the device: no copy
    w = torch.exp(-0.5 * (t.view(1, -1) / sigma.double().view(-1, 1)) ** 2)
    return (w / w.sum(dim=1, keepdim=True)).to(x.dtype)  # [n, k]


def _blur(x: torch.Tensor, sigma, top: float | None = None) -> torch.Tensor:
    """Separable Gaussian, reflect padding, as a sum of shifted slices per axis (faster than a
    grouped conv on CPU, and per-image sigmas come free). Taps beyond 5 sigma (mass < 1e-6)
    are left out: the result equals the full blur_kernel_size() kernel within 1e-6.
    `top`: the largest sigma, from the host parameters (reading it off a device tensor syncs)."""
    n, c, hgt, wid = x.shape
    if top is None:
        top = float(sigma) if isinstance(sigma, float) else float(sigma.max())
    k = min(blur_kernel_size(min(hgt, wid)), 2 * math.ceil(5 * top) + 1)
    w = _gauss_weights(sigma, k, x)
    pad = k // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = torch.zeros(n, c, hgt + 2 * pad, wid, device=x.device, dtype=x.dtype)
    out = torch.zeros_like(x)
    for i in range(k):
        if isinstance(w, list):
            rows.add_(y[..., i:i + wid], alpha=w[i])
        else:
            rows.addcmul_(y[..., i:i + wid], w[:, i].view(-1, 1, 1, 1))
    for i in range(k):
        if isinstance(w, list):
            out.add_(rows[:, :, i:i + hgt], alpha=w[i])
        else:
            out.addcmul_(rows[:, :, i:i + hgt], w[:, i].view(-1, 1, 1, 1))
    return out


def _solarize(x):  # invert pixels >= 128/255: x + [x >= t] * (1 - 2x)
    return torch.addcmul(x, (x >= 128 / 255).to(x.dtype), 1 - 2 * x)


def _grayscale(x):
    return _gray(x).expand(-1, 3, -1, -1).contiguous()


_JITTER_OPS = ((_brightness, BRIGHT), (_contrast, CONTRAST), (_saturation, SAT), (_hue, HUE))


def _plan(rows: list[list[float]]) -> list[tuple]:
    """Host side: (fn, parameter columns, images it applies to) per op, in application order.
    Every decision comes from the host copy of the parameters, so the device never waits."""
    on = [r[JITTER] > 0.5 for r in rows]
    steps = []
    for slot in range(4):  # the t-th op of each image is op order[t]
        for op, (fn, col) in enumerate(_JITTER_OPS):
            steps.append((fn, (col,), [i for i, r in enumerate(rows) if on[i] and round(r[ORDER + slot]) == op]))
    steps.append((_grayscale, (), [i for i, r in enumerate(rows) if r[GRAY] > 0.5]))
    blurred = [i for i, r in enumerate(rows) if r[BLUR] > 0.5]
    top = max((rows[i][SIGMA] for i in blurred), default=0.0)
    steps.append((lambda x, sigma: _blur(x, sigma, top), (SIGMA,), blurred))
    steps.append((_solarize, (), [i for i, r in enumerate(rows) if r[SOLAR] > 0.5]))
    return steps


def _apply_chunk(x: torch.Tensor, p: torch.Tensor, rows: list[list[float]]) -> torch.Tensor:
    """x [n, 3, H, W] on the device, p [n, K] its parameters there, rows the same on the host.
    An op on every image runs on the whole tensor; on some, on an index_select/index_copy of
    them, with all subsets' indices moved to the device in one non-blocking copy."""
    n = len(rows)
    steps = [st for st in _plan(rows) if st[2]]
    subsets = [idx for _, _, idx in steps if len(idx) < n]
    flat = torch.tensor([i for idx in subsets for i in idx], dtype=torch.long)
    if x.device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(x.device, non_blocking=True)
    start = 0
    for fn, cols, idx in steps:
        args = [p[:, c] for c in cols]
        if len(idx) == n:  # the common case with small chunks: no gather/scatter copies
            x = fn(x, *args)
            continue
        ids = flat[start:start + len(idx)]
        start += len(idx)
        x.index_copy_(0, ids, fn(x.index_select(0, ids), *(a.index_select(0, ids) for a in args)))
    return x


def _apply_one(x: torch.Tensor, p: list[float]) -> torch.Tensor:
    """The same ops for one image with its parameters as python floats (the CPU path)."""
    if p[JITTER] > 0.5:
        for op in p[ORDER:ORDER + 4]:
            fn, col = _JITTER_OPS[int(round(op))]
            x = fn(x, p[col])
    if p[GRAY] > 0.5:
        x = _grayscale(x)
    if p[BLUR] > 0.5:
        x = _blur(x, p[SIGMA])
    if p[SOLAR] > 0.5:
        x = _solarize(x)
    return x


def apply_photometric(images: torch.Tensor, params: torch.Tensor, view: str = "a",
                      normalize: bool = True, chunk: int | None = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] + params [B, K] -> float32 [B, 3, H, W] (normalised by default).

    The view's probabilities are already in the drawn flags; `view` is checked, not used.
    `chunk`: images processed together; default the whole batch on an accelerator and 1 on a
    CPU, where one 224 px image stays in cache through all ops (about 3x faster there).
    `params` should be the host (CPU) tensor: every decision (which op runs on which images, the
    blur kernel size) is read from it, and the device never waits; they go to the device once,
    non-blocking. Device `params` work too, at the price of one device->host copy.
    """
    if view not in RECIPE:
        raise ValueError(f"view must be 'a' or 'b', got {view!r}")
    if chunk is None:
        chunk = 1 if images.device.type == "cpu" else images.shape[0]
    # Decisions read the host copy (the DataLoader's tensor: no sync); a device tensor costs one.
    rows = params.tolist()
    p = params.to(device=images.device, dtype=torch.float32, non_blocking=True)
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    mean, inv_std = _norm_constants(images.device)
    for s in range(0, images.shape[0], max(1, chunk)):
        x = images[s:s + chunk].float().div_(255.0)
        x = _apply_one(x, rows[s]) if chunk == 1 else _apply_chunk(x, p[s:s + chunk], rows[s:s + chunk])
        if normalize:
            x = x.sub_(mean).mul_(inv_std)
        out[s:s + chunk] = x
    return out


@functools.lru_cache(maxsize=8)
def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and 1/std on `device`, made once (a fresh host->device copy would sync)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    return mean.to(device), (1 / torch.tensor(STD).view(1, 3, 1, 1)).to(device)

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
SIGMA_RANGE = (0.1, 2.0)


def draw_params(rng: np.random.Generator, view: str, color_aug: bool = True) -> np.ndarray:
    """One view's parameters. Every value is always drawn, so the RNG use is fixed."""
    p = RECIPE[view]
    out = np.zeros(K, dtype=np.float32)
    u = rng.random(4)  # jitter, gray, blur, solarize coin flips
    s = STRENGTH
    out[BRIGHT] = rng.uniform(max(0.0, 1 - s["brightness"]), 1 + s["brightness"])
    out[CONTRAST] = rng.uniform(max(0.0, 1 - s["contrast"]), 1 + s["contrast"])
    out[SAT] = rng.uniform(max(0.0, 1 - s["saturation"]), 1 + s["saturation"])
    out[HUE] = rng.uniform(-s["hue"], s["hue"])
    out[ORDER:ORDER + 4] = rng.permutation(4)
    out[SIGMA] = rng.uniform(*SIGMA_RANGE)
    if color_aug:
        out[JITTER] = u[0] < p["jitter"]
        out[GRAY] = u[1] < p["gray"]
        out[BLUR] = u[2] < p["blur"]
        out[SOLAR] = u[3] < p["solarize"]
    return out


# ---------------------------------------------------------------------------------------------
# Batched ops on float [n, 3, H, W] in [0, 1]; factors are [n].

def _gray(x: torch.Tensor) -> torch.Tensor:  # ITU-R 601-2 luma, as PIL's "L" and torchvision
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def _brightness(x, f):
    return _blend(x, torch.zeros_like(x), f)


def _contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x, f):
    return _blend(x, _gray(x), f)


def _hue(x, f):
    """Rotate the hue by f (in turns): RGB -> HSV, shift, HSV -> RGB."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v, _ = x.max(dim=1)
    c = v - x.min(dim=1).values
    s = torch.where(v > 0, c / v.clamp_min(1e-12), torch.zeros_like(v))
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, ((g - b) / safe_c) % 6,
                    torch.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    h = (h + f.view(-1, 1, 1)) % 1.0
    # HSV -> RGB: channel n gets v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6 * h.unsqueeze(1)) % 6
    return (v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)).clamp(0, 1)


def blur_kernel_size(side: int) -> int:
    return max(3, int(0.1 * side) | 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    n, c, hgt, wid = x.shape
    k = blur_kernel_size(min(hgt, wid))
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    w = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    w = (w / w.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n*c, k]
    y = F.pad(x.reshape(1, n * c, hgt, wid), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, w.view(n * c, 1, 1, k), groups=n * c)  # separable: rows, then columns
    y = F.conv2d(y, w.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


_JITTER_OPS = ((_brightness, BRIGHT), (_contrast, CONTRAST), (_saturation, SAT), (_hue, HUE))


def _apply_subset(x, sel, fn, *args):
    idx = sel.nonzero().squeeze(1)
    if idx.numel():
        x[idx] = fn(x[idx], *(a[idx] for a in args))
    return x


def apply_photometric(images: torch.Tensor, params: torch.Tensor, view: str = "a",
                      normalize: bool = True) -> torch.Tensor:
    """uint8 [B, 3, H, W] + params [B, K] -> float32 [B, 3, H, W] (normalised by default).

    The view's probabilities are already in the drawn flags; `view` is checked, not used.
    """
    if view not in RECIPE:
        raise ValueError(f"view must be 'a' or 'b', got {view!r}")
    x = images.float().div_(255.0)
    p = params.to(device=x.device, dtype=torch.float32)
    on = p[:, JITTER] > 0.5
    if bool(on.any()):
        order = p[:, ORDER:ORDER + 4].round().long()
        for slot in range(4):  # the t-th op of each image is op order[t]
            for op, (fn, col) in enumerate(_JITTER_OPS):
                x = _apply_subset(x, on & (order[:, slot] == op), fn, p[:, col])
    gray = p[:, GRAY] > 0.5
    x = _apply_subset(x, gray, lambda y: _gray(y).expand(-1, 3, -1, -1))
    x = _apply_subset(x, p[:, BLUR] > 0.5, _blur, p[:, SIGMA])
    x = _apply_subset(x, p[:, SOLAR] > 0.5, lambda y: torch.where(y >= 128 / 255, 1 - y, y))
    if normalize:
        mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x

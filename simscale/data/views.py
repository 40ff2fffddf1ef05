"""Two random views of one image and the geometry that relates them (METHOD.md "Views").

Each view: horizontal flip p=0.5 of the whole image, then a random-resized-crop box drawn with
torchvision's sampler semantics (10 tries, then the centre-crop fallback), bicubic resize to
`size`. Boxes (i, j, h, w) live in the flipped-or-not image of the original width W. The crop
of a flipped image equals the mirrored box of the original, flipped: that is what we decode,
so the full image is never flipped. The resize runs in torch on the uint8 image (its AVX2
antialiased bicubic kernel is 4-8x faster than PIL's and agrees with it to ~0.01 grey levels
on average). JPEG draft mode (DCT downscale by 2/4/8) is used only when
both boxes still cover >= `size` pixels after it, so no view is ever upsampled because of it.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Box = tuple[int, int, int, int]  # (i top, j left, h, w)


def sample_box(rng: np.random.Generator, height: int, width: int,
               scale: tuple[float, float], ratio: tuple[float, float]) -> Box:
    """torchvision RandomResizedCrop.get_params semantics, drawn from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height  # fallback: the largest centred box within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def relative_geometry(box_a: Box, flip_a: bool, box_b: Box, flip_b: bool, width: int) -> np.ndarray:
    """float32 [6] = (di, dj, dh, dw, rflip, fdj); box 1 = view A, box 2 = view B."""
    i1, j1, h1, w1 = box_a
    i2, j2, h2, w2 = box_b
    return np.array([(i2 - i1) / h1, (j2 - j1) / w1, h2 / h1, w2 / w1,
                     float(bool(flip_a) != bool(flip_b)), (width - j1 - j2) / w1], dtype=np.float32)


@dataclass
class TwoViewCrop:
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    same_view: bool = False  # ablation: view B reuses view A's box and flip

    def draw(self, rng: np.random.Generator, height: int, width: int):
        flip_a = bool(rng.random() < 0.5)
        box_a = sample_box(rng, height, width, self.scale, self.ratio)
        flip_b = bool(rng.random() < 0.5)
        box_b = sample_box(rng, height, width, self.scale, self.ratio)
        if self.same_view:
            flip_b, box_b = flip_a, box_a
        return box_a, flip_a, box_b, flip_b

    def _render(self, img: torch.Tensor, box: Box, flip: bool, width: int, sx: float, sy: float):
        """img: uint8 [1, 3, h, w] (channels-last memory) -> uint8 HWC numpy view."""
        i, j, h, w = box
        left = width - j - w if flip else j  # the box in the unflipped image
        top, bottom = round(i * sy), max(round(i * sy) + 1, round((i + h) * sy))
        lo, hi = round(left * sx), max(round(left * sx) + 1, round((left + w) * sx))
        out = F.interpolate(img[:, :, top:bottom, lo:hi], size=(self.size, self.size),
                            mode="bicubic", antialias=True)
        if flip:
            out = out.flip(-1)
        return out[0].permute(1, 2, 0).numpy()

    def __call__(self, data: bytes, rng: np.random.Generator):
        """JPEG/PNG bytes -> (view_a HWC uint8, view_b HWC uint8, geometry float32 [6])."""
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        box_a, flip_a, box_b, flip_b = self.draw(rng, height, width)
        smallest = min(box_a[2], box_a[3], box_b[2], box_b[3])
        if im.format == "JPEG":
            for r in (8, 4, 2):
                if smallest / r >= self.size:
                    im.draft("RGB", (max(1, width // r), max(1, height // r)))
                    break
        if im.mode != "RGB":
            im = im.convert("RGB")
        with warnings.catch_warnings():  # read-only buffer: we only read it
            warnings.simplefilter("ignore")
            img = torch.from_numpy(np.asarray(im)).permute(2, 0, 1).unsqueeze(0)
        sx, sy = im.size[0] / width, im.size[1] / height
        view_a = self._render(img, box_a, flip_a, width, sx, sy)
        view_b = self._render(img, box_b, flip_b, width, sx, sy)
        return view_a, view_b, relative_geometry(box_a, flip_a, box_b, flip_b, width)

"""Two-view data throughput per CPU core: simscale's split pipeline vs an official-style loader.

    OMP_NUM_THREADS=1 python bench/data_bench.py --images 96 --batch 32

Shards of real JPEGs (photographs shipped in scikit-image/scikit-learn, cropped and resized to
500x375, 800x600 and 1200x900) are written by `simscale prepare`. All figures come from one
process on one core, measured in the same run:
- worker side: decode (JPEG draft) + flip + two crops + bicubic resize + block mask + parameter
  draws, per sample (what a DataLoader worker does);
- photometric side: apply_photometric on both views of uint8 batches (on the training device
  in real runs; here on the same CPU core, to be conservative);
- end to end: TwoViewStream (num_workers=0: tar read, decode, collate) + photometric on both views;
- baseline, per image: PIL decode, two torchvision RandomResizedCrop(bicubic) + flip, PIL
  ColorJitter / RandomGrayscale / GaussianBlur(PIL, sigma~U(.1,2)) / Solarize, ToTensor,
  Normalize, and the same block mask, from the same JPEG bytes held in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import ImageFilter, ImageOps  # noqa: E402
from torchvision import transforms as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "data"))
import images  # noqa: E402  (real photos from installed packages)

from simscale.config import build_config  # noqa: E402
from simscale.data.masking import block_mask  # noqa: E402
from simscale.data.photometric import apply_photometric, draw_params  # noqa: E402
from simscale.data.prepare import Options, prepare  # noqa: E402
from simscale.data.stream import TwoViewStream, _read_shard, sample_rngs  # noqa: E402
from simscale.data.views import TwoViewCrop  # noqa: E402

SIZES = [(500, 375), (500, 375), (800, 600), (1200, 900)]


class PILBlur:  # the official recipe's blur: PIL GaussianBlur with radius ~ U(.1, 2)
    def __call__(self, im):
        return im.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class Solarize:
    def __call__(self, im):
        return ImageOps.solarize(im, 128)


def official_views(size: int):
    norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    crop = [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    a = T.Compose(crop + [PILBlur()] + norm)
    b = T.Compose(crop + [T.RandomApply([PILBlur()], p=0.1), T.RandomApply([Solarize()], p=0.2)] + norm)
    return a, b


def bench_baseline(raw: list[bytes], size: int, grid: int) -> float:
    import io

    from PIL import Image
    ta, tb = official_views(size)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for data in raw:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        ta(im), tb(im)
        block_mask(rng, grid, 0.6, 16, 0.3)
    return len(raw) / (time.perf_counter() - t)


def bench_worker(raw: list[bytes], size: int, grid: int) -> float:
    crop = TwoViewCrop(size)
    t = time.perf_counter()
    for k, data in enumerate(raw):
        c, m, p = sample_rngs(0, 0, k)
        crop(data, c)
        block_mask(m, grid, 0.6, 16, 0.3)
        draw_params(p, "a"), draw_params(p, "b")
    return len(raw) / (time.perf_counter() - t)


def bench_photometric(batch: int, size: int, reps: int) -> float:
    rng = np.random.default_rng(0)
    views = torch.from_numpy(np.stack([np.asarray(images.variant(k, (size, size))) for k in range(batch)]))
    views = views.permute(0, 3, 1, 2).contiguous()
    pa = torch.from_numpy(np.stack([draw_params(rng, "a") for _ in range(batch)]))
    pb = torch.from_numpy(np.stack([draw_params(rng, "b") for _ in range(batch)]))
    apply_photometric(views, pa, "a")  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        apply_photometric(views, pa, "a"), apply_photometric(views, pb, "b")
    return batch * reps / (time.perf_counter() - t)


def bench_end_to_end(out: Path, batch: int) -> float:
    cfg = build_config("vit_b16", overrides=[f"data.train={out}", "data.num_workers=0",
                                             f"optim.batch_size={batch}", "data.shuffle_buffer=64"])
    stream = TwoViewStream(cfg)
    n = 0
    t = time.perf_counter()
    for b in stream.batches(epoch=0):
        apply_photometric(b["view_a"], b["photo_a"], "a"), apply_photometric(b["view_b"], b["photo_b"], "b")
        n += b["view_a"].shape[0]
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians reported")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    grid = args.size // 16
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for k in range(args.images):
            images.write_jpeg(src / f"{k:05d}.jpg", images.variant(k, SIZES[k % len(SIZES)]))
        out = Path(tmp) / "shards"
        t = time.perf_counter()
        prepare([str(src)], out, Options(shard_size=32), workers=1, progress=False)
        prep_rate = args.images / (time.perf_counter() - t)
        raw = [s["jpg"] for url in sorted(out.glob("shard-*.tar")) for s in _read_shard(str(url))]
        res = {"images": len(raw), "batch": args.batch, "size": args.size, "rounds": args.rounds,
               "prepare_images_per_s": prep_rate}
        runs = {k: [] for k in ("baseline", "worker", "photometric", "end_to_end")}
        for _ in range(args.rounds):  # interleaved, so load from other processes hits all alike
            runs["baseline"].append(bench_baseline(raw, args.size, grid))
            runs["worker"].append(bench_worker(raw, args.size, grid))
            runs["photometric"].append(bench_photometric(args.batch, args.size,
                                                         max(1, args.images // args.batch)))
            runs["end_to_end"].append(bench_end_to_end(out, args.batch))
    for k, v in runs.items():
        res[f"{k}_samples_per_s"] = float(np.median(v))
        res[f"{k}_all_rounds"] = [round(x, 1) for x in v]
    base = res["baseline_samples_per_s"]
    res["ratio_end_to_end_vs_baseline"] = res["end_to_end_samples_per_s"] / base
    res["ratio_worker_side_vs_baseline"] = res["worker_samples_per_s"] / base
    for k, v in res.items():
        print(f"{k:32s} {v:10.2f}" if isinstance(v, float) else f"{k:32s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

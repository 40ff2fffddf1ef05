"""Real photographs from installed packages, written as files for the data tests.

scikit-image and scikit-learn ship a few photographs inside their wheels (no download):
astronaut, coffee, chelsea, rocket, hubble, china, flower. Variants (crops, resizes) give more
distinct images of ~500x375 and larger.
"""
from __future__ import annotations

import io
import struct
import tarfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


@lru_cache(maxsize=1)
def photos() -> list[np.ndarray]:
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    imgs = [sk.astronaut(), sk.coffee(), sk.chelsea(), sk.rocket(), sk.hubble_deep_field()]
    imgs += list(load_sample_images().images)
    return [np.ascontiguousarray(i[..., :3]) for i in imgs]


def variant(k: int, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """The k-th distinct RGB image of `size` (w, h): a photo, cropped differently per k."""
    base = photos()[k % len(photos())]
    im = Image.fromarray(base)
    w, h = im.size
    shift = (k // len(photos())) * 17
    box = (shift % max(1, w // 4), shift % max(1, h // 4), w - (shift % 7), h - (shift % 5))
    out = im.crop(box).resize(size, Image.Resampling.BICUBIC)
    if (k // len(photos())) % 2:
        out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return out


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=90, **kw)
    return path


def class_folders(root: Path, per_class: int = 4, classes=("cat", "dog", "rocket")) -> Path:
    n = 0
    for c in classes:
        for i in range(per_class):
            size = (500, 375) if n % 3 else (800, 600)
            write_jpeg(root / c / f"img{i:03d}.jpg", variant(n, size))
            n += 1
    return root


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny valid-looking PNG whose header declares width x height pixels."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def hostile(root: Path) -> dict[str, str]:
    """Bad and awkward inputs made for real. Returns name -> expected fate."""
    root.mkdir(parents=True, exist_ok=True)
    good = variant(0)
    buf = io.BytesIO()
    good.save(buf, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    good.convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    a16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(a16).save(root / "gray16.png")  # mode I;16
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display: a 500x375 file shows as 375x500
    good.save(root / "rotated.jpg", "JPEG", exif=exif.tobytes())
    png_bomb(root / "bomb.png")
    (root / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    (root / "dir.jpg").mkdir()
    return {"truncated.jpg": "corrupt", "zero.jpg": "empty-file", "text.jpg": "not-an-image",
            "bomb.png": "too-many-pixels", "dangling.jpg": "unreadable", "dir.jpg": "unreadable",
            "cmyk.jpg": "ok", "gray16.png": "ok", "palette.png": "ok", "rgba.png": "ok",
            "rotated.jpg": "ok"}


def evil_tar(path: Path) -> Path:
    """A tar with two good members and two unsafe names."""
    with tarfile.open(path, "w") as tf:
        for name, k in (("good1.jpg", 1), ("../evil.jpg", 2), ("/abs.jpg", 3), ("sub/good2.jpg", 4)):
            buf = io.BytesIO()
            variant(k).save(buf, "JPEG", quality=85)
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
        info = tarfile.TarInfo("good1.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"7"))
    return path


def id_shards(root: Path, n: int, size: tuple[int, int], shuffle: bool = True, shard_size: int = 5) -> Path:
    """n distinct real JPEGs (label = sample id, listed in ROOT/list.txt) made into shards of
    `shard_size` by `simscale prepare` in ROOT/out, which is returned."""
    from simscale.data.prepare import Options, prepare

    lines = []
    for k in range(n):
        p = write_jpeg(root / "img" / f"{k:03d}.jpg", variant(k, size))
        lines.append(f"{p} {k}\n")
    (root / "list.txt").write_text("".join(lines))
    prepare([str(root / "list.txt")], root / "out", Options(shard_size=shard_size, shuffle=shuffle), workers=1,
            progress=False)
    return root / "out"

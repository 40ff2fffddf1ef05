"""Fashion-MNIST (real labelled images) as class folders that `simscale prepare` turns into shards.

Source: the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`),
which installs the four idx files to /usr/share/datasets/fashion-mnist/
({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz). Output: DIR/<k>_<class>/<i>.png, 28x28
grayscale. Folder names start with the official label index so that any sorted listing of
the folders gives labels 0..9 in Fashion-MNIST's own order.

    python -m simscale.data.fashion_mnist --out data/fmnist/train --per-class 100 --split train
    simscale prepare data/fmnist/train --out shards/fmnist-train
"""
from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

import numpy as np

from simscale.errors import DataError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FOLDERS = tuple(f"{i}_{name}" for i, name in enumerate(CLASSES))
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array: [N] labels or [N, rows, cols] images."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:  # 0x08: unsigned byte, the only type Fashion-MNIST uses
        raise DataError(f"'{path}' is not a uint8 idx file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"'{path}' is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def load_split(split: str = "train", root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the 'train' (60k) or 'test' (10k) split."""
    if split not in _PREFIX:
        raise DataError(f"unknown Fashion-MNIST split '{split}': use train or test")
    root = Path(root)
    files = [root / f"{_PREFIX[split]}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    for f in files:
        if not f.is_file():
            raise DataError(f"'{f}' not found: `apt-get install dataset-fashion-mnist` or pass --root DIR")
    images, labels = (read_idx(f) for f in files)
    if len(images) != len(labels):
        raise DataError(f"{files[0]} and {files[1]} disagree: {len(images)} images, {len(labels)} labels")
    return images, labels


def write_class_folders(
    out: str | Path,
    split: str = "train",
    per_class: int | None = None,
    root: str | Path = DEFAULT_ROOT,
) -> dict[str, int]:
    """Write the first `per_class` images of each class (file order) as PNGs; returns counts per folder."""
    from PIL import Image

    images, labels = load_split(split, root)
    out = Path(out)
    counts = {}
    for label, folder in enumerate(FOLDERS):
        index = np.flatnonzero(labels == label)
        if per_class is not None:
            index = index[:per_class]
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i in index:
            Image.fromarray(images[i]).save(out / folder / f"{i:05d}.png")
        counts[folder] = len(index)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simscale.data.fashion_mnist", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (class folders are created in it)")
    p.add_argument("--split", choices=tuple(_PREFIX), default="train")
    p.add_argument("--per-class", type=int, default=None, help="images per class (default: all)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="folder holding the idx .gz files")
    args = p.parse_args(argv)
    try:
        counts = write_class_folders(args.out, args.split, args.per_class, args.root)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {sum(counts.values())} images in {len(counts)} class folders to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

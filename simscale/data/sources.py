"""What `simscale prepare` reads: folders (class subfolders give labels), text lists, tar files.

Enumeration only lists items (a path, or a tar member's byte range) in a deterministic order;
reading and checking the bytes happens in the worker processes (prepare.py). Items that can be
refused without reading (unsafe tar member names) come back as skips with a reason.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from simscale.errors import DataError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Item:
    source: str  # what the user sees in reports: a path, or "archive.tar::member"
    path: str  # file on disk (the tar file for members)
    label: int = -1
    offset: int = -1  # tar members: byte range inside `path`
    size: int = -1


@dataclass
class Listing:
    items: list[Item]
    classes: list[str] | None
    skipped: list[tuple[str, str, str]]  # (source, reason, detail)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def read_item(item: Item) -> bytes:
    """The item's raw bytes (raises OSError when the path cannot be read)."""
    with open(item.path, "rb") as f:
        if item.offset < 0:
            return f.read()
        f.seek(item.offset)
        return f.read(item.size)


def _class_folders(root: Path) -> list[str] | None:
    """Class mode when the root holds subfolders and no images of its own."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False) and not is_image_name(e.name)]
    files = [e.name for e in entries if not e.is_dir(follow_symlinks=False) and is_image_name(e.name)]
    return dirs if dirs and not files else None


def _walk(root: Path, label: int) -> tuple[list[Item], list[tuple[str, str, str]]]:
    items, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        # A directory called x.jpg is a path the user expects to be an image: report it.
        for d in [d for d in dirnames if is_image_name(d)]:
            dirnames.remove(d)
            items.append(Item(os.path.join(dirpath, d), os.path.join(dirpath, d), label))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if is_image_name(name):
                items.append(Item(path, path, label))
            elif not name.startswith("."):
                skipped.append((path, "not-an-image-name", os.path.splitext(name)[1] or "no extension"))
    return items, skipped


def _folder(root: Path) -> Listing:
    classes = _class_folders(root)
    if classes is None:
        items, skipped = _walk(root, -1)
        return Listing(items, None, skipped)
    items, skipped = [], []
    for label, name in enumerate(classes):
        i, s = _walk(root / name, label)
        items += i
        skipped += s
    return Listing(items, classes, skipped)


def _text_list(path: Path) -> Listing:
    items, skipped = [], []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label = -1
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            line, label = parts[0], int(parts[1])
        p = Path(line)
        if not p.is_absolute():
            p = path.parent / p
        items.append(Item(str(p), str(p), label))
    return Listing(items, None, skipped)


def _unsafe(name: str) -> bool:
    p = PurePosixPath(name)
    return p.is_absolute() or name.startswith("\\") or ".." in p.parts


def _tar_kind(m: tarfile.TarInfo) -> str:
    for kind, test in (("symlink", m.issym), ("hardlink", m.islnk), ("directory", m.isdir), ("fifo", m.isfifo),
                       ("char-device", m.ischr), ("block-device", m.isblk)):
        if test():
            return kind
    return "special"


def _tar(path: Path) -> Listing:
    items, skipped, labels = [], [], {}
    try:
        with tarfile.open(path, "r:*") as tf:
            members = tf.getmembers()
            for m in members:  # webdataset-style KEY.cls next to KEY.jpg gives the label
                if m.isreg() and m.name.endswith(".cls") and m.size < 64 and not _unsafe(m.name):
                    try:
                        labels[m.name[:-4]] = int(tf.extractfile(m).read().strip())
                    except ValueError:
                        pass
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"tar source '{path}' cannot be read ({exc}): check the file or leave it out") from None
    for m in members:
        source = f"{path}::{m.name}"
        if _unsafe(m.name):
            skipped.append((source, "unsafe-tar-path", "absolute or '..' member name"))
            continue
        if not m.isreg():
            kind = _tar_kind(m)
            if kind != "directory" or is_image_name(m.name):  # plain folders are just structure
                skipped.append((source, f"tar-{kind}", "not a regular file: never followed or read"))
            continue
        if not is_image_name(m.name):
            continue
        key = m.name.rsplit(".", 1)[0]
        items.append(Item(source, str(path), labels.get(key, -1), m.offset_data, m.size))
    return Listing(items, None, skipped)


def list_sources(sources: list[str]) -> Listing:
    """All items of all sources, in argument order then sorted order; classes merged by name."""
    parts = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise DataError(f"source '{src}' not found: pass an existing folder, .txt list or .tar file")
        if p.is_dir():
            listing = _folder(p)
        elif tarfile.is_tarfile(p):
            listing = _tar(p)
        else:
            listing = _text_list(p)
        if not listing.items:
            raise DataError(f"source '{src}' holds no images: point it at a folder of images, "
                            "a list of image paths or a tar of images")
        parts.append(listing)
    names = sorted({c for part in parts for c in (part.classes or [])})
    index = {c: i for i, c in enumerate(names)}
    items, skipped = [], []
    for part in parts:
        if part.classes:  # re-map each source's own class index into the merged list
            items += [Item(i.source, i.path, index[part.classes[i.label]], i.offset, i.size)
                      for i in part.items]
        else:
            items += part.items
        skipped += part.skipped
    return Listing(items, names or None, skipped)

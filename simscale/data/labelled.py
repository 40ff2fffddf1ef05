"""Labelled shards as (image, label) batches for evaluation: timm's eval transform, safe decoding.

Used by the probes (`simscale eval`, eval/features.py) and the trainer's online k-NN monitor, so it
lives in the data layer. Only the image member and `.cls` of a sample are read, with explicit
decoders (PIL for images, ASCII for labels): nothing in a shard is ever unpickled. Remote shards
are opened through `data/opener.py` with the caller's `IOOptions`.
"""
from __future__ import annotations

import functools
import io
import tarfile

import torch
import webdataset as wds
from torchvision import transforms
from webdataset.tariterators import group_by_keys, tar_file_expander

from simscale.data.opener import open_shard
from simscale.data.remote import IOOptions
from simscale.data.shards import ShardSet
from simscale.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sim_preprocessing(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """What `simscale export` writes into config.json (simscale.export.preprocessing)."""
    return {"input_size": (3, img_size, img_size), "interpolation": "bicubic", "crop_pct": 0.875,
            "crop_mode": "center", "mean": tuple(mean), "std": tuple(std)}


def _to_rgb(image):
    return image.convert("RGB")


def eval_transform(img_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   data_config: dict | None = None) -> transforms.Compose:
    """timm's eval transform (`create_transform`) for `data_config`, default SIM's at `img_size`."""
    from timm.data import create_transform

    data = data_config or sim_preprocessing(img_size, mean, std)
    timm_transform = create_transform(**data, is_training=False)
    return transforms.Compose([transforms.Lambda(_to_rgb), *timm_transform.transforms])


_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
_UNLABELLED, _UNDECODABLE = -1, -2


def _decode_image(data: bytes):
    """Image bytes -> PIL image, by PIL's image decoders only (shard members are never unpickled)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.copy()


def _decode_label(data) -> int | None:
    """A .cls member: an ASCII integer, else None."""
    try:
        return int(data.decode("ascii").strip()) if isinstance(data, bytes) and len(data) < 32 else None
    except (UnicodeDecodeError, ValueError):
        return None


class _ImageAndLabel:
    """raw sample dict -> (image tensor, label); a class, not a closure, so workers can pickle it.

    Only the image member and `.cls` are read, with the explicit decoders above; every other
    member (.pyd, .pkl, .pth, .json, ...) is ignored unread. webdataset's `.decode()` is not used:
    its default handlers unpickle .pyd/.pkl and torch.load .pth members.
    """

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, sample: dict):
        data = next((sample[k] for k in _IMAGE_MEMBERS if isinstance(sample.get(k), bytes)), None)
        label = _decode_label(sample.get("cls"))
        # Bad samples are flagged rather than raised here: an error inside a DataLoader worker
        # would reach the user as a multi-line traceback.
        if data is None or label is None:
            return torch.zeros(3, 1, 1), _UNLABELLED, str(sample.get("__key__"))
        try:
            return self.transform(_decode_image(data)), label, ""
        except Exception:  # noqa: BLE001 - a corrupt image is named by the caller, not traced
            return torch.zeros(3, 1, 1), _UNDECODABLE, f"{sample.get('__key__')} in {sample.get('__url__')}"


def _collate(items):
    bad = next(((y, key) for _, y, key in items if y < 0), None)
    if bad is not None:
        return None, bad
    return torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items])


def _opened(entries, opts: IOOptions | None = None):
    """webdataset's url_opener stage, through simscale's opener with the caller's I/O options."""
    for entry in entries:
        with open_shard(entry["url"], opts) as stream:  # closed once the expander asks for the next shard
            yield dict(entry, stream=stream)


def _loader(shards: ShardSet, transform, batch_size: int, workers: int, opts: IOOptions | None):
    # Every process reads every shard, in order: evaluation is not split across ranks.
    dataset = wds.DataPipeline(
        wds.SimpleShardList(shards.urls), wds.split_by_worker,
        functools.partial(_opened, opts=opts), tar_file_expander, group_by_keys,  # raw bytes: only image, .cls decoded
        wds.map(_ImageAndLabel(transform)),
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=min(workers, len(shards.urls)),
                                       collate_fn=_collate)


def labelled_batches(shard_set: ShardSet, transform, batch_size: int, workers: int,
                     opts: IOOptions | None = None):
    """(images, labels) batches of labelled shards (remote ones read with `opts`); a damaged shard, an undecodable image or an
    unlabelled sample is one DataError line naming it (never a worker's traceback)."""
    batches = iter(_loader(shard_set, transform, batch_size, workers, opts))
    while True:
        try:
            images, y = next(batches)
        except StopIteration:
            return
        except (OSError, ValueError, EOFError, tarfile.TarError) as exc:
            # a truncated or damaged tar (webdataset raises it inside a worker, with a trace)
            raise DataError(f"shards '{shard_set.urls[0]}'... cannot be read ({type(exc).__name__}): check "
                            "them with `simscale prepare --verify DIR`") from None
        if images is None:
            code, key = y
            if code == _UNDECODABLE:
                raise DataError(f"sample {key} cannot be decoded as an image: check the shards with "
                                "`simscale prepare --verify DIR` and re-run `simscale prepare`")
            raise DataError(f"shards '{shard_set.urls[0]}'... hold samples without an image or a .cls "
                            "label: prepare them from class folders (`simscale prepare CLASS_DIR`)")
        yield images, y

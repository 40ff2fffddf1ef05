"""Frozen-encoder features for the probes: load an exported timm directory, encode labelled shards.

An exported encoder is a timm pretrained directory (`config.json` + `model.safetensors`, the
layout `timm.models.save_for_hf` writes). It is loaded by timm itself through its `local-dir:`
source, strictly, so the probes see exactly what a timm user gets from the same files.

Features are the model's own pooled pre-logits: `forward_head(forward_features(x),
pre_logits=True)` with `num_classes=0`. For a SIM ViT (`global_pool="token"`) that is the cls
token output (after `fc_norm` if the model has one); whatever `global_pool` the exported
config names is what is used, so k-NN and linear probe measure the representation users get.

Eval transform: timm's own, `create_transform(**resolve_data_config({}, model=model))`, for a
model loaded from an export (its config.json carries SIM's preprocessing: input size, ImageNet
mean/std, bicubic, crop_pct 0.875, centre crop), so a 32 px model is resized to 36 exactly as a
timm user's pipeline does. A live module from the trainer gets the same SIM preprocessing at its
own input size. Grayscale and palette images are converted to RGB first.
"""
from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from pathlib import Path

import torch
import webdataset as wds
from torch import nn
from torchvision import transforms
from webdataset.tariterators import group_by_keys, tar_file_expander

from simscale.data.opener import open_shard
from simscale.data.remote import IOOptions
from simscale.data.shards import ShardSet, resolve_shards
from simscale.errors import CheckpointError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def load_encoder(model_dir: str | Path) -> nn.Module:
    """An exported encoder as a timm model in eval mode (no classifier head), loaded strictly."""
    import timm  # imports torchvision; keep it off the CLI's import path

    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model directory '{path}' not found: pass the --out DIR of `simscale export`")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"'{path / name}' is missing: '{path}' is not a `simscale export` "
                                  "directory (it needs config.json and model.safetensors)")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"'{path / CONFIG}' is not valid JSON: re-run `simscale export`") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise CheckpointError(f"'{path / CONFIG}' names no 'architecture': re-run `simscale export`")
    try:
        # local-dir: reads config.json (architecture, model_args, pretrained_cfg) and loads the
        # weights with load_state_dict(strict=True); a shape or key mismatch raises.
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True, num_classes=0)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load '{path}' with timm ({cfg['architecture']}): {first[:300]}; "
                              "the weights do not match config.json, re-run `simscale export`") from None
    return model.eval()


def input_config(model: nn.Module) -> dict:
    """timm data-config fields (input_size, interpolation, crop_pct, crop_mode, mean, std) for `model`.

    A model loaded from an export directory (timm marks its pretrained_cfg source 'local-dir')
    gets exactly what timm resolves from its config.json. A live module from the trainer gets
    SIM's preprocessing at its own input size: its timm pretrained_cfg, if any, describes some
    hub checkpoint, not our weights.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("source") == "local-dir":
        from timm.data import resolve_data_config

        data = resolve_data_config({}, model=model)
        return {k: data[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")}
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = cfg.get("input_size", (3, 224, 224))[1:]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return sim_preprocessing(int(size))


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


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's pooled pre-logits (cls token for global_pool='token'); any timm model."""
    if hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    return model(images)


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


@torch.no_grad()  # not inference_mode: the linear probe trains on these tensors
def extract_features(
    model: nn.Module,
    shards: str | ShardSet,
    batch_size: int = 128,
    workers: int = 0,
    img_size: int | None = None,
    mean=None,
    std=None,
    opts: IOOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every labelled sample of `shards`: (features [N, D] float32 on CPU, labels [N] int64).

    `model` is a live module (in-training eval; training mode is restored after) or one from
    `load_encoder`. Features are not normalised here; the k-NN normalises, the probe standardises.
    """
    shard_set = resolve_shards(shards, opts) if isinstance(shards, str) else shards
    data = input_config(model)
    if img_size:
        data["input_size"] = (3, img_size, img_size)
    data.update({k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None})
    transform = eval_transform(data_config=data)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, y in labelled_batches(shard_set, transform, batch_size, workers, opts):
            out = pooled_features(model, images.to(param.device, param.dtype))
            feats.append(out.float().cpu())
            labels.append(y)
    finally:
        model.train(was_training)
    if not feats:
        raise DataError(f"no samples in shards '{shard_set.urls[0]}' ({len(shard_set.urls)} shards)")
    return torch.cat(feats), torch.cat(labels)


def pixel_features(shards: str | ShardSet, img_size: int, batch_size: int = 256,
                   workers: int = 0, opts: IOOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw-pixel baseline: each image after the eval transform, flattened ([N, 3*S*S]).

    Any encoder is worth what it adds over its own input: `simscale eval knn --pixels` scores
    these with the same k-NN as an encoder's features."""
    shard_set = resolve_shards(shards, opts) if isinstance(shards, str) else shards
    transform = eval_transform(img_size, IMAGENET_MEAN, IMAGENET_STD)
    feats, labels = [], []
    for images, y in labelled_batches(shard_set, transform, batch_size, workers, opts):
        feats.append(images.flatten(1))
        labels.append(y)
    if not feats:
        raise DataError(f"no samples in shards '{shard_set.urls[0]}' ({len(shard_set.urls)} shards)")
    return torch.cat(feats), torch.cat(labels)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def encode_splits(args) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], int]:
    """CLI helper for both probes: load --model, encode --train and --val. Returns (train, val, n_classes)."""
    for flag, attr, low, strict in (("--batch-size", "batch_size", 1, False), ("--workers", "workers", 0, False),
                                    ("--k", "k", 1, False), ("--temperature", "temperature", 0, True),
                                    ("--weight-decay", "weight_decay", 0, False)):
        value = getattr(args, attr, None)
        if value is not None and (value < low or (strict and value == low) or value != value):
            raise DataError(f"{flag} must be {'>' if strict else '>='} {low}, got {value}")
    train_set, val_set = resolve_shards(args.train), resolve_shards(args.val)
    if train_set.classes and val_set.classes and list(train_set.classes) != list(val_set.classes):
        raise DataError(f"--train and --val name different classes ({len(train_set.classes)} vs "
                        f"{len(val_set.classes)}): prepare both from the same class folders")
    workers = getattr(args, "workers", None)
    workers = default_workers() if workers is None else workers
    if getattr(args, "pixels", False):
        train = pixel_features(train_set, args.img_size, args.batch_size, workers)
        val = pixel_features(val_set, args.img_size, args.batch_size, workers)
    else:
        model = load_encoder(args.model)
        if torch.cuda.is_available():
            model = model.cuda()
        train = extract_features(model, train_set, args.batch_size, workers)
        val = extract_features(model, val_set, args.batch_size, workers)
    n_classes = max(len(train_set.classes or ()), int(max(train[1].max(), val[1].max())) + 1)
    return train, val, n_classes

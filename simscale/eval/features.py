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

import json
import os
from pathlib import Path

import torch
from torch import nn

from simscale.data.labelled import (IMAGENET_MEAN, IMAGENET_STD, eval_transform, labelled_batches,  # noqa: F401
                                     sim_preprocessing)
from simscale.data.remote import IOOptions
from simscale.data.shards import ShardSet, resolve_shards
from simscale.errors import CheckpointError, DataError

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


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's pooled pre-logits (cls token for global_pool='token'); any timm model."""
    if hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    return model(images)


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

"""Fixtures for the probes: real labelled shards (sklearn's handwritten digits) and a real timm
micro ViT exported in timm's pretrained-directory layout (`save_for_hf`: config.json +
model.safetensors), the layout `simscale export` writes."""
import io

import numpy as np
import pytest
import timm
import torch
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits
from timm.models import save_for_hf

from simscale.data.shards import write_manifest

MICRO_VIT = dict(num_classes=0, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def micro_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **MICRO_VIT).eval()


def export_dir(model: torch.nn.Module, path) -> str:
    """What an exporter writes: timm's own config.json (+ SIM's preprocessing) and safetensors."""
    data_config = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic",
                   "crop_pct": 0.875, "crop_mode": "center"}
    save_for_hf(model, str(path), safe_serialization=True, data_config=data_config)
    return str(path)


def write_shards(out, images: np.ndarray, labels: np.ndarray, per_shard: int, classes=None) -> str:
    """WebDataset shards (.jpg grayscale + .cls) plus the manifest `simscale prepare` writes."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(images), per_shard)):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(start, min(start + per_shard, len(images))):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="JPEG", quality=95)
                sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "cls": str(int(labels[i]))})
        shards.append({"name": name, "samples": min(per_shard, len(images) - start)})
    write_manifest(out, shards, classes)
    return str(out)


@pytest.fixture(scope="session")
def make_vit():
    """Factory for a seeded micro ViT (fixtures, not imports: tests/ is not a package)."""
    return micro_vit


@pytest.fixture(scope="session")
def shard_writer():
    return write_shards


@pytest.fixture(scope="session")
def digits():
    """1797 real 8x8 handwritten digits, upscaled to 32x32 uint8 grayscale, with labels 0..9."""
    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.kron(images, np.ones((4, 4), dtype=np.uint8))  # nearest 4x upscale
    return images, d.target.astype(np.int64)


@pytest.fixture(scope="session")
def digit_shards(digits, tmp_path_factory):
    """(train dir, val dir, val labels): 600 train / 200 val real digit images in shards."""
    images, labels = digits
    root = tmp_path_factory.mktemp("digits")
    classes = [str(c) for c in range(10)]
    train = write_shards(root / "train", images[:600], labels[:600], per_shard=250, classes=classes)
    val = write_shards(root / "val", images[600:800], labels[600:800], per_shard=128, classes=classes)
    return train, val, labels[600:800]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(model, dir): a micro ViT and its export directory."""
    model = micro_vit()
    return model, export_dir(model, tmp_path_factory.mktemp("export") / "vit")

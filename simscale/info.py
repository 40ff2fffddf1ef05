"""`simscale info`: what is installed, which accelerator DeepSpeed would use, which presets exist."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform

from rich.table import Table

from simscale.config import PRESETS, build_config, key_table
from simscale.console import make_console

PACKAGES = ("simscale", "torch", "torchvision", "timm", "deepspeed", "webdataset", "accelerate", "rich")


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def accelerator_line() -> str:
    import torch

    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return f"cuda x{torch.cuda.device_count()} ({', '.join(sorted(names))}), backend nccl"
    return f"cpu ({os.cpu_count()} cores, {platform.machine()}), backend gloo"


def keys_table() -> Table:
    """Every config key, generated from its one declaration in config.py (`key(...)`)."""
    table = Table(title="config keys (set with --config FILE or key.sub=value)", show_header=True)
    for col in ("key", "type", "default", "allowed", "meaning"):
        table.add_column(col, overflow="fold", no_wrap=col == "key")
    for row in key_table():
        table.add_row(*row)
    return table


def cli_main(args) -> int:
    console = make_console()
    if getattr(args, "keys", False):
        console.print(keys_table())
        return 0
    versions = Table(title="simscale info", show_header=True)
    versions.add_column("package")
    versions.add_column("version")
    versions.add_row("python", platform.python_version())
    for name in PACKAGES:
        versions.add_row(name, _version(name))
    console.print(versions)
    console.print(f"accelerator: {accelerator_line()}")
    presets = Table(title="presets", show_header=True)
    for col in ("preset", "timm arch", "img/patch", "dim x depth", "decoder D/heads", "ZeRO", "precision"):
        presets.add_column(col)
    for name in PRESETS:
        c = build_config(name)
        m = c.model
        presets.add_row(name, m.arch, f"{m.img_size}/{m.patch_size}", f"{m.embed_dim} x {m.depth}",
                        f"{m.decoder_dim}/{m.decoder_heads}", str(c.deepspeed.zero_stage), c.deepspeed.precision)
    console.print(presets)
    return 0

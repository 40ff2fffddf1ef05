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


def supported_ranges() -> dict[str, str]:
    """name -> the range simscale's installed metadata asks for (pyproject.toml's dependencies)."""
    from packaging.requirements import Requirement  # packaging: a dependency of deepspeed

    try:
        reqs = [Requirement(r) for r in md.requires("simscale") or []]
    except md.PackageNotFoundError:  # running from a checkout that was never installed
        return {}
    return {r.name.lower(): str(r.specifier) for r in reqs if r.marker is None}


def in_range(version: str, spec: str) -> str:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not spec or version == "not installed":
        return "-" if not spec else "no"
    try:
        return "yes" if SpecifierSet(spec).contains(Version(version), prereleases=True) else "NO"
    except InvalidVersion:
        return "?"


def torch_build_line() -> str:
    """Which torch this is: its CUDA (or CPU-only) build and where it was imported from."""
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    return f"torch {torch.__version__} ({build} build) from {os.path.dirname(torch.__file__)}"


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
    for col in ("package", "version", "supported", "in range"):
        versions.add_column(col)
    versions.add_row("python", platform.python_version(), "", "")
    ranges = supported_ranges()
    for name in PACKAGES:
        version, spec = _version(name), ranges.get(name, "")
        versions.add_row(name, version, spec, in_range(version, spec) if name != "simscale" else "")
    console.print(versions)
    console.print(torch_build_line())
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

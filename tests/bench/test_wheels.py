"""bench/wheels resolves offline for the GPU machine's Python (3.12) next to its image's packages.

Method: the image's packages (bench/image_packages.txt) become empty stand-in wheels (name,
version where known, no files) in a second find-links folder; pip then resolves simscale's and
the GPU bench's requirements with --no-index from bench/wheels + the stand-ins, for CPython 3.12
manylinux x86_64, binary wheels only. A requirement that neither the carried set nor the image
satisfies fails here, as `pip install --no-index` would there. pip's own configuration (this
machine's find-links, extra indexes, constraints) is switched off so nothing else can satisfy it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "bench" / "wheels"
CARRY_LIMIT = 64 * 2**20  # the device tool's limit for the working tree + carried paths
NEVER_CARRIED = {"torch", "torchvision", "timm"}  # the image's CUDA builds are the ones to measure
# pip download tags the target as 3.12 manylinux x86_64 (bench/make_wheels.sh does the same)
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--only-binary=:all:"]

pytestmark = pytest.mark.skipif(not any(WHEELS.glob("*.whl")),
                                reason="bench/wheels not built: run `bash bench/make_wheels.sh` (.ci/run does)")


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> dict[str, str | None]:
    out = {}
    for line in (ROOT / "bench" / "image_packages.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canon(name)] = version or None
    return out


def wheel_names(folder: Path) -> dict[str, str]:
    return {canon(w.name.split("-")[0]): w.name for w in folder.glob("*.whl")}


def standin_wheels(folder: Path, skip: set[str]) -> None:
    """An empty wheel per image package: metadata only. Unknown version -> 9999 (presence check)."""
    folder.mkdir()
    for name, version in image_packages().items():
        if name in skip:  # carried in a newer version: the carried one wins on PYTHONPATH
            continue
        version = version or "9999"
        stem = f"{name.replace('-', '_')}-{version}"
        with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as z:
            z.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            z.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{stem}.dist-info/RECORD", "")


def requirements() -> list[str]:
    """simscale's runtime dependencies by name (the image's versions stand in for the pins)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return sorted({canon(re.split(r"[<>=!~ ;\[]", d, 1)[0]) for d in deps})


def resolve(wheels: Path, standins: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no site find-links / extra index / constraints
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
           "--disable-pip-version-check", "--find-links", str(wheels), "--find-links", str(standins),
           *TARGET, "--target", str(tmp / "target"), "--report", str(tmp / "report.json"), *requirements()]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_set_is_complete_for_the_gpu_image(tmp_path):
    carried = wheel_names(WHEELS)
    assert not NEVER_CARRIED & set(carried), f"bench/wheels must not carry {NEVER_CARRIED & set(carried)}"
    assert len(carried) == len(list(WHEELS.glob("*.whl"))), "two versions of one package stop the install"
    assert {"deepspeed", "webdataset", "pydantic", "pydantic-core", "hjson", "braceexpand"} <= set(carried)
    size = sum(f.stat().st_size for f in WHEELS.glob("*.whl"))
    assert size < CARRY_LIMIT / 4, f"{size / 2**20:.1f} MiB of wheels leaves too little of the 64 MiB carry"

    standin_wheels(tmp_path / "image", skip=set(carried))
    proc = resolve(WHEELS, tmp_path / "image", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    installed = {canon(i["metadata"]["name"]): i["download_info"]["url"]
                 for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    from_wheels = {n for n, url in installed.items() if str(WHEELS) in url}
    assert from_wheels == set(carried), f"unused carried wheels: {set(carried) - from_wheels}"
    assert "deepspeed" in installed and "pydantic-core" in installed
    # cp312 binary for the compiled one (a py3-none-any pydantic-core does not exist)
    assert "cp312" in carried["pydantic-core"] and "manylinux" in carried["pydantic-core"]


def test_resolution_fails_when_a_wheel_is_missing(tmp_path):
    """The check can fail: the same set without pydantic does not resolve (DeepSpeed imports it)."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for whl in WHEELS.glob("*.whl"):
        if not whl.name.startswith("pydantic-"):
            shutil.copy(whl, partial)
    standin_wheels(tmp_path / "image", skip=set(wheel_names(WHEELS)))
    proc = resolve(partial, tmp_path / "image", tmp_path)
    assert proc.returncode != 0
    assert "pydantic" in (proc.stdout + proc.stderr).lower()


"""Installing simscale into an environment that already has a supported torch leaves that torch alone.

pyproject.toml gives ranges; .ci/constraints.txt and .ci/torch-{newest,oldest}.txt the exact versions
each CI lane installs; bench/image_packages.txt the GPU image's. All must agree, and a real
`pip install -e .[dev]` (dry run) into the venv running this test must want nothing but simscale
itself: in the oldest lane that venv has torch 2.11.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ranges() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {canon(r.name): r for r in reqs}


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canon(name)] = version
    return out


def test_every_dependency_is_a_range_and_every_pin_is_in_it():
    reqs = ranges()
    exact = [str(r) for r in reqs.values() if any(s.operator == "==" for s in r.specifier)]
    assert not exact, f"exact pins belong in .ci/constraints.txt: {exact}"
    common = pins(ROOT / ".ci" / "constraints.txt")
    assert not {"torch", "torchvision"} & set(common), "torch's pair is per lane (.ci/torch-*.txt)"
    for lane in ("newest", "oldest"):
        pinned = {**common, **pins(ROOT / ".ci" / f"torch-{lane}.txt")}
        assert set(reqs) <= set(pinned), f"{lane} lane: no exact version for {set(reqs) - set(pinned)}"
        for name, version in pinned.items():
            assert reqs[name].specifier.contains(Version(version)), f"{lane}: {name}=={version} not in {reqs[name]}"


def test_lower_bound_is_the_oldest_lane_and_admits_the_gpu_image():
    reqs, oldest = ranges(), pins(ROOT / ".ci" / "torch-oldest.txt")
    for name in ("torch", "torchvision"):
        lower = [s.version for s in reqs[name].specifier if s.operator == ">="]
        assert lower and Version(lower[0]) == Version(oldest[name]), (name, str(reqs[name]), oldest[name])
    image = pins(ROOT / "bench" / "image_packages.txt")  # name without a version: ''
    for name, version in image.items():
        if name in reqs and version:
            assert reqs[name].specifier.contains(Version(version)), f"the GPU image's {name}=={version} not in {reqs[name]}"


def test_pip_install_into_this_environment_keeps_its_torch(tmp_path):
    # pip as a user runs it (its indexes reachable: the build backend comes from there); anything it
    # would download or replace shows up in the report's install list.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--disable-pip-version-check",
                           "--report", str(report), "-e", ".[dev]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    wanted = sorted(canon(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"])
    assert wanted == ["simscale"], f"pip would install or replace {wanted}"

#!/usr/bin/env bash
# The wheels the GPU machine lacks, for one CPython version on manylinux x86_64. That machine has
# Python 3.12 with its own torch (2.11, CUDA 13), torchvision, timm, accelerate, rich, numpy,
# pyyaml, pillow, safetensors, tensorboard, einops, ninja, msgpack, psutil, py-cpuinfo, packaging,
# tqdm, nvidia-ml-py (KINDS.md's list) and no package registry. What simscale and DeepSpeed import
# beyond that travels as wheels in bench/wheels (git-ignored: name it in the device tool's carry).
# Never torch, torchvision or timm: the image's CUDA build is the one to measure.
#
#   bash bench/make_wheels.sh                         # CPython 3.12 -> bench/wheels (for the GPU machine)
#   bash bench/make_wheels.sh host bench/wheels-host  # the same set for this venv's Python (CPU rehearsal:
#                                                     # bench/gpu.sh --cpu installs it like the GPU run does)
#
# deepspeed ships only as a source package: built here with DS_BUILD_OPS=0 (no C++/CUDA op is
# compiled at install; the ops it needs JIT-compile on first use), giving a py3-none-any wheel.
# The others are downloaded as binary wheels for the target interpreter and platform, with
# --no-deps: the list below is the complete closure, which tests/bench/test_wheels.py checks by
# resolving it offline against the image's package list.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
DEST=${2:-bench/wheels}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
# Pinned to the versions the test suite runs with (.ci/constraints.txt / the venv). typing-extensions
# travels because pydantic 2.14 needs >= 4.16 and the image's version is not known.
BUILT="deepspeed==0.19.8"
DOWNLOADED="webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
[ "$PYV" = host ] && PYV=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
start=$(date +%s)
rm -rf "$DEST"
mkdir -p "$DEST"
# --no-build-isolation: deepspeed's setup.py imports torch; use the venv's instead of fetching one.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  $BUILT -w "$DEST"
# shellcheck disable=SC2086
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any \
  $DOWNLOADED -d "$DEST"
ls -l "$DEST"
whl=("$DEST"/*.whl)
echo "make_wheels: ${#whl[@]} wheels, $(du -sk "$DEST" | cut -f1) KiB in $DEST for CPython $PYV" \
  "in $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# Pure-Python wheels of what the GPU machine lacks (it has torch, timm, accelerate, rich and no
# registry): deepspeed (from its source package, no ops compiled), webdataset, braceexpand, hjson.
# bench/gpu.sh installs them with `pip install --no-deps bench/wheels/*.whl` when deepspeed is
# missing. bench/wheels/ is a build output: keep it out of git.
#
#   bash bench/make_wheels.sh      # here, where the package registry is reachable
set -eu
cd "$(dirname "$0")/.."
mkdir -p bench/wheels
DS_BUILD_OPS=0 ${PYTHON:-python} -m pip wheel --no-deps deepspeed==0.19.8 webdataset==1.0.2 braceexpand hjson \
  -w bench/wheels
ls -l bench/wheels

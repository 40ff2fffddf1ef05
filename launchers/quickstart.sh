#!/usr/bin/env bash
# The whole job on an embedded default, on CPU or GPU, in minutes:
#   real images (Fashion-MNIST from Debian's dataset-fashion-mnist package; .ci/setup installs it)
#   -> simscale prepare (WebDataset shards) -> SIM pretraining under the deepspeed launcher
#   (2 processes) -> simscale export (timm checkpoint) -> k-NN top-1 of the trained encoder
#   against a random-init encoder of the same architecture.
#
#   bash .ci/setup && bash launchers/quickstart.sh          (from the repository root)
#
# Variables (environment): WORK (default quickstart/), PER_CLASS (train images per class,
# default 300), VAL_PER_CLASS (default 100), STEPS (optimizer steps, default 900), BATCH (per
# rank, default 64), NPROC (default 2), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=${WORK:-quickstart}
PER_CLASS=${PER_CLASS:-300}
VAL_PER_CLASS=${VAL_PER_CLASS:-100}
STEPS=${STEPS:-900}
BATCH=${BATCH:-64}
NPROC=${NPROC:-2}
PYTHON=${PYTHON:-.venv/bin/python}
PATH="$(dirname "$PYTHON"):$PATH"  # the venv's deepspeed launcher
export PATH
export SIMSCALE_NO_PROGRESS=${SIMSCALE_NO_PROGRESS:-0}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1/5 real images: Fashion-MNIST, $PER_CLASS train + $VAL_PER_CLASS val per class"
rm -rf "$WORK/images"
"$PYTHON" -m simscale.data.fashion_mnist --out "$WORK/images/train" --split train --per-class "$PER_CLASS"
"$PYTHON" -m simscale.data.fashion_mnist --out "$WORK/images/val" --split test --per-class "$VAL_PER_CLASS"

say "2/5 simscale prepare -> WebDataset shards"
"$PYTHON" -m simscale prepare "$WORK/images/train" --out "$WORK/shards/train" --shard-size 500
"$PYTHON" -m simscale prepare "$WORK/images/val" --out "$WORK/shards/val" --shard-size 500

say "3/5 SIM pretraining: $STEPS steps, $NPROC processes under the deepspeed launcher"
rm -rf "$WORK/run"
NPROC=$NPROC PRESET=tiny RESUME=none RUN_DIR="$WORK/run" MASTER_PORT=${MASTER_PORT:-29517} \
    bash launchers/single_node.sh "data.train=$WORK/shards/train" "optim.batch_size=$BATCH" \
    "optim.max_steps=$STEPS" "optim.warmup_steps=$(( STEPS / 15 ))" optim.base_lr=2e-3 "data.crop_scale=[0.3,1.0]" \
    data.num_workers=1 "run.save_every=$STEPS" log.every=10

say "4/5 simscale export -> timm (model.safetensors + config.json)"
"$PYTHON" -m simscale export "$WORK/run" --out "$WORK/export"
"$PYTHON" -m simscale export "$WORK/run" --out "$WORK/export_random_init" --init

say "5/5 k-NN top-1 on Fashion-MNIST (k=20): SIM-pretrained vs random init"
"$PYTHON" -m simscale eval knn --model "$WORK/export" --train "$WORK/shards/train" --val "$WORK/shards/val"
"$PYTHON" -m simscale eval knn --model "$WORK/export_random_init" --train "$WORK/shards/train" --val "$WORK/shards/val"

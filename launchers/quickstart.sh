#!/usr/bin/env bash
# The whole job on an embedded default, on CPU or GPU, in minutes:
#   real images (Fashion-MNIST from Debian's dataset-fashion-mnist package; .ci/setup installs it,
#   or your own class folders) -> simscale prepare (WebDataset shards) -> SIM pretraining under the
#   deepspeed launcher (2 processes) with the online k-NN monitor -> simscale export (timm
#   checkpoint) -> k-NN top-1 of the trained encoder beside a random-init encoder of the same
#   architecture and the raw pixels.
#
#   bash .ci/setup && bash launchers/quickstart.sh          (from the repository root)
#   TRAIN_DIR=my/train VAL_DIR=my/val bash launchers/quickstart.sh   (your own labelled images:
#       one subfolder per class in each; the same pipeline, 32 px tiny preset)
#
# Variables (environment): WORK (default quickstart/), TRAIN_DIR + VAL_DIR (class folders; default:
# Fashion-MNIST), PER_CLASS (Fashion-MNIST train images per class, default 300), VAL_PER_CLASS
# (default 100), STEPS (optimizer steps, default 900), BATCH (per rank, default 64), EVAL_EVERY
# (online k-NN every N steps, default 150; 0 = off), NPROC (default 2), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=${WORK:-quickstart}
PER_CLASS=${PER_CLASS:-300}
VAL_PER_CLASS=${VAL_PER_CLASS:-100}
STEPS=${STEPS:-900}
BATCH=${BATCH:-64}
EVAL_EVERY=${EVAL_EVERY:-150}
NPROC=${NPROC:-2}
PYTHON=${PYTHON:-.venv/bin/python}
PATH="$(dirname "$PYTHON"):$PATH"  # the venv's deepspeed launcher
export PATH
export SIMSCALE_NO_PROGRESS=${SIMSCALE_NO_PROGRESS:-0}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ -n "${TRAIN_DIR:-}" ] || [ -n "${VAL_DIR:-}" ]; then
    if [ ! -d "${TRAIN_DIR:-}" ] || [ ! -d "${VAL_DIR:-}" ]; then
        echo "error: set both TRAIN_DIR and VAL_DIR to existing folders of class subfolders" >&2
        exit 2
    fi
    say "1/5 your images: $TRAIN_DIR (train), $VAL_DIR (val)"
    TRAIN_SRC=$TRAIN_DIR
    VAL_SRC=$VAL_DIR
else
    say "1/5 real images: Fashion-MNIST, $PER_CLASS train + $VAL_PER_CLASS val per class"
    rm -rf "$WORK/images"
    "$PYTHON" -m simscale.data.fashion_mnist --out "$WORK/images/train" --split train --per-class "$PER_CLASS"
    "$PYTHON" -m simscale.data.fashion_mnist --out "$WORK/images/val" --split test --per-class "$VAL_PER_CLASS"
    TRAIN_SRC=$WORK/images/train
    VAL_SRC=$WORK/images/val
fi

say "2/5 simscale prepare -> WebDataset shards (seeded shuffle across shards)"
rm -rf "$WORK/shards"
"$PYTHON" -m simscale prepare "$TRAIN_SRC" --out "$WORK/shards/train" --shard-size 500
"$PYTHON" -m simscale prepare "$VAL_SRC" --out "$WORK/shards/val" --shard-size 500

say "3/5 SIM pretraining: $STEPS steps, $NPROC processes under the deepspeed launcher"
# model.pool=avg: at 32 px the mean patch token is the better readout of a 900-step SIM encoder
# (bench/RESULTS.md "Learning at 32 px", issue 20); the export and the k-NN below use it.
rm -rf "$WORK/run"
NPROC=$NPROC PRESET=tiny RESUME=none RUN_DIR="$WORK/run" MASTER_PORT=${MASTER_PORT:-29517} \
    bash launchers/single_node.sh "data.train=$WORK/shards/train" "optim.batch_size=$BATCH" \
    "optim.max_steps=$STEPS" "optim.warmup_steps=$(( STEPS / 15 ))" optim.base_lr=2e-3 "data.crop_scale=[0.3,1.0]" \
    model.pool=avg \
    data.num_workers=1 "run.save_every=$STEPS" log.every=10 \
    "eval.every=$EVAL_EVERY" "eval.train=$WORK/shards/train" "eval.val=$WORK/shards/val"

say "4/5 simscale export -> timm (model.safetensors + config.json)"
"$PYTHON" -m simscale export "$WORK/run" --out "$WORK/export"
"$PYTHON" -m simscale export "$WORK/run" --out "$WORK/export_random_init" --init

say "5/5 k-NN top-1 (k=20): SIM-pretrained, random init, raw pixels"
"$PYTHON" -m simscale eval knn --model "$WORK/export" --train "$WORK/shards/train" --val "$WORK/shards/val"
"$PYTHON" -m simscale eval knn --model "$WORK/export_random_init" --train "$WORK/shards/train" --val "$WORK/shards/val"
"$PYTHON" -m simscale eval knn --pixels --img-size 32 --train "$WORK/shards/train" --val "$WORK/shards/val"

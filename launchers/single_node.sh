#!/usr/bin/env bash
# SIM pretraining on one node with the DeepSpeed launcher: one process per GPU (or CPU rank).
#
#   launchers/single_node.sh [key.sub=value ...]     (run from the repository root)
#
# Variables (environment):
#   NPROC        processes on this node (default: GPUs from nvidia-smi, 1 without GPUs)
#   PRESET       simscale preset (default: CONFIG's `preset:`, else vit_b16): tiny, vit_s16, vit_b16, ...
#   CONFIG       optional YAML with config overrides (--config)
#   RESUME       auto (default) | none | a checkpoint directory (--resume)
#   RUN_DIR      run directory (passed as run.dir=...; default: the config's run.dir)
#   MASTER_PORT  rendezvous port (default 29500; use a free one per concurrent run)
#   DRY_RUN=1    print the command instead of running it
# All arguments are passed to `simscale train` as config overrides, e.g. optim.batch_size=32.
# Each rank runs `python -m simscale train ...` (--module; the launcher's own Python). The launcher
# sets LOCAL_RANK/RANK/WORLD_SIZE; --no_local_rank keeps `--local_rank=N` out of
# the command line, where it would land before the `train` subcommand.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NPROC=${NPROC:-$(gpu_count)}
if [[ $NPROC -lt 1 ]]; then NPROC=1; fi
MASTER_PORT=${MASTER_PORT:-29500}
simscale_env "$NPROC"
train_args "$@"

# --log_level error: the launcher's INFO lines (its command, CUDA_VISIBLE_DEVICES) and its warning
# that there is no hostfile (one node needs none) read as failures; simscale prints its own summary.
run deepspeed --num_nodes 1 --num_gpus "$NPROC" --master_port "$MASTER_PORT" --log_level error --no_local_rank \
    --module simscale "${TRAIN_ARGS[@]}"

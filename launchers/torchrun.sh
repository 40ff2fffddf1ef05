#!/usr/bin/env bash
# SIM pretraining started by torchrun instead of the DeepSpeed launcher (same training code:
# simscale calls deepspeed.initialize itself and reads RANK/LOCAL_RANK/WORLD_SIZE from torchrun).
#
#   launchers/torchrun.sh [key.sub=value ...]                         one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launchers/torchrun.sh ...   on every node, its rank
#
# Variables (environment):
#   NPROC        processes per node (default: GPUs from nvidia-smi, 1 without GPUs)
#   NNODES       number of nodes (default 1: torchrun --standalone)
#   NODE_RANK    this node's index, 0..NNODES-1 (multi-node only, required there)
#   MASTER_ADDR  address of node 0 (multi-node only, required there)
#   MASTER_PORT  rendezvous port (default 29500)
#   PRESET       simscale preset (default: CONFIG's `preset:`, else vit_b16); CONFIG: optional YAML (--config)
#   RESUME       auto (default) | none | a checkpoint directory
#   RUN_DIR      run directory (run.dir=...)
#   DRY_RUN=1    print the command instead of running it
# All arguments are passed to `simscale train` as config overrides.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NPROC=${NPROC:-$(gpu_count)}
if [[ $NPROC -lt 1 ]]; then NPROC=1; fi
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
simscale_env "$NPROC"
train_args "$@"

cmd=(torchrun --nproc_per_node "$NPROC")
if [[ $NNODES == 1 ]]; then
    cmd+=(--standalone)
else
    : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}"
    : "${MASTER_ADDR:?set MASTER_ADDR to node 0}"
    cmd+=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
run "${cmd[@]}" -m simscale "${TRAIN_ARGS[@]}"

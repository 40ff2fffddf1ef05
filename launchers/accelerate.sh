#!/usr/bin/env bash
# SIM pretraining started by `accelerate launch` with its DeepSpeed plugin config
# (accelerate_deepspeed.yaml beside this script). Run on every node, each with its NODE_RANK.
#
#   launchers/accelerate.sh [key.sub=value ...]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launchers/accelerate.sh ...
#
# Not on CPU: there accelerate counts 1 process where DeepSpeed counts 2 (a batch-size assertion),
# and `Accelerator(cpu=True)` drops DeepSpeed; use single_node.sh there. accelerate only launches; the engine is simscale's own, with
# zero_stage and mixed_precision taken from the YAML and passed on as config overrides (your
# arguments come after them and win).
#
# Variables (environment):
#   ACCELERATE_CONFIG  accelerate config (default: launchers/accelerate_deepspeed.yaml)
#   NPROC        processes per node (default: GPUs from nvidia-smi, 1 without GPUs)
#   NNODES       number of nodes (default 1)
#   NODE_RANK    this node's index (default 0)
#   MASTER_ADDR  address of node 0 (default 127.0.0.1)
#   MASTER_PORT  rendezvous port (default 29500)
#   PRESET       simscale preset (default: CONFIG's `preset:`, else vit_b16); CONFIG: optional YAML (--config)
#   RESUME       auto (default) | none | a checkpoint directory
#   RUN_DIR      run directory (run.dir=...)
#   DRY_RUN=1    print the command instead of running it
# All arguments are passed to `simscale train` as config overrides.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
. "$here/common.sh"

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$here/accelerate_deepspeed.yaml}
if [[ ! -f $ACCELERATE_CONFIG ]]; then echo "error: '$ACCELERATE_CONFIG' not found" >&2; exit 2; fi
NPROC=${NPROC:-$(gpu_count)}
if [[ $NPROC -lt 1 ]]; then NPROC=1; fi
NNODES=${NNODES:-1}
simscale_env "$NPROC"

zero_stage=$(awk '/^[[:space:]]+zero_stage:/ {print $2; exit}' "$ACCELERATE_CONFIG")
precision=$(awk '/^mixed_precision:/ {print $2; exit}' "$ACCELERATE_CONFIG")
case $precision in
    bf16) precision=bf16 ;;
    no | "") precision=fp32 ;;
    *) echo "error: mixed_precision '$precision' in $ACCELERATE_CONFIG: simscale supports bf16 or no" >&2; exit 2 ;;
esac
train_args "deepspeed.zero_stage=${zero_stage:-2}" "deepspeed.precision=$precision" "$@"

run accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NNODES" --num_processes "$(( NNODES * NPROC ))" --machine_rank "${NODE_RANK:-0}" \
    --main_process_ip "${MASTER_ADDR:-127.0.0.1}" --main_process_port "${MASTER_PORT:-29500}" \
    -m simscale "${TRAIN_ARGS[@]}"

#!/usr/bin/env bash
# SIM pretraining on several nodes with the DeepSpeed launcher and a hostfile.
#
# Two modes (run from the repository root, same path and environment on every node):
#   ssh (default)  run once, on the first node: DeepSpeed starts every node over pdsh/ssh
#                  (passwordless ssh to each host, `pdsh` installed for LAUNCHER=pdsh).
#                  HOSTFILE=hosts launchers/multi_node.sh [key.sub=value ...]
#   no-ssh         run on every node yourself (a scheduler, a container platform), each with
#                  its NODE_RANK: DeepSpeed's `--no_ssh --node_rank R --master_addr A`.
#                  HOSTFILE=hosts NODE_RANK=1 MASTER_ADDR=node0 launchers/multi_node.sh ...
#
# Variables (environment):
#   HOSTFILE     DeepSpeed hostfile, one `hostname slots=N` line per node (required)
#   NNODES       use the first NNODES hosts of the hostfile (default: all)
#   NPROC        processes per node (default: the hostfile's slots)
#   NODE_RANK    set it to select the no-ssh mode: this node's index in the hostfile
#   MASTER_ADDR  address of the rank-0 node (default: the first host in HOSTFILE)
#   MASTER_PORT  rendezvous port (default 29500)
#   LAUNCHER     ssh-mode backend: pdsh (default), openmpi, mvapich, slurm, mpich, impi
#   PRESET       simscale preset (default: CONFIG's `preset:`, else vit_b16); CONFIG: optional YAML (--config)
#   RESUME       auto (default) | none | a checkpoint directory
#   RUN_DIR      run directory (run.dir=...; must be on storage shared by all nodes)
#   DRY_RUN=1    print the command instead of running it
# All arguments are passed to `simscale train` as config overrides. Environment variables the
# ranks need on remote nodes in ssh mode go in ./.deepspeed_env (NAME=value lines; DeepSpeed
# reads it); DS_ACCELERATOR and OMP_NUM_THREADS are set by this script only on this node.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (hostname slots=N per line)}"
if [[ ! -f $HOSTFILE ]]; then echo "error: hostfile '$HOSTFILE' not found" >&2; exit 2; fi
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
slots=$(awk '!/^[[:space:]]*(#|$)/ {for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) {sub("slots=", "", $i); print $i; exit}}' "$HOSTFILE")
simscale_env "${NPROC:-${slots:-1}}"
train_args "$@"

# --log_level warning: the launcher's INFO lines off, its hostfile and node warnings kept.
cmd=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --log_level warning)
if [[ -n ${NNODES:-} ]]; then cmd+=(--num_nodes "$NNODES"); fi
if [[ -n ${NPROC:-} ]]; then cmd+=(--num_gpus "$NPROC"); fi
if [[ -n ${NODE_RANK:-} ]]; then
    cmd+=(--no_ssh --node_rank "$NODE_RANK")
else
    cmd+=(--launcher "${LAUNCHER:-pdsh}")
fi
run "${cmd[@]}" --no_local_rank --module simscale "${TRAIN_ARGS[@]}"

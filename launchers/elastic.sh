#!/usr/bin/env bash
# SIM pretraining that restarts itself: torch's elastic agent (torchrun with a c10d rendezvous)
# restarts the whole worker group when a rank fails (a crash, a SIGKILL, a lost node, a preemption
# save that asks for it), up to MAX_RESTARTS times, and every (re)start runs
# `simscale train --resume auto`: it continues from the newest checkpoint every rank verified, on
# whatever world size the rendezvous formed (another size goes through DeepSpeed's universal
# checkpoint). Run the same command on every node; nodes may join and leave between NNODES' bounds.
#
#   launchers/elastic.sh [key.sub=value ...]                                  one node
#   NNODES=2:4 RDZV_ENDPOINT=node0:29400 RUN_DIR=/shared/run launchers/elastic.sh ...   every node
#
# Variables (environment):
#   NPROC          processes per node (default: GPUs from nvidia-smi, 1 without GPUs)
#   NNODES         MIN:MAX nodes (or N) the rendezvous accepts (default 1:1); a lost node ends the
#                  attempt, the next one forms with the nodes left (>= MIN)
#   MAX_RESTARTS   restarts of the worker group before the job fails (default 10)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous store, the same on every node
#                  (default 127.0.0.1:29400; a node that can reach it hosts it when it is its own)
#   RDZV_ID        job id shared by the nodes of one job (default simscale-<run dir name>)
#   RDZV_CONF      extra rendezvous settings (default join_timeout=600,last_call_timeout=15:
#                  how long an attempt waits for MAX nodes after MIN have joined)
#   MONITOR_S      how often the agent checks its workers, seconds (default 1)
#   PRESET, CONFIG, RUN_DIR   as for the other launchers (RUN_DIR on storage every node sees)
#   ENTRY          python module the workers run (default simscale; wrappers and tests set another
#                  that ends in simscale's CLI)
#   DRY_RUN=1      print the command instead of running it
# RESUME is always auto here: that is what makes a restart continue. Preemption (SIGTERM to the
# agent or its workers, or run.stop_file appearing): every rank saves at the next step boundary
# and stops; run.save_every_minutes bounds the work a SIGKILL loses. See README "Runs that heal
# themselves". All arguments are passed to `simscale train` as config overrides.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NPROC=${NPROC:-$(gpu_count)}
if [[ $NPROC -lt 1 ]]; then NPROC=1; fi
NNODES=${NNODES:-1:1}
MAX_RESTARTS=${MAX_RESTARTS:-10}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}
RDZV_CONF=${RDZV_CONF:-join_timeout=600,last_call_timeout=15}
MONITOR_S=${MONITOR_S:-1}
RDZV_ID=${RDZV_ID:-simscale-$(basename "${RUN_DIR:-sim}")}
simscale_env "$NPROC"
# Each attempt gets a store of its own: by default the agent shares one TCPStore with every attempt's
# workers, so a restarted group reads the dead group's gloo/NCCL addresses left in it and fails or
# hangs in connectFullMesh (pytorch/pytorch#135712). With this, every rendezvous round picks a fresh
# MASTER_PORT and rank 0 hosts the store for that attempt.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
RESUME=auto train_args "$@"

run torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --max-restarts "$MAX_RESTARTS" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" --rdzv-conf "$RDZV_CONF" \
    --monitor-interval "$MONITOR_S" -m "${ENTRY:-simscale}" "${TRAIN_ARGS[@]}"

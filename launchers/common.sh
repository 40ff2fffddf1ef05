# Shared by the simscale launchers (sourced, not run). Defines:
#   simscale_env        DS_ACCELERATOR=cpu only when there is no GPU (no nvidia-smi), and
#                       OMP_NUM_THREADS (if unset) = cores / processes per node, at least 1.
#   gpu_count           GPUs on this node (0 without nvidia-smi).
#   train_args ARGS...  fills TRAIN_ARGS: `simscale train` arguments from PRESET, CONFIG, RESUME,
#                       RUN_DIR, then ARGS (key.sub=value overrides; the later ones win).
#   run CMD...          runs CMD (exec), or with DRY_RUN=1 prints it, shell-quoted, on stdout
#                       (and the environment it sets on stderr) and exits 0.

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

simscale_env() {
    local nproc_per_node=${1:-1}
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator (gloo); on GPUs it picks CUDA itself
    fi
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        local cores
        cores=$(nproc 2>/dev/null || echo 1)
        OMP_NUM_THREADS=$(( cores / nproc_per_node > 0 ? cores / nproc_per_node : 1 ))
        export OMP_NUM_THREADS
    fi
}

train_args() {
    # No PRESET: the CONFIG file's `preset:` applies, else simscale's default (vit_b16).
    TRAIN_ARGS=(train)
    if [[ -n ${PRESET:-} ]]; then TRAIN_ARGS+=(--preset "$PRESET"); fi
    TRAIN_ARGS+=(--resume "${RESUME:-auto}")
    if [[ -n ${CONFIG:-} ]]; then TRAIN_ARGS+=(--config "$CONFIG"); fi
    if [[ -n ${RUN_DIR:-} ]]; then TRAIN_ARGS+=("run.dir=$RUN_DIR"); fi
    TRAIN_ARGS+=("$@")
}

run() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        echo "# env: DS_ACCELERATOR=${DS_ACCELERATOR:-} OMP_NUM_THREADS=${OMP_NUM_THREADS:-}" >&2
        printf '%q ' "$@" | sed 's/ $//'
        echo
        exit 0
    fi
    exec "$@"
}

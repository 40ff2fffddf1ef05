#!/usr/bin/env bash
# GPU first contact in one call: install the carried wheels, check every import, then ONE Python
# process (bench/gpu_bench.py): ViT-L/16 SIM bf16 throughput sweep (ZeRO-2/3, activation
# checkpointing on/off, batch 64, 128, ... until OOM), a kernel profile of the best point and
# model.compile on/off at one point (each in a fresh process it starts), a 20-step `simscale train`
# killed and resumed and torch's sync detector over the real Trainer's non-logging steps. At most
# 9 minutes; 3 files under $OUT.
#
#   bash bench/gpu.sh          # on the GPU machine, from the repository root; carry bench/wheels
#   bash bench/gpu.sh --cpu    # the rehearsal: the same lines on CPU (tiny preset, fp32,
#                              # bench/wheels-host); also GPU_BENCH_CPU=1
#
# Wheels: `bash bench/make_wheels.sh` (CPython 3.12, the GPU image's) and
# `bash bench/make_wheels.sh host bench/wheels-host` (this Python, for the rehearsal).
# They go into a fresh temp dir on PYTHONPATH, never into the machine's own environment.
# Files: $OUT/gpu_bench.log (everything printed), $OUT/gpu_bench.json, $OUT/profile.txt.
# Env: OUT (default bench/out), PYTHON (default python3), WHEELS, BENCH_ARGS (more gpu_bench.py args).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[ "${GPU_BENCH_CPU:-0}" = 1 ] && MODE=cpu
for a in "$@"; do
  case "$a" in
    --cpu) MODE=cpu ;;
    *) echo "gpu.sh: unknown argument $a (only --cpu)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-bench/out}
PY=${PYTHON:-python3}
if [ "$MODE" = cpu ]; then
  WHEELS=${WHEELS:-bench/wheels-host}; BUDGET_S=1200; LIMIT_S=1300; ARGS=(--cpu --fake-oom-above 16)
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  WHEELS=${WHEELS:-bench/wheels}; BUDGET_S=460; LIMIT_S=510; ARGS=()
  export DS_ACCELERATOR=cuda
fi
mkdir -p "$OUT"

main() {
start=$(date +%s)
echo "gpu.sh: mode $MODE, $(date -u), $($PY --version 2>&1), wheels from $WHEELS"

# 1. install: --no-index (no registry there), --no-deps (the set is complete: tests/bench/test_wheels.py)
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu.sh: no wheels in $WHEELS: run bench/make_wheels.sh and carry it"; exit 3; }
SITE=$(mktemp -d "${TMPDIR:-/tmp}/simscale_site.XXXXXX")
PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$PWD:$SITE"
export SIMSCALE_NO_PROGRESS=1 PYTHONUNBUFFERED=1
whl=("$WHEELS"/*.whl)
echo "gpu.sh: installed ${#whl[@]} wheels into $SITE in $(( $(date +%s) - start )) s"

# 2. every import, from where it must come, in seconds
timeout 120 "$PY" - "$SITE" "$MODE" <<'EOF'
import sys, time
t0 = time.time()
site, mode = sys.argv[1], sys.argv[2]
import torch, timm, webdataset, deepspeed, pydantic, hjson, simscale
from simscale.train.distributed import check_cuda_usable
for mod in (deepspeed, webdataset, pydantic, hjson):
    assert mod.__file__.startswith(site), f"{mod.__name__} imported from {mod.__file__}, not {site}"
print(f"imports: torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, "
      f"deepspeed {deepspeed.__version__}, webdataset, pydantic {pydantic.VERSION}, simscale {simscale.__file__}")
check_cuda_usable()  # GPUs visible but unusable: one line, exit
if mode == "gpu":
    if not torch.cuda.is_available():
        sys.exit("gpu.sh: torch sees no CUDA device")
    x = torch.ones(1024, 1024, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    print(f"cuda: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
          f"bf16 matmul ok ({float((x @ x)[0, 0])})")
print(f"imports checked in {time.time() - t0:.1f} s")
EOF

# 3. one process: sweep, profile, trainer smoke (its own budget; a hard limit above it)
rc=0
# shellcheck disable=SC2086  # BENCH_ARGS: several words on purpose
timeout -k 10 "$LIMIT_S" "$PY" bench/gpu_bench.py --out "$OUT" --budget-s "$BUDGET_S" "${ARGS[@]}" ${BENCH_ARGS:-} || rc=$?
rm -rf "$SITE"
echo "gpu.sh: rc $rc, $(( $(date +%s) - start )) s in all; $OUT: $(cd "$OUT" && echo *)"
return $rc
}

# everything printed also lands in $OUT/gpu_bench.log (tee ends before the script does)
main 2>&1 | tee "$OUT/gpu_bench.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# ViT-L/16 SIM training steps on one NVIDIA GPU: bf16, with and without activation checkpointing,
# at a few micro-batch sizes; img/s, TFLOP/s, MFU and peak memory per run (bench/step_bench.py).
#
#   bash bench/gpu.sh               # on the GPU machine, from the repository root; < 8 minutes
#   bash bench/gpu.sh --dry-run     # print what it would run, run nothing
#   bash bench/gpu.sh --cpu         # the same script on CPU: tiny preset, fp32 (checks the path)
#
# Installs what is missing first: deepspeed/webdataset/braceexpand/hjson from bench/wheels/*.whl
# (made by bench/make_wheels.sh) when deepspeed does not import, and simscale itself (-e, no deps).
# Each run has its own timeout; an OOM, a timeout or a crash prints one JSON line with "error" and
# the script goes on. Results: one JSON line per run on stdout and in $OUT/gpu_bench.jsonl
# (OUT defaults to bench/out).
# Env: BATCHES="32 64 128", CKPTS="1 0", PER_RUN_S=65, STEPS=6, WARMUP=2,
#      OPTIM=torch_fused (torch.optim.AdamW(fused=True) inside DeepSpeed; OPTIM=simscale uses the
#      trainer's config, i.e. DeepSpeed FusedAdam, which JIT-compiles with nvcc on first use).
set -u
cd "$(dirname "$0")/.."

DRY=0; MODE=gpu
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --cpu) MODE=cpu ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-bench/out}
PER_RUN_S=${PER_RUN_S:-65}
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
OPTIM=${OPTIM:-torch_fused}
if [ "$MODE" = gpu ]; then
  PRESET=vit_l16; PRECISION=bf16; DEVICE=auto
  BATCHES=${BATCHES:-"32 64 128"}; CKPTS=${CKPTS:-"1 0"}
else
  PRESET=tiny; PRECISION=fp32; DEVICE=cpu; OPTIM=simscale
  BATCHES=${BATCHES:-"8 16"}; CKPTS=${CKPTS:-"1 0"}; STEPS=${STEPS:-3}
fi
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # simscale importable even if the editable install fails
JSONL="$OUT/gpu_bench.jsonl"

run() {  # echo, and run unless --dry-run
  echo "+ $*" >&2
  [ "$DRY" = 1 ] || "$@"
}

start=$(date +%s)
if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT"
  if ! $PY -c "import deepspeed" 2>/dev/null; then
    if ls bench/wheels/*.whl >/dev/null 2>&1; then
      run $PY -m pip install -q --no-deps bench/wheels/*.whl
    else
      echo "deepspeed is missing and bench/wheels/ has no wheels (run bench/make_wheels.sh where a registry is reachable)" >&2
      exit 1
    fi
  fi
  $PY -c "import simscale" 2>/dev/null || run $PY -m pip install -q -e . --no-deps --no-build-isolation
  $PY - <<'EOF' >&2
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF
fi

for ckpt in $CKPTS; do
  for b in $BATCHES; do
    log="$OUT/run_${PRESET}_b${b}_ckpt${ckpt}.log"
    cmd=(timeout --kill-after=10 "$PER_RUN_S" "$PY" bench/step_bench.py --device "$DEVICE" --preset "$PRESET"
         --precision "$PRECISION" --batch "$b" --ckpt "$ckpt" --steps "$STEPS" --warmup "$WARMUP"
         --optimizer "$OPTIM" --json "$JSONL")
    if [ "$DRY" = 1 ]; then echo "+ ${cmd[*]}"; continue; fi
    echo "+ ${cmd[*]}" >&2
    "${cmd[@]}" >"$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
      tail -n 1 "$log"
    else
      if grep -qiE "out of memory|OutOfMemoryError" "$log"; then why=oom
      elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then why="timeout ${PER_RUN_S}s"
      else why="rc=$rc: $(grep -E 'Error|error' "$log" | tail -n 1 | tr '"\\' "'/" | cut -c1-200)"; fi
      line="{\"preset\": \"$PRESET\", \"batch\": $b, \"grad_ckpt\": $ckpt, \"precision\": \"$PRECISION\", \"error\": \"$why\"}"
      echo "$line"; echo "$line" >>"$JSONL"
      # an OOM without checkpointing at batch b means larger batches OOM as well: skip them
      [ "$why" = oom ] && break
    fi
  done
done
echo "gpu.sh: $(( $(date +%s) - start )) s in all; results in $JSONL" >&2

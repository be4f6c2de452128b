#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the GPU-only tests, then the decode and training benchmarks (one JSON
# line each). Uses the python3 on PATH with its own torch (no setup: a GPU box keeps its CUDA build) and this checkout
# on PYTHONPATH. Each step has its own time limit, so a hang costs one step; logs go to $OUT (default ./gpu_out).
# Exits non-zero when any step failed (after running the others).
#
#     bash runs/gpu_check.sh            # about 8 minutes on one H100/H200, most of it compiling
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
py=${PYTHON:-python3}
failed=""

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/all.log, print the last lines and rc
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]] && return  # ONLY="tests decode_d6_eager": just those steps
    echo "== $name"
    timeout "$limit" "$@" >"$out/step.log" 2>&1
    local rc=$?
    tail -n 25 "$out/step.log"
    { echo "== $name"; cat "$out/step.log"; } >>"$out/all.log"
    echo "== $name rc=$rc $((SECONDS - t0))s"
    [[ $rc == 0 ]] || failed="$failed $name"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())" 2>/dev/null \
    || { echo "gpu_check: $py sees no CUDA GPU (every step would skip or fail); run this on a GPU machine" >&2; exit 1; }
step tests 200 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_attention.py
d6=(--device cuda --depth 6 --head-dim 64 --vocab-size 8192)
step decode_d6_eager 60 $py benchmarks/decode.py "${d6[@]}" --cuda-graphs false
step decode_d6_eager_graphs 60 $py benchmarks/decode.py "${d6[@]}" --cuda-graphs true
step decode_d6_compiled_graphs 120 $py benchmarks/decode.py "${d6[@]}" --compile
step decode_d20_compiled_graphs 180 $py benchmarks/decode.py --device cuda --depth 20 --head-dim 128 \
    --vocab-size 65536 --max-seq-len 2048 --compile
step train_d12_bf16_compiled 150 $py benchmarks/train.py --device cuda --depth 12 --head-dim 128 --max-seq-len 2048 \
    --device-batch-size 32 --total-batch-size 262144 --dtype bf16 --compile
rm -f "$out/step.log"
if [[ -n "$failed" ]]; then
    echo "failed:$failed" >&2
    exit 1
fi

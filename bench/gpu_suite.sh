#!/usr/bin/env bash
# The GPU suite: on a GPU machine (torch 2.11, Python 3.12, CUDA 13.0, no network), in one
# command that fits the device tool's lease: print what the build will use, build the
# extension there, run the CUDA tests (each test under a time limit), time every
# operator with `aefast bench`, and run compute-sanitizer over a few CUDA tests.
#
#   bash bench/gpu_suite.sh --out DIR        # the full suite, at most 515 s with the build
#   bash bench/gpu_suite.sh --smoke --out DIR  # after a fix, at most 150 s: build, one CUDA
#                                              # test per op and backend, one bench row per op
#   bash bench/gpu_suite.sh --dry-run [--smoke]  # on any machine: check, print the plan and budget
#
# With the device tool: bash bench/gpu_suite.sh --out "$OUT/gpu". Results (at most 7 files,
# one folder): summary.md and suite.log, rewritten after every step, so a run killed at
# any point keeps what finished; bench.json, bench.md, bench.png and gpu_ranking.json from
# `aefast bench`; sae_peer.md from bench/sae_peer.py. Commit them under bench/results/<gpu>-<date>/ and copy gpu_ranking.json
# to aefast/ (`auto` then follows it on GPU). The peer of the `sae` step is not on those
# machines: bench/peer_wheels.sh fetches it as wheels to carry (its header says how).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
DRY=0
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --smoke) SMOKE=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1

missing=0
need() {  # need DESCRIPTION COMMAND...: a prerequisite, checked in both modes
  if "${@:2}" >/dev/null 2>&1; then echo "  ok       $1"; else echo "  MISSING  $1"; missing=1; fi
}
echo "== prerequisites"
need "python ($PY) with torch" "$PY" -c "import torch"
need "pytest and pytest-timeout" "$PY" -c "import pytest, pytest_timeout"
need "setuptools, ninja, pybind11 (the build runs with --no-build-isolation --no-deps)" \
  "$PY" -c "import setuptools, ninja, pybind11"
need "scikit-learn, scipy, matplotlib, tqdm (data, statistics, figures and progress of the tests)" "$PY" -c "import sklearn, scipy, matplotlib, tqdm"
need "tests/, collected with the suite's pytest options (--timeout: pytest-timeout)" \
  "$PY" -m pytest -q -p no:cacheprovider --timeout=60 --collect-only tests/test_backends.py
# aefast is not installed yet on a fresh machine: import it from the checkout.
need "aefast bench parses its arguments" env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m aefast bench --help
if [ "$DRY" = 0 ]; then
  need "a CUDA device visible to torch" "$PY" -c "import torch; assert torch.cuda.is_available()"
  need "nvcc" command -v nvcc
  need "triton" "$PY" -c "import triton"
fi
SANITIZER=$(command -v compute-sanitizer || true)
echo "  ${SANITIZER:+ok      }${SANITIZER:-absent  } compute-sanitizer (its step is skipped when absent)"
[ "$missing" = 0 ] || { echo "gpu_suite: prerequisites missing (above)" >&2; exit 2; }

if [ -z "$OUT" ] && [ "$DRY" = 1 ]; then
  OUT="bench/results/<gpu>-$(date +%F)"
elif [ -z "$OUT" ]; then  # aefast bench's folder rule: a later run of the day gets a folder of its own
  OUT=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    "import torch; from aefast.bench.harness import results_dir; print(results_dir(torch.device('cuda')))") || exit 2
fi

# Tests that need a GPU: those parametrized with device cuda (the emulated CUDA, the
# Triton compile check and the nvcc compile check run in CI, not here).
CPU_ONLY="--ignore=tests/test_cuda_emulated.py --ignore=tests/test_triton_compile.py --ignore=tests/test_cuda_sources.py"
PYTEST="$PY -m pytest -q -p no:cacheprovider -rs --timeout=90 $CPU_ONLY"
# The CUDA tests in 8 processes where pytest-xdist is there (one process took over 125 s:
# Triton compiles each kernel on the CPU), each test's name logged as it ends (-v), so a
# run cut short still says which failed.
XDIST=$("$PY" -c "import xdist" >/dev/null 2>&1 && echo "-n 8")
TESTS="$PY -m pytest -v -p no:cacheprovider -rs --timeout=90 $XDIST $CPU_ONLY tests -k cuda"
BUILD="MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . && $PY -m aefast info"
DEVICE="nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
$PY -c 'import torch, triton, sys; from torch.utils.cpp_extension import CUDA_HOME; \
print(\"torch\", torch.__version__, \"built with CUDA\", torch.version.cuda, \"| triton\", triton.__version__, \"| python\", sys.version.split()[0]); \
print(\"the build will use CUDA_HOME =\", CUDA_HOME); p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, \"SMs\")'; \
echo \"nvcc: \$(command -v nvcc) (\$(nvcc --version | tail -1))\""
BENCH="$PY -m aefast bench --device cuda --out $OUT"
RANKING="$PY -m aefast.bench.ranking $OUT/bench.json $OUT/gpu_ranking.json"
# Issue 14's GPU size: a TopKSAE training step (against sparsify where it is installed;
# these machines have no network, so usually aefast alone) and topk_encode against
# F.linear + torch.topk.
SAE="$PY bench/sae_peer.py --device cuda --dtype bfloat16 --rows 4096 --width 2048 --latents 65536 --k 32 --steps 10 --repeats 1 --out $OUT/sae_peer.md"
# Every family's CUDA kernels, each op checked once (opcheck): the smoke tests and the sanitizer's run.
FAMILIES="tests/test_kl.py tests/test_noise.py tests/test_topk.py tests/test_decode.py tests/test_jumprelu.py"
OPCHECKS="$FAMILIES -k 'cuda and opcheck'"
# The sanitizer checks the CUDA kernels alone: with the Triton ones too it ran out of 60 s
# (Triton compiles each kernel under it) with no result.
SANITIZE="PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${SANITIZER:-compute-sanitizer} --tool memcheck --error-exitcode 1 $PYTEST $FAMILIES -k 'cuda and opcheck and not triton'"

# name|seconds|command: each step under its own limit; the limits add up to the budget.
if [ "$SMOKE" = 1 ]; then
  STEPS=(
    "device|10|$DEVICE"
    "build|100|$BUILD"
    "tests|25|$PYTEST $OPCHECKS"
    "bench|15|$BENCH --size small --mode forward+backward --no-compile --rounds 1"
  )
  BUDGET=150
else
  STEPS=(
    "device|10|$DEVICE"
    "build|100|$BUILD"
    "tests|130|$TESTS"
    "bench|125|$BENCH --no-compile --rounds 3 && $RANKING"
    "sae|75|$SAE"
    "sanitizer|75|$SANITIZE"
  )
  BUDGET=515
fi

total=0
for s in "${STEPS[@]}"; do IFS='|' read -r _ limit _ <<<"$s"; total=$((total + limit)); done
[ "$total" -le "$BUDGET" ] || { echo "gpu_suite: the steps' limits add up to ${total}s, over the ${BUDGET}s budget" >&2; exit 2; }

if [ "$DRY" = 1 ]; then
  echo "== dry run: would write results to $OUT/ and run, each under a time limit (${total}s of ${BUDGET}s):"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    printf '  %-9s (%3ss) %s\n' "$name" "$limit" "$cmd"
  done
  echo "gpu_suite: dry run passed"
  exit 0
fi

mkdir -p "$OUT"
summary="$OUT/summary.md"
log="$OUT/suite.log"
: >"$log"
rows=""
write_summary() {  # rewritten after every step: a run killed later keeps what finished
  { echo "# GPU suite$([ "$SMOKE" = 1 ] && echo ' (smoke)'), $(date -Iseconds)"; echo
    echo "| step | status | seconds | limit |"; echo "|---|---|---:|---:|"; printf '%s' "$rows"
    echo; grep -E '^(FAILED|ERROR)|passed|failed' "$log" | tail -n 25 | sed 's/^/    /'
    [ -f "$OUT/bench.md" ] && { echo; cat "$OUT/bench.md"; }
  } >"$summary.tmp" && mv "$summary.tmp" "$summary"
}
status=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  if [ "$name" = sanitizer ] && [ -z "$SANITIZER" ]; then
    rows+="| $name | skipped (no compute-sanitizer) | 0 | $limit |"$'\n'; write_summary; continue
  fi
  echo "== $name (limit ${limit}s): $cmd" | tee -a "$log"
  start=$SECONDS
  timeout "$limit" bash -c "$cmd" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    result=pass
  elif [ "$name" = sanitizer ] && tail -n 40 "$log" | grep -qiE 'device not supported|not supported on this|error 999|unable to|could not'; then
    result="refused by this device (not a failure): $(tail -n 40 "$log" | grep -iE 'not supported|error|unable|could not' | head -1 | cut -c1-120)"
  else
    result="FAIL (exit $rc$([ "$rc" = 124 ] && echo ', time limit'))"; status=1
  fi
  rows+="| $name | $result | $((SECONDS - start)) | $limit |"$'\n'
  write_summary
done
cat "$summary"
exit "$status"

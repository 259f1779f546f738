#!/usr/bin/env bash
# Run fastkd's CUDA tests under NVIDIA compute-sanitizer: memcheck (out-of-bounds / misaligned
# accesses, device leaks), racecheck (shared-memory hazards), initcheck (reads of uninitialised
# global memory) and synccheck (invalid barrier use).
#
#   scripts/sanitize.sh [OUTDIR] [-- extra pytest args]
#
# OUTDIR (default benchmarks/results) receives sanitizer-<date>.log, the summary (one line per
# tool: status, error count, seconds), and sanitizer-<date>-<tool>.log, each tool's full report.
# By default the tests are the cuda backend params of the test suite (pytest -k "cuda and not
# triton": the ids of the cuda backend params contain "cuda");
# pass your own selection after "--", e.g.  scripts/sanitize.sh out -- tests/test_logit.py -k cuda
# Environment: FASTKD_SANITIZE_TOOLS="memcheck racecheck" to run a subset; COMPUTE_SANITIZER to
# point at the binary (default: on PATH, else $CUDA_HOME/bin, else /usr/local/cuda/bin).
#
# Exit status: 0 when every tool ran clean; 1 when a tool reported an error or the tests failed
# under it; 2 for a usage/setup error. Without a GPU it prints why and exits 0 (nothing to check);
# set FASTKD_SANITIZE_REQUIRE_GPU=1 to make that exit 3 instead.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="benchmarks/results"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
  OUTDIR="$1"
  shift
fi
PYTEST_ARGS=()
if [ $# -gt 0 ]; then
  if [ "$1" != "--" ]; then
    echo "usage: $0 [OUTDIR] [-- pytest args]" >&2
    exit 2
  fi
  shift
  PYTEST_ARGS=("$@")
fi
if [ ${#PYTEST_ARGS[@]} -eq 0 ]; then
  PYTEST_ARGS=(tests -k "cuda and not triton")
fi
TOOLS=(${FASTKD_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck})

cd "$ROOT"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
PY="${PYTHON:-python}"

skip() {
  echo "sanitize.sh: SKIPPED - $1"
  if [ "${FASTKD_SANITIZE_REQUIRE_GPU:-0}" = "1" ]; then exit 3; fi
  exit 0
}

# ---- prerequisites ------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  skip "no NVIDIA GPU visible (nvidia-smi missing or lists no device); the sanitizers need one"
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  skip "torch sees no CUDA device (torch.cuda.is_available() is False)"
fi
if ! "$PY" -c "import sys, fastkd._ext as e; sys.exit(0 if e._C is not None and e._C.built_with_cuda() else 1)" 2>/dev/null; then
  echo "sanitize.sh: fastkd was built without its CUDA kernels; rebuild with a CUDA toolkit" >&2
  exit 2
fi
SAN="${COMPUTE_SANITIZER:-}"
if [ -z "$SAN" ]; then
  for c in "$(command -v compute-sanitizer 2>/dev/null || true)" \
           "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then SAN="$c"; break; fi
  done
fi
if [ -z "$SAN" ] || [ ! -x "$SAN" ]; then
  echo "sanitize.sh: compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 2
fi
HELP="$("$SAN" --help 2>&1 || true)"
has_flag() { grep -q -- "$1" <<<"$HELP"; }

mkdir -p "$OUTDIR"
STAMP="$(date +%Y%m%d-%H%M%S)"
SUMMARY="$OUTDIR/sanitizer-$STAMP.log"
{
  echo "# fastkd compute-sanitizer run, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# sanitizer: $SAN ($("$SAN" --version 2>/dev/null | tail -n 1))"
  echo "# gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)"
  echo "# torch: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  echo "# pytest args: ${PYTEST_ARGS[*]}"
} >"$SUMMARY"

# The caching allocator hides out-of-bounds accesses inside its pooled blocks and keeps memory
# that initcheck would flag: let every tensor be its own cudaMalloc.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
# The error exit code marks "the sanitizer found something" apart from test failures.
ERR_CODE=86
STATUS=0
for tool in "${TOOLS[@]}"; do
  case "$tool" in
    memcheck|racecheck|initcheck|synccheck) ;;
    *) echo "sanitize.sh: unknown tool $tool" >&2; exit 2 ;;
  esac
  LOG="$OUTDIR/sanitizer-$STAMP-$tool.log"
  ARGS=(--tool "$tool" --error-exitcode "$ERR_CODE" --log-file "$LOG" --print-limit 200)
  has_flag "--target-processes" && ARGS+=(--target-processes all)
  if [ "$tool" = "memcheck" ] && has_flag "--leak-check"; then ARGS+=(--leak-check full); fi
  if [ "$tool" = "racecheck" ] && has_flag "--racecheck-report"; then
    ARGS+=(--racecheck-report all)
  fi
  echo "== $tool: $SAN ${ARGS[*]} $PY -m pytest ${PYTEST_ARGS[*]}"
  start=$(date +%s)
  "$SAN" "${ARGS[@]}" "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}"
  rc=$?
  secs=$(( $(date +%s) - start ))
  # "ERROR SUMMARY: N errors" (one per target process); sum them.
  errors=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$LOG" 2>/dev/null | awk '{s += $3} END {print s + 0}')
  if [ "$rc" -eq 0 ] && [ "$errors" -eq 0 ]; then
    verdict="clean"
  elif [ "$rc" -eq 5 ]; then
    verdict="FAILED (pytest collected no tests: is this a CUDA build with a GPU?)"
    STATUS=1
  elif [ "$rc" -eq "$ERR_CODE" ] || [ "$errors" -gt 0 ]; then
    verdict="FAILED ($errors sanitizer errors)"
    STATUS=1
  else
    verdict="FAILED (tests exited $rc under the sanitizer)"
    STATUS=1
  fi
  printf '%-10s %-60s errors=%-5s %6ss  %s\n' "$tool" "$verdict" "$errors" "$secs" "$LOG" \
    | tee -a "$SUMMARY"
done
echo "summary: $SUMMARY"
exit "$STATUS"

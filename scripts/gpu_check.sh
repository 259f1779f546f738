#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (and the device image: torch with CUDA, triton,
# nvcc, compute-sanitizer, pytest; no package registry):
#
#   scripts/gpu_check.sh [--dry-run] OUTDIR
#
#  1. build      the extension for this GPU's architecture (pip install --no-build-isolation
#                --no-deps -e .); Liger-Kernel from a wheel carried in .whl/ (or
#                $FASTKD_WHEEL_DIR) when it is not installed: pip install --no-index --no-deps
#  2. in parallel, each under its own timeout:
#     gpu-tests  the test suite's CUDA and Triton cases (pytest -k "cuda or triton or gpu")
#     memcheck, racecheck, synccheck
#                compute-sanitizer on every CUDA kernel once, small inputs (scripts/gpu_cases.py)
#     mixed      kernels, vocabularies, teacher counts and dtypes mixed in one process, on every
#                GPU, each case's kernels checked with the profiler
#     large      KDLoss with N * V > 2^31 (N = 32768, V = 128256, bf16) vs chunked float32 torch
#  3. bench      python -m fastkd.bench --device cuda --sizes full, one suite at a time (logit,
#                fused-linear, feature, relation, topk) into one results file, each suite with a share
#                of the time left; a suite stopped by its timeout keeps what it measured
#
# Everything fits FASTKD_GPU_CHECK_BUDGET seconds of wall time (default 480: 8 minutes); a step
# that hangs only loses its own time. OUTDIR (new or empty) receives at most 8 files:
#   gpu-check-summary.md / .json   pass/fail, wall time and a one-line result per step
#   gpu-check.log                  every step's output, concatenated
#   bench.json / .md / .png        the benchmark results
# Exit status: 0 every step passed; 1 a step failed or timed out; 2 usage or setup error.
#
# FASTKD_GPU_CHECK_STUB=DIR (tests/test_gpu_check.py) replaces each step's command with the
# executable DIR/<step> (DIR/bench <suite> for the bench steps) and skips the GPU checks, so the
# orchestration (timeouts, parallel phase, time shares, summary, OUTDIR contract) runs anywhere;
# FASTKD_GPU_CHECK_CAPS="step=seconds ..." overrides step caps, FASTKD_GPU_CHECK_BENCH_MIN the
# smallest bench share.
#
# Without a GPU (or with --dry-run) it runs nothing on a GPU: it says so, checks that the real
# run would work (this script's syntax, the case driver and its coverage of every kernel in
# benchmarks/results/resources-cuda.json, the cases on the cpu backend, the benchmark and
# pytest command lines, the tools it needs), prints the plan, writes the summary and exits 0
# (1 if a check fails).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/scripts/gpu_check.sh"
CASES="scripts/gpu_cases.py"

usage() { echo "usage: $0 [--dry-run] OUTDIR" >&2; exit 2; }
DRY=0
OUTDIR=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,36p' "$SELF"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$OUTDIR" ] || usage; OUTDIR="$a" ;;
  esac
done
[ -n "$OUTDIR" ] || usage
cd "$ROOT"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
if [ -n "$(ls -A "$OUTDIR")" ]; then
  echo "gpu_check.sh: $OUTDIR is not empty (it must hold only this run's files)" >&2
  exit 2
fi

BUDGET="${FASTKD_GPU_CHECK_BUDGET:-480}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
# Step caps (seconds). The parallel steps run together, so the phase takes the largest cap.
declare -A CAP=([build]=200 [gpu-tests]=170 [memcheck]=170 [racecheck]=170 [synccheck]=170
                [mixed]=120 [large]=150)
PARALLEL=(gpu-tests memcheck racecheck synccheck mixed large)
BENCH_SUITES=(logit fused-linear feature relation topk)
declare -A BENCH_WEIGHT=([logit]=4 [fused-linear]=3 [feature]=2 [relation]=2 [topk]=2)
BENCH_MIN="${FASTKD_GPU_CHECK_BENCH_MIN:-20}"  # a bench suite with less time is skipped
KILL_GRACE=20     # seconds between the timeout's SIGINT and SIGKILL (bench saves on SIGINT)
OUT_FILES=(gpu-check-summary.md gpu-check-summary.json gpu-check.log bench.json bench.md
           bench.png)
MAX_FILES=8
STEPS=(build "${PARALLEL[@]}" "${BENCH_SUITES[@]/#/bench-}")
for kv in ${FASTKD_GPU_CHECK_CAPS:-}; do CAP[${kv%%=*}]="${kv#*=}"; done
STUB="${FASTKD_GPU_CHECK_STUB:-}"

LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/fastkd-gpu-check.XXXXXX")"
trap 'rm -rf "$LOGDIR"' EXIT
declare -A STATUS DETAIL SECS

# ---- tools --------------------------------------------------------------------------------
pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for c in python3 python "$ROOT/.venv/bin/python"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then
      echo "$c"; return
    fi
  done
  echo python3
}
PY="$(pick_python)"
find_tool() {  # $1: name; in $CUDA_HOME/bin, else /usr/local/cuda/bin, else on PATH
  local c
  for c in "${CUDA_HOME:-/nonexistent}/bin/$1" "/usr/local/cuda/bin/$1" \
           "$(command -v "$1" 2>/dev/null || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}
SAN="$(find_tool compute-sanitizer || true)"
NVCC="$(find_tool nvcc || true)"
liger_wheel() {
  local d
  for d in "${FASTKD_WHEEL_DIR:-}" "$ROOT/.whl"; do
    [ -n "$d" ] && [ -d "$d" ] || continue
    ls "$d"/liger_kernel-*.whl 2>/dev/null | sort | tail -n 1
    return 0
  done
}
LIGER_WHEEL="$(liger_wheel)"
has_liger() { "$PY" -c "import liger_kernel" >/dev/null 2>&1; }

have_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU" &&
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

# The GPU test selection: every test whose id or marks say cuda, triton or gpu; modules that
# only run on the CPU (CUDA emulation, ahead-of-time compiles, this script) are left out.
pytest_args() {
  local f
  PYTEST_ARGS=(tests -q -p no:cacheprovider -k "cuda or triton or gpu")
  for f in tests/test_cuda_emulated.py tests/test_*resources*.py tests/test_*aot*.py \
           tests/test_gpu_check.py; do
    [ -e "$f" ] && PYTEST_ARGS+=("--ignore=$f")
  done
}
pytest_args

# ---- steps --------------------------------------------------------------------------------
now() { date +%s; }
left() { echo $((DEADLINE - $(now))); }

# run_step NAME CAP CMD...: CMD under `timeout` (SIGINT at min(CAP, time left), SIGKILL
# KILL_GRACE later); output to $LOGDIR/NAME.log; rc and seconds to $LOGDIR/NAME.{rc,secs}.
run_step() {
  local name="$1" cap="$2"; shift 2
  local t0 rc lim
  lim=$(( cap < $(left) ? cap : $(left) ))
  {
    echo "===== $name: $* (timeout ${lim}s)"
    if [ "$(left)" -lt 5 ]; then
      echo "no time left"; echo 125 >"$LOGDIR/$name.rc"; echo 0 >"$LOGDIR/$name.secs"
      return
    fi
    t0=$(now)
    if [ -n "$STUB" ]; then  # the stub of this step, with the real command's last argument
      if [[ "$name" == bench-* ]]; then set -- "$STUB/bench" "${name#bench-}"; else set -- "$STUB/$name"; fi
    fi
    timeout --signal=INT --kill-after="$KILL_GRACE" "$lim" "$@"
    rc=$?
    echo "===== $name: exit $rc after $(( $(now) - t0 ))s"
    echo "$rc" >"$LOGDIR/$name.rc"
    echo $(( $(now) - t0 )) >"$LOGDIR/$name.secs"
  } >"$LOGDIR/$name.log" 2>&1
}

# verdict NAME: STATUS / DETAIL / SECS of a finished step from its log.
verdict() {
  local name="$1" rc log errs
  log="$LOGDIR/$name.log"
  rc="$(cat "$LOGDIR/$name.rc" 2>/dev/null || echo 125)"
  SECS[$name]="$(cat "$LOGDIR/$name.secs" 2>/dev/null || echo 0)"
  case "$rc" in
    0) STATUS[$name]="pass" ;;
    124|130|137) STATUS[$name]="TIMEOUT" ;;
    125) STATUS[$name]="skipped" ;;
    *) STATUS[$name]="FAIL" ;;
  esac
  case "$name" in
    memcheck|racecheck|synccheck)
      errs=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$log" 2>/dev/null | awk '{s += $3} END {print s + 0}')
      DETAIL[$name]="$errs sanitizer errors; $(grep -c '^PASS' "$log") cases passed, $(grep -c '^FAIL' "$log") failed"
      if [ "$errs" -gt 0 ]; then STATUS[$name]="FAIL"; fi ;;
    gpu-tests)
      DETAIL[$name]="$(grep -E '(passed|failed|error|no tests ran)' "$log" | grep -E ' in [0-9.]+s' | tail -n 1)" ;;
    mixed)
      DETAIL[$name]="$(grep -c '^PASS' "$log") cases passed, $(grep -c '^FAIL' "$log") failed; $(grep -m 1 '^FAIL' "$log")" ;;
    large)
      DETAIL[$name]="$(grep -E '^(PASS|FAIL) large' "$log" | tail -n 1)" ;;
    build)
      DETAIL[$name]="$(grep -E '^(built|Liger|liger)' "$log" | tr '\n' ' ')" ;;
    bench-*)
      DETAIL[$name]="$(grep -cE '^\| ' "$log") table rows; $(grep -m 1 -E 'interrupted|skipped|Error' "$log")" ;;
  esac
  [ "${STATUS[$name]}" = "skipped" ] && DETAIL[$name]="$(grep -m 1 -E '^(no time left|skipped)' "$log")"
}

build_cmd() {
  set -e
  local arch
  arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")"
  echo "building for sm_${arch/./} with $(nproc) jobs"
  TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
    CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
  "$PY" -c "import sys, fastkd._ext as e; sys.exit(0 if e._C is not None and e._C.built_with_cuda() else 1)" \
    || { echo "fastkd was built without its CUDA kernels"; return 1; }
  echo "built fastkd with CUDA kernels for sm_${arch/./}"
  if has_liger; then
    echo "Liger-Kernel $("$PY" -c 'import liger_kernel, importlib.metadata as m; print(m.version("liger-kernel"))' 2>/dev/null) already installed"
  elif [ -n "$LIGER_WHEEL" ]; then
    "$PY" -m pip install --no-index --no-deps "$LIGER_WHEEL"
    echo "Liger-Kernel installed from $LIGER_WHEEL"
  else
    echo "Liger-Kernel: not installed and no wheel in .whl/ or \$FASTKD_WHEEL_DIR; the bench runs without it"
  fi
}

sanitize_cmd() {  # $1: tool. Without the caching allocator every tensor is its own
  # allocation, so an access past a tensor's end is outside any allocation and memcheck sees it.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$1" --error-exitcode 86 --print-limit 100 \
    "$PY" "$CASES" --run
}

bench_cmd() {  # $1: suite
  "$PY" -m fastkd.bench --device cuda --sizes full --suite "$1" --out "$OUTDIR" --name bench \
    --merge
}

# ---- summary --------------------------------------------------------------------------------
write_summary() {  # $1: mode line
  local md="$OUTDIR/gpu-check-summary.md" js="$OUTDIR/gpu-check-summary.json" s first=1
  {
    echo "# fastkd GPU check"
    echo
    echo "- $1"
    echo "- $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(now) - START )) s of a ${BUDGET} s budget"
    echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 3 | tr '\n' ';' || true)"
    echo "- python: $PY; $("$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo 'torch not importable')"
    echo "- nvcc: ${NVCC:-not found}; compute-sanitizer: ${SAN:-not found}; Liger-Kernel wheel: ${LIGER_WHEEL:-none}"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
    echo
    echo "| step | status | wall s | cap s | result |"
    echo "|---|---|---:|---:|---|"
    for s in "${STEPS[@]}"; do
      echo "| $s | ${STATUS[$s]:-not run} | ${SECS[$s]:-} | ${CAP[$s]:-rest} | ${DETAIL[$s]:-} |"
    done
  } >"$md"
  {
    printf '{"mode": "%s", "budget_s": %s, "wall_s": %s, "steps": [' "$1" "$BUDGET" "$(( $(now) - START ))"
    for s in "${STEPS[@]}"; do
      [ $first -eq 1 ] || printf ', '
      first=0
      "$PY" -c 'import json, sys; a = sys.argv[1:]; print(json.dumps({"step": a[0], "status": a[1], "wall_s": int(a[2] or 0), "result": a[3]}), end="")' \
        "$s" "${STATUS[$s]:-not run}" "${SECS[$s]:-0}" "${DETAIL[$s]:-}" 2>/dev/null \
        || printf '{"step": "%s"}' "$s"
    done
    printf ']}\n'
  } >"$js"
}

concat_logs() {
  local s
  for s in "${STEPS[@]}" dry-run; do
    [ -f "$LOGDIR/$s.log" ] && cat "$LOGDIR/$s.log"
  done >"$OUTDIR/gpu-check.log"
}

check_files() {  # the OUTDIR contract: at most MAX_FILES files, all of them planned
  local f n=0 bad=0
  for f in "$OUTDIR"/* ; do
    [ -e "$f" ] || continue
    n=$((n + 1))
    if ! printf '%s\n' "${OUT_FILES[@]}" | grep -qx "$(basename "$f")"; then
      echo "unplanned file in OUTDIR: $(basename "$f")"; bad=1
    fi
  done
  if [ "$n" -gt "$MAX_FILES" ]; then echo "$n files in OUTDIR (at most $MAX_FILES)"; bad=1; fi
  return $bad
}

print_plan() {
  local s
  echo "plan: budget ${BUDGET}s"
  echo "plan: step build cap=${CAP[build]}s"
  for s in "${PARALLEL[@]}"; do echo "plan: step $s cap=${CAP[$s]}s parallel"; done
  for s in "${BENCH_SUITES[@]}"; do echo "plan: step bench-$s share=${BENCH_WEIGHT[$s]} of the time left"; done
  for s in "${OUT_FILES[@]}"; do echo "plan: file $s"; done
}

# ---- dry run ----------------------------------------------------------------------------------
dry_run() {
  local fails=0 why="$1"
  echo "gpu_check.sh: $why: dry run (nothing runs on a GPU)"
  print_plan
  {
    check() {  # check LABEL CMD...
      local label="$1"; shift
      if out="$("$@" 2>&1)"; then
        echo "ok      $label"
      else
        echo "FAILED  $label"; echo "$out" | tail -n 20 | sed 's/^/        /'; fails=$((fails + 1))
      fi
    }
    check "bash -n scripts/gpu_check.sh" bash -n "$SELF"
    check "python ($PY) imports torch" "$PY" -c "import torch"
    check "case driver builds its case list" "$PY" "$CASES" --list
    check "every kernel in resources-cuda.json has a case" \
      "$PY" "$CASES" --check-coverage benchmarks/results/resources-cuda.json
    if "$PY" -c "import sys, fastkd; sys.exit(0 if fastkd.available_backends()['cpu']['available'] else 1)" 2>/dev/null; then
      check "the cases pass on the cpu backend" timeout 300 "$PY" "$CASES" --run --cpu
      check "the mixed sequence passes on the cpu backend" timeout 300 "$PY" "$CASES" --mixed --cpu
    else
      echo "note    fastkd's cpu backend is not built: the cases were not run on the CPU"
    fi
    check "bench command line (--dry-run)" timeout 120 "$PY" -m fastkd.bench --device cpu \
      --sizes full --suite all --out "$LOGDIR/bench-dry" --name bench --merge --dry-run
    check "pytest selection collects" timeout 300 "$PY" -m pytest --collect-only \
      "${PYTEST_ARGS[@]}"
    check "pip available" "$PY" -m pip --version
    check "timeout available" timeout --version
    local t
    for t in nvidia-smi compute-sanitizer nvcc; do
      if [ "$t" = nvidia-smi ]; then p="$(command -v nvidia-smi || true)"; else p="$(find_tool "$t" || true)"; fi
      echo "tool    $t: ${p:-not found (needed on the GPU machine)}"
    done
    if has_liger; then echo "tool    Liger-Kernel: installed"
    else echo "tool    Liger-Kernel: ${LIGER_WHEEL:-not installed, no wheel in .whl/: the bench would run without it}"
    fi
    echo "dry run: $fails check(s) failed"
    [ "$fails" -eq 0 ]
  } 2>&1 | tee "$LOGDIR/dry-run.log"
  local rc=${PIPESTATUS[0]}
  for s in "${STEPS[@]}"; do STATUS[$s]="not run (dry run)"; done
  write_summary "dry run ($why); checks: $(grep -c '^ok' "$LOGDIR/dry-run.log") ok, $(grep -c '^FAILED' "$LOGDIR/dry-run.log") failed"
  concat_logs
  check_files || rc=1
  echo "summary: $OUTDIR/gpu-check-summary.md"
  return "$rc"
}

if [ "$DRY" -eq 1 ]; then dry_run "--dry-run given"; exit $?; fi
if [ -z "$STUB" ] && ! have_gpu; then
  dry_run "no NVIDIA GPU visible (nvidia-smi / torch.cuda)"; exit $?
fi

# ---- the real run -------------------------------------------------------------------------------
# The steps run as `timeout ... bash -c <function>`: export what they use.
export PY NVCC SAN CASES OUTDIR LIGER_WHEEL
export -f build_cmd has_liger sanitize_cmd bench_cmd
print_plan
if [ -n "$STUB" ]; then
  echo "gpu_check.sh: steps stubbed by $STUB"
  SAN="${SAN:-stub}"
else
  if [ -z "$SAN" ]; then echo "gpu_check.sh: compute-sanitizer not found" >&2; fi
  if [ -z "$NVCC" ]; then echo "gpu_check.sh: nvcc not found (set CUDA_HOME)" >&2; exit 2; fi
fi
echo "== build (cap ${CAP[build]}s)"
run_step build "${CAP[build]}" bash -c build_cmd
verdict build
echo "   ${STATUS[build]} (${SECS[build]}s) ${DETAIL[build]}"

if [ "${STATUS[build]}" = "pass" ]; then
  echo "== ${PARALLEL[*]} in parallel"
  run_step gpu-tests "${CAP[gpu-tests]}" "$PY" -m pytest "${PYTEST_ARGS[@]}" &
  for tool in memcheck racecheck synccheck; do
    if [ -n "$SAN" ]; then
      run_step "$tool" "${CAP[$tool]}" bash -c 'sanitize_cmd "$1"' _ "$tool" &
    else
      { echo "skipped: compute-sanitizer not found"; echo 125 >"$LOGDIR/$tool.rc"; } >"$LOGDIR/$tool.log" &
    fi
  done
  run_step mixed "${CAP[mixed]}" "$PY" "$CASES" --mixed &
  run_step large "${CAP[large]}" "$PY" "$CASES" --large &
  wait
  for s in "${PARALLEL[@]}"; do
    verdict "$s"
    echo "   $s: ${STATUS[$s]} (${SECS[$s]}s) ${DETAIL[$s]}"
  done

  remaining_weight=0
  for s in "${BENCH_SUITES[@]}"; do remaining_weight=$((remaining_weight + BENCH_WEIGHT[$s])); done
  for s in "${BENCH_SUITES[@]}"; do
    avail=$(( $(left) - KILL_GRACE - 10 ))
    share=$(( avail * BENCH_WEIGHT[$s] / remaining_weight ))
    remaining_weight=$((remaining_weight - BENCH_WEIGHT[$s]))
    if [ "$share" -lt "$BENCH_MIN" ]; then
      { echo "skipped: ${share}s left for it (< ${BENCH_MIN}s)"; echo 125 >"$LOGDIR/bench-$s.rc"; } >"$LOGDIR/bench-$s.log"
    else
      echo "== bench $s (${share}s)"
      run_step "bench-$s" "$share" bash -c 'bench_cmd "$1"' _ "$s"
    fi
    verdict "bench-$s"
    # A suite stopped by its time share keeps its measurements: not a failure of the check.
    [ "${STATUS[bench-$s]}" = "TIMEOUT" ] && STATUS[bench-$s]="partial (time share)"
    echo "   bench-$s: ${STATUS[bench-$s]} (${SECS[bench-$s]}s)"
  done
else
  for s in "${PARALLEL[@]}" "${BENCH_SUITES[@]/#/bench-}"; do STATUS[$s]="not run (build failed)"; done
fi

write_summary "${STUB:+stubbed }GPU run"
concat_logs
RC=0
for s in "${STEPS[@]}"; do
  case "${STATUS[$s]:-}" in pass|"partial (time share)") ;; *) RC=1 ;; esac
done
check_files || RC=1
cat "$OUTDIR/gpu-check-summary.md"
exit "$RC"

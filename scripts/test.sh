#!/usr/bin/env bash
# Build fastkd from source into .venv (first run: installs torch, ~2 min; compiles the C++ and,
# when a CUDA toolkit is present, the CUDA kernels, ~4 min) and run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
if [ "${FASTKD_REQUIRE_CUDA_BUILD:-0}" = "1" ]; then
  # CI: a CUDA toolkit is present, so the CUDA kernels must have been compiled in.
  python -c "import sys, fastkd._ext as e; sys.exit(0 if e._C is not None and e._C.built_with_cuda() else 1)" \
    || { echo "the CUDA kernels were not built although CUDA_HOME=${CUDA_HOME:-}"; exit 1; }
fi
cd "$ROOT"
set +e
python -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"; exit 1
fi
exit "$rc"

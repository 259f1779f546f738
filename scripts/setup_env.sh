#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and build fastkd into it from source.
# Sourced by scripts/test.sh and scripts/bench.sh; safe to run again (only rebuilds what changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTKD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
  # torch 2.14.1 is the CUDA 13 build; it runs on CPU-only machines too and lets the CUDA
  # kernels compile and link.
  pip install -q "torch==${FASTKD_TORCH_VERSION:-2.14.1}"
fi
pip install -q numpy ninja pybind11 pytest pytest-benchmark hypothesis tqdm matplotlib scikit-learn scipy
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
pip install -q --no-build-isolation --no-deps -e "$ROOT"
python - <<'PY'
import fastkd
info = fastkd.available_backends()
print("fastkd build:", info["build"])
for name in ("cuda", "triton", "cpu", "reference"):
    print(f"  {name:9s} available={info[name]['available']!s:5s} {info[name]['reason']}")
PY

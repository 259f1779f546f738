#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and build fastkd into it from source.
# Sourced by scripts/test.sh and scripts/bench.sh. The build (minutes with the CUDA kernels) is
# skipped when nothing it depends on changed since the last one made here: see fastkd_build_stamp.
# FASTKD_REBUILD=1 forces it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTKD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
# transformers accelerate trl datasets: the Trainer integrations' tests (tests/test_integrations_*);
# optuna: examples/tune_kd.py's Optuna path (tests/test_example_tune.py)
DEPS=(numpy ninja pybind11 pytest pytest-benchmark hypothesis tqdm matplotlib scikit-learn scipy
      transformers accelerate trl datasets optuna)
STAMP="$VENV/.fastkd-build-stamp"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# One hash of all the build reads: the sources (csrc/, setup.py, pyproject.toml), the build knobs
# of setup.py, the torch it compiles against, the dependency list, where `import fastkd` leads and
# the built extension file itself (so a build made by hand with pip in between, or a deleted .so,
# also counts as a change). A fresh clone has no stamp and so always builds.
fastkd_build_stamp() {
  python -I - "$ROOT" "${DEPS[*]}" <<'PY'
import glob, hashlib, importlib.metadata, importlib.util, os, sys

root, deps = sys.argv[1], sys.argv[2]
h = hashlib.sha256()


def add(*parts):
    for part in parts:
        h.update(str(part).encode() + b"\0")


sources = [p for p in glob.glob(os.path.join(root, "csrc", "**"), recursive=True)
           if os.path.isfile(p)]
for path in sorted(sources) + [os.path.join(root, f) for f in ("setup.py", "pyproject.toml")]:
    add(os.path.relpath(path, root))
    with open(path, "rb") as f:
        h.update(f.read())
for knob in ("FASTKD_NO_CUDA", "FASTKD_NO_EXTENSION", "TORCH_CUDA_ARCH_LIST", "FASTKD_CPU_ARCH",
             "CUDA_HOME"):
    add(knob, os.environ.get(knob, ""))
try:
    torch_version = importlib.metadata.version("torch")
except importlib.metadata.PackageNotFoundError:
    torch_version = None
spec = importlib.util.find_spec("fastkd")
add(sys.version, torch_version, deps, spec.origin if spec else None)
for path in sorted(glob.glob(os.path.join(root, "fastkd", "_C*"))) + [
        os.path.join(root, "fastkd", "_build_info.py")]:
    st = os.stat(path) if os.path.exists(path) else None
    add(os.path.basename(path), st and (st.st_size, st.st_mtime_ns))
print(h.hexdigest())
PY
}

if [ "${FASTKD_REBUILD:-0}" != "1" ] && [ -f "$STAMP" ] \
    && [ "$(cat "$STAMP")" = "$(fastkd_build_stamp)" ]; then
  echo "fastkd build is up to date with the sources (FASTKD_REBUILD=1 rebuilds)"
else
  rm -f "$STAMP"  # a build that fails half-way must not leave the old stamp valid
  if ! python -c "import torch" >/dev/null 2>&1; then
    # torch 2.14.1 is the CUDA 13 build; it runs on CPU-only machines too and lets the CUDA
    # kernels compile and link.
    pip install -q "torch==${FASTKD_TORCH_VERSION:-2.14.1}"
  fi
  pip install -q "${DEPS[@]}"
  pip install -q --no-build-isolation --no-deps -e "$ROOT"
  fastkd_build_stamp >"$STAMP"
fi
python - <<'PY'
import fastkd
info = fastkd.available_backends()
print("fastkd build:", info["build"])
for name in ("cuda", "triton", "cpu", "reference"):
    print(f"  {name:9s} available={info[name]['available']!s:5s} {info[name]['reason']}")
PY

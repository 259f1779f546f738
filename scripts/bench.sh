#!/usr/bin/env bash
# Build fastkd from source into .venv, then run the benchmark demo: one config of each loss
# family (logit, fused-linear, feature; two for relation) against stock PyTorch, torch.compile
# and Liger-Kernel, on the default device; results land in bench-out/. The demo is sized to
# finish in about two minutes on 2 CPU cores: the --sizes demo set, and the fused backends only
# (those this machine lacks are listed with the reason); the reference backend, the contract
# written as plain PyTorch and slow by design, is left out. Later arguments override earlier
# ones, e.g. `bash scripts/bench.sh --sizes quick --backends cpu,reference`; they go to
# `python -m fastkd.bench` (method: docs/BENCHMARKING.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m fastkd.bench --suite all --sizes demo --backends cuda,triton,cpu --out bench-out "$@"

#!/usr/bin/env bash
# Build fastkd from source into .venv, then run the benchmark demo: one config of every loss
# family (logit, fused-linear, feature, relation) against stock PyTorch, torch.compile and
# Liger-Kernel, on this machine's default device; results land in bench-out/. The demo set is
# sized to finish in about two minutes on 2 CPU cores; pass `--sizes quick` or `--sizes full`
# for more (later arguments override earlier ones). Extra arguments go to
# `python -m fastkd.bench`; the method is described in docs/BENCHMARKING.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m fastkd.bench --suite all --sizes demo --out bench-out "$@"

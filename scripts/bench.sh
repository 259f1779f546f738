#!/usr/bin/env bash
# Build fastkd from source into .venv, then run the benchmark demo (quick sizes on this machine's
# default device; results land in bench-out/). Extra arguments go to `python -m fastkd.bench`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m fastkd.bench --sizes quick --out bench-out "$@"

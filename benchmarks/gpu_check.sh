#!/usr/bin/env bash
# The prepared GPU check: step time / memory on the T5-large shape in bf16, and a 3-task tiny sequence under
# accelerate bf16, ZeRO-2 and ZeRO-3, in one report (benchmarks/gpu_check.py). Under 8 minutes on one H200.
#
#   bash benchmarks/gpu_wheels.sh        # here, with the package registry: the wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu_check.sh         # there (the device tool carries .whl): installs them, then runs the check
#   bash benchmarks/gpu_check.sh --device cpu --tiny   # the CPU path with tiny shapes (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  # the GPU machine has its own torch (2.11); these are the versions this package is pinned to, and what it lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/jumplora_site .whl/*.whl
  export PYTHONPATH="/tmp/jumplora_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/jumplora_torch_extensions}"
exec python3 benchmarks/gpu_check.py "$@"

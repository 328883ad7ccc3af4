#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu_check.sh installs on the GPU machine (Python 3.12, torch 2.11, its own
# huggingface_hub 1.33 and transformers 5.17, no datasets / deepspeed): the versions pyproject.toml pins, and what their
# imports need (its huggingface_hub satisfies transformers 5.23 and the card code; the check never uploads).
# Writes .whl/ (git-ignored; about 20 MB, under the device tool's 64 MiB limit).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --only-binary=:all:)
python3 -m pip download -q --no-deps "${platform[@]}" -d .whl \
  transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 \
  dill multiprocess hjson pydantic pydantic-core annotated-types typing-inspection
# DeepSpeed publishes an sdist only: build its pure-Python wheel here (ops are JIT-built there)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
du -sh .whl

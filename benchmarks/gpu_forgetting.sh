#!/usr/bin/env bash
# The forgetting experiment's runs on the GPU machine (benchmarks/forgetting_pool.py, several runs at a time on one
# H200, float32). The model's GGUF (98 MB, 90 MB with xz) is larger than one device call may carry (64 MiB with the
# working tree), so it travels in two calls made back to back, while the machine stays warm:
#
#   bash benchmarks/gpu_forgetting.sh pack          # here, on a clean commit: .gpu/stage1 and .gpu/stage2
#   bash benchmarks/gpu_forgetting.sh stage [SECONDS] # there, call 1 (carry .gpu/stage1): installs what the
#                                                   #   machine lacks, keeps the first half; with SECONDS, rehearses
#                                                   #   every plan on random weights of the model's shape (tiny sizes)
#   bash benchmarks/gpu_forgetting.sh run SECONDS   # there, call 2 (carry .gpu/stage2): the model, then the runs
#                                                   #   for SECONDS at most; their reports come back in $OUT
#   bash benchmarks/gpu_forgetting.sh unpack TAR    # here: the reports into docs/results/forgetting/runs, where
#                                                   #   forgetting_report.py reads them and workers resume from
set -euo pipefail
cd "$(dirname "$0")/.."
PROTOCOL_COMMIT=cb24254129ee768f48ff10ae9200dbbb611ebaab
# The protocol commit's τ set-up searched a CUDA histogram with a CPU value (a crash on the GPU, nothing on the CPU);
# its copy gets the one-line fix that this checkout has (jumplora_hf/thresholds.py, _select_bin), and says so.
CUDA_FIX='s/torch.tensor(rank, dtype=cumulative.dtype)/torch.tensor(rank, dtype=cumulative.dtype, device=cumulative.device)/'
PROTOCOL_LABEL="$PROTOCOL_COMMIT+cuda-searchsorted-fix"
WORK=.gpu/work              # kept on the device machine between calls (git-ignored)
FIRST_PART_BYTES=${FIRST_PART_BYTES:-33000000}

pack() {
  if [ -n "$(git status --porcelain --untracked-files=no -- jumplora_hf recipes benchmarks)" ]; then
    echo "error: commit the code first (the dev runs record this commit)" >&2
    exit 2
  fi
  local gguf
  gguf=$(python3 -c "from jumplora_hf.bench.gguf import *; print(packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF))")
  rm -rf .gpu/stage1 .gpu/stage2 && mkdir -p .gpu/stage1/whl .gpu/stage2
  # the versions pyproject.toml pins, for the machine's Python 3.12 (it has torch 2.11, numpy, pyarrow, pandas...);
  # not huggingface_hub: 2.x imports httpx2, which the machine lacks, and its own 1.33 serves transformers 5.23
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/stage1/whl transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 evaluate==0.4.6 \
    tokenizers==0.23.3 gguf==0.19.0 dill==0.4.1 multiprocess==0.70.19
  git rev-parse HEAD > .gpu/stage1/HEAD_COMMIT
  rm -rf .gpu/protocol_tree && mkdir -p .gpu/protocol_tree
  git archive "$PROTOCOL_COMMIT" jumplora_hf recipes benchmarks | tar -x -C .gpu/protocol_tree
  sed -i "$CUDA_FIX" .gpu/protocol_tree/jumplora_hf/thresholds.py
  grep -q "device=cumulative.device" .gpu/protocol_tree/jumplora_hf/thresholds.py
  tar -cJf .gpu/stage1/protocol_tree.tar.xz -C .gpu/protocol_tree .
  tar -cJf .gpu/stage1/cl_benchmark.tar.xz -C ../shared cl_benchmark/instructions.json cl_benchmark/orders.json \
    cl_benchmark/dbpedia cl_benchmark/amazon cl_benchmark/yahoo cl_benchmark/agnews
  tar -cJf .gpu/stage1/model_shape.tar.xz -C models/SmolLM2-135M-Instruct --exclude='*.safetensors' .
  sha256sum "$gguf" | cut -d' ' -f1 > .gpu/stage1/gguf.sha256
  xz -T2 -c "$gguf" > .gpu/gguf.xz
  head -c "$FIRST_PART_BYTES" .gpu/gguf.xz > .gpu/stage1/gguf.xz.1
  tail -c +"$((FIRST_PART_BYTES + 1))" .gpu/gguf.xz > .gpu/stage2/gguf.xz.2
  rm .gpu/gguf.xz
  local tree
  tree=$(git ls-files -co --exclude-standard | xargs -d '\n' cat | wc -c)
  echo "call 1 carries $(( (tree + $(du -bs .gpu/stage1 | cut -f1)) / 1048576 )) MiB," \
       "call 2 $(( (tree + $(du -bs .gpu/stage2 | cut -f1)) / 1048576 )) MiB (limit 64)"
}

stage() {
  mkdir -p "$WORK"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .gpu/stage1/whl/*.whl
  export PYTHONPATH="$PWD/$WORK/site"
  tar -xJf .gpu/stage1/cl_benchmark.tar.xz -C "$WORK"
  mkdir -p "$WORK/exp" "$WORK/model_shape" && tar -xJf .gpu/stage1/protocol_tree.tar.xz -C "$WORK/exp"
  tar -xJf .gpu/stage1/model_shape.tar.xz -C "$WORK/model_shape"
  cp .gpu/stage1/gguf.xz.1 .gpu/stage1/gguf.sha256 .gpu/stage1/HEAD_COMMIT "$WORK/"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import torch, transformers, peft, accelerate, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, \
'datasets', datasets.__version__, 'tf32 matmul', torch.backends.cuda.matmul.allow_tf32)"
  [ "${1:-0}" = 0 ] && return 0
  # the rehearsal (when given seconds): every plan, 2 steps and 16 examples per task, on random weights
  python3 - "$WORK" <<'EOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
work = sys.argv[1]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(f"{work}/model_shape"))
model.save_pretrained(f"{work}/random_model")
AutoTokenizer.from_pretrained(f"{work}/model_shape").save_pretrained(f"{work}/random_model")
EOF
  rm -rf "$WORK/rehearsal" && mkdir -p "$WORK/rehearsal/head"
  cp -r "$WORK/exp" "$WORK/rehearsal/exp"
  cp -r jumplora_hf recipes benchmarks "$WORK/rehearsal/head/"
  python3 "$WORK/rehearsal/head/benchmarks/forgetting_pool.py" --protocol_tree "$WORK/rehearsal/exp" \
    --protocol_commit "$PROTOCOL_LABEL" --head_commit "$(cat "$WORK/HEAD_COMMIT")" --jobs "${JOBS:-14}" \
    --done_root docs/results/forgetting/runs --device cuda --model "$WORK/random_model" --data_dir "$WORK/cl_benchmark" \
    --extra "--max_train_examples 16 --max_eval_examples 16" --deadline "$1" || {
      grep -rl --include=train.log Traceback "$WORK/rehearsal" | head -n 3 | xargs -r tail -n 25
      exit 1; }
}

run() {
  local seconds=${1:?run SECONDS}
  export PYTHONPATH="$PWD/$WORK/site"
  mkdir -p "$WORK/gguf"
  cat "$WORK/gguf.xz.1" .gpu/stage2/gguf.xz.2 | xz -d > "$WORK/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
  echo "$(cat "$WORK/gguf.sha256")  $WORK/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
  python3 -c "from jumplora_hf.bench.gguf import convert_gguf; \
convert_gguf('$WORK/gguf/SmolLM2-135M-Instruct.Q4_1.gguf', '$WORK/models/SmolLM2-135M-Instruct')"
  sha256sum "$WORK/models/SmolLM2-135M-Instruct/model.safetensors"
  local status=0
  python3 benchmarks/forgetting_pool.py --protocol_tree "$WORK/exp" --protocol_commit "$PROTOCOL_LABEL" \
    --head_commit "$(cat "$WORK/HEAD_COMMIT")" --done_root docs/results/forgetting/runs --jobs "${JOBS:-14}" \
    --device cuda --machine "one NVIDIA H200, CUDA, float32 (TF32 off), ${JOBS:-14} runs at a time" \
    --model "$WORK/models/SmolLM2-135M-Instruct" --data_dir "$WORK/cl_benchmark" \
    --deadline "$seconds" --last_start "${LAST_START:-90}" 2>&1 | tee "${OUT:-.gpu}/pool.log" || status=$?
  mkdir -p .gpu/results/protocol .gpu/results/head
  # only the reports come back (the resume states stay there)
  (cd "$WORK/exp" && find runs -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.log' \) \
     -print0 | tar --null -cf - -T -) | tar -xf - -C .gpu/results/protocol
  if [ -d runs ]; then
    find runs -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.log' \) -print0 \
      | tar --null -cf - -T - | tar -xf - -C .gpu/results/head
  fi
  tar -czf "${OUT:-.gpu}/gpu_runs.tar.gz" -C .gpu/results .
  return $status
}

unpack() {
  local archive=${1:?unpack TAR [DEST]} dest=${2:-docs/results/forgetting/runs}
  local scratch
  scratch=$(mktemp -d)
  tar -xzf "$archive" -C "$scratch"
  mkdir -p "$dest"
  for tree in protocol head; do
    if [ -d "$scratch/$tree/runs/forgetting" ]; then cp -r "$scratch/$tree/runs/forgetting/." "$dest/"; fi
  done
  rm -rf "$scratch"
}

"$@"

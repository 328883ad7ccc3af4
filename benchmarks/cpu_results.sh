#!/usr/bin/env bash
# The CPU-scale runs of docs/RESULTS.md: SmolLM2-135M-Instruct on ../shared/cl_benchmark, one thread per run.
# Every run resumes from its last finished task, so rerunning this script continues where it stopped.
#   bash benchmarks/cpu_results.sh order1 "42 43"      # Standard CL order 1, two seeds
#   bash benchmarks/cpu_results.sh order4 "42 43"      # Long Sequence order 4 (its first 6 tasks, see RESULTS.md)
# Needs the converted model: make demo (or python -c "from jumplora_hf.gguf import ...") writes models/SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
order="${1:-order1}"
seeds="${2:-42 43}"
tasks="$order"
if [ "$order" = "order4" ]; then tasks="mnli,cb,wic,copa,qqp,boolq"; fi   # CPU budget: the first 6 of 15
common=(--model_name_or_path models/SmolLM2-135M-Instruct --order "$tasks" --eval_split "${EVAL_SPLIT:-test}"
        --max_train_examples 128 --max_eval_examples 64 --per_device_train_batch_size 8 --per_device_eval_batch_size 16
        --max_source_length 128 --target_modules q_proj v_proj --learning_rate "${LR:-3e-3}" --lr_scheduler_type constant
        --use_cpu true --logging_steps 4 --disable_tqdm true --report_to none --save_merged false)
for seed in $seeds; do
  base="runs/$order"
  OMP_NUM_THREADS=1 python recipes/sc.py "${common[@]}" --seed "$seed" --method inclora --single_task_baselines true \
      --output_dir "$base/single_task/seed$seed"
  for method in inclora jumplora_inclora ella jumplora_ella; do
    lambdas=()
    if [[ "$method" == *ella* ]]; then
      if [ "$order" = "order4" ]; then lambdas=(--ella_lambda 0 5e5 5e5 5e5 5e5 5e5); else lambdas=(--ella_lambda 0 3e4 3e4 3e4); fi
    fi
    OMP_NUM_THREADS=1 python recipes/sc.py "${common[@]}" --seed "$seed" --method "$method" "${lambdas[@]}" \
        --single_task_dir "$base/single_task/seed$seed" --output_dir "$base/$method/seed$seed"
  done
done

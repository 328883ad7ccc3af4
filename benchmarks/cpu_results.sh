#!/usr/bin/env bash
# The CPU-scale runs of docs/RESULTS.md: SmolLM2-135M-Instruct on ../shared/cl_benchmark, one thread per run.
# Every run resumes from its last finished task, so rerunning this script continues where it stopped.
#   bash benchmarks/cpu_results.sh order1 "42 43"      # Standard CL order 1, two seeds, one after the other
#   bash benchmarks/cpu_results.sh order1 42 & bash benchmarks/cpu_results.sh order1 43   # one seed per core
#   bash benchmarks/cpu_results.sh order4 42           # Long Sequence order 4, 4 of its tasks (see RESULTS.md)
# Environment: EVAL_SPLIT (test; dev to tune), LR (3e-3), TRAIN_EXAMPLES (128 per task, so 16 steps), METHODS
# (single_task and the four methods), ROOT (runs),
# LAMBDA1/LAMBDA4 (the λ of tasks 2.. of the ELLA methods on order 1 / order 4; docs/RESULTS.md says how they were
# chosen on dev).
# Needs the converted model: make demo writes models/SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
order="${1:-order1}"
seeds="${2:-42 43}"
methods="${METHODS:-single_task inclora jumplora_inclora ella jumplora_ella}"
root="${ROOT:-runs}"
tasks="$order"
# CPU budget: 4 of order 4's 15 tasks, every fourth in its order (its first four, mnli cb wic copa, stay at chance here)
if [ "$order" = "order4" ]; then tasks="mnli,qqp,yelp,agnews"; fi
ntasks=4; if [[ "$tasks" == *,* ]]; then IFS=, read -ra names <<< "$tasks"; ntasks=${#names[@]}; fi
# λ of the ELLA methods, chosen on dev by benchmarks/tune_lambda.sh (the paper's Table 7: 3e4 and 5e5)
if [ "$order" = "order4" ]; then lam="${LAMBDA4:-5e6}"; else lam="${LAMBDA1:-3e4}"; fi
common=(--model_name_or_path models/SmolLM2-135M-Instruct --order "$tasks" --eval_split "${EVAL_SPLIT:-test}"
        --max_train_examples "${TRAIN_EXAMPLES:-128}" --max_eval_examples 64 --per_device_train_batch_size 8 --per_device_eval_batch_size 16
        --max_source_length 128 --jumplora_target_modules q_proj v_proj --learning_rate "${LR:-3e-3}" --lr_scheduler_type constant
        --use_cpu true --logging_steps 4 --disable_tqdm true --report_to none --save_merged false)
for seed in $seeds; do
  base="$root/$order"
  for method in $methods; do
    if [ "$method" = "single_task" ]; then
      OMP_NUM_THREADS=1 python recipes/sc.py "${common[@]}" --seed "$seed" --method inclora --single_task_baselines true \
          --output_dir "$base/single_task/seed$seed"
      continue
    fi
    lambdas=()
    if [[ "$method" == *ella* ]]; then   # 0 for the first task (no W_past yet), then λ
      lambdas=(--ella_lambda 0); for ((i = 1; i < ntasks; i++)); do lambdas+=("$lam"); done
    fi
    a0="$base/single_task/seed$seed"
    if [ ! -f "$a0/continual_metrics.json" ]; then echo "no single-task baselines in $a0: no FWT for $method"; a0=none; fi
    OMP_NUM_THREADS=1 python recipes/sc.py "${common[@]}" --seed "$seed" --method "$method" "${lambdas[@]}" \
        --single_task_dir "$a0" --output_dir "$base/$method/seed$seed"
  done
done

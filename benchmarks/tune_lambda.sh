#!/usr/bin/env bash
# Choose the ELLA λ of benchmarks/cpu_results.sh on the dev split: ELLA with each λ of a grid (λ = 0 for the first
# task, λ for the others), then the dev OA of each and the best. Resumable like cpu_results.sh.
#   bash benchmarks/tune_lambda.sh order1 42 "3e4 3e5 3e6 3e7"
#   bash benchmarks/tune_lambda.sh order4 42 "5e4 5e5 5e6"
# The best λ is printed last and written to runs/tune/<order>/best_lambda.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
order="${1:-order1}"
seed="${2:-42}"
grid="${3:-3e4 3e5 3e6 3e7}"
var=LAMBDA1; if [ "$order" = "order4" ]; then var=LAMBDA4; fi
for lam in $grid; do
  env EVAL_SPLIT=dev METHODS=ella ROOT="runs/tune/lambda$lam" "$var=$lam" bash benchmarks/cpu_results.sh "$order" "$seed"
done
mkdir -p "runs/tune/$order"
python - "$order" "$seed" $grid <<'PY'
import json, sys
order, seed, grid = sys.argv[1], sys.argv[2], sys.argv[3:]
oa = {}
for lam in grid:
    with open(f"runs/tune/lambda{lam}/{order}/ella/seed{seed}/continual_metrics.json") as f:
        report = json.load(f)
    oa[lam] = report["overall_accuracy"]
    print(f"λ = {lam:>6}: dev OA {100 * oa[lam]:.1f}   final row {[round(a, 3) for a in report['accuracy_matrix'][-1]]}")
best = max(grid, key=lambda lam: (oa[lam], -float(lam)))  # ties: the smaller λ
print(f"best λ for {order} (dev OA): {best}")
with open(f"runs/tune/{order}/best_lambda.txt", "w") as f:
    f.write(best + "\n")
PY

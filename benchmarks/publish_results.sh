#!/usr/bin/env bash
# Copy the finished runs' reports from runs/ into docs/results/ (the run dirs are git-ignored and their
# resume states and ledgers are tens of MB each): continual_metrics.json and the CSV/JSON tables of every run,
# the PNG plots of the JumpLoRA runs. recipes/aggregate.py reads the copies like the originals.
#   bash benchmarks/publish_results.sh order1 order4
set -euo pipefail
cd "$(dirname "$0")/.."
for order in "$@"; do
  for run in runs/"$order"/*/seed*; do
    [ -f "$run/continual_metrics.json" ] || continue
    dest="docs/results/${run#runs/}"
    mkdir -p "$dest"
    cp "$run"/continual_metrics.json "$dest"/
    for f in "$run"/*.csv "$run"/accuracy_matrix.json; do if [ -f "$f" ]; then cp "$f" "$dest"/; fi; done
    if [[ "$run" == *jumplora* ]]; then
      for f in "$run"/*.png; do if [ -f "$f" ]; then cp "$f" "$dest"/; fi; done
    fi
  done
done
echo "published: $(find docs/results -name continual_metrics.json | wc -l) runs under docs/results"

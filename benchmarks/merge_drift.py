"""bf16 merges and thresholds, before and after the fix: the numbers of the README's precision section.

1. The accumulated update after T task-by-task merges into a bf16 weight, relative error against the exact sum:
   rounding the weight at every merge (before) against the float32 accumulator re-cast after each merge (after),
   and the exact merge rounded once (the best a bf16 weight can hold).
2. The surviving count at S_start when log τ is itself a bf16 parameter (before) against the float32 anchor (after).
3. The memory the float32 accumulator costs: 4 bytes per adapted weight entry, on every process.

    python benchmarks/merge_drift.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import torch  # noqa: E402

from jumplora_hf.bench.precision import merge_drift, survivor_count, synthetic_updates  # noqa: E402

# SmolLM2-135M q_proj / v_proj shapes (30 layers), T5-large q / v (24 encoder + 24 decoder self + 24 cross attention)
ADAPTED = {"SmolLM2-135M q/v": 30 * (576 * 576 + 192 * 576), "T5-large q/v": 72 * 2 * 1024 * 1024}


def main() -> None:
    print(
        "| tasks | update median | per-task bf16 rounding (before) | float32 accumulator (after) | exact merge rounded once | entries not shown (after) |"
    )
    print("|---|---|---|---|---|---|")
    for tasks in (4, 15):
        for median in (0.011, 0.0037):
            weight, updates = synthetic_updates((576, 576), tasks=tasks, update_median=median)
            d = merge_drift(weight, updates)
            print(
                f"| {tasks} | {median} | {100 * d['naive']:.2f}% | {100 * d['accumulated']:.2f}% | "
                f"{100 * d['round_once']:.2f}% | {100 * d['vanished_accumulated']:.1f}% |"
            )
    print()
    gen = torch.Generator().manual_seed(0)
    delta = (torch.randn(576, 8, generator=gen) * 0.05) @ torch.randn(8, 576, generator=gen) * 0.05
    budget = 8 * (576 + 576)
    k = delta.numel() - budget
    values = delta.abs().flatten().sort().values
    log_tau = torch.tensor([float((values[k - 1] + values[k]) / 2)]).log()
    before = survivor_count(delta, log_tau.to(torch.bfloat16))
    after = survivor_count(delta, log_tau)
    print(
        f"surviving count at S_start, target #A + #B = {budget}: log τ in bf16 {before} "
        f"({100 * (before - budget) / budget:+.1f}%), anchored in float32 {after}"
    )
    print()
    for name, entries in ADAPTED.items():
        print(
            f"float32 accumulator for {name}: {entries / 1e6:.1f}M entries, {4 * entries / 2**20:.0f} MiB per process"
        )


if __name__ == "__main__":
    main()

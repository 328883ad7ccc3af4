"""Markdown accuracy matrices averaged over seeds, with the JumpLoRA runs' sparsity and overlap per task.

The per-method detail of docs/RESULTS.md, from the finished runs laid out as <root>/<order>/<method>/seed<N>:

    python benchmarks/mean_matrices.py docs/results order1 order4
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse
import glob
import os

import numpy as np

from jumplora_hf.bench.reports import is_finished, load_report, trained_matrix
from jumplora_hf.methods import METHODS, display_name


def method_section(root: str, order: str, method: str) -> str | None:
    finished = [
        (d, r)
        for d in sorted(glob.glob(os.path.join(root, order, method, "seed*")))
        for r in [load_report(d)]
        if is_finished(r)
    ]
    if not finished:
        return None
    reports = [r for _, r in finished]
    tasks = reports[0]["tasks"]
    mean = np.mean([[[np.nan if v is None else v for v in row] for row in trained_matrix(r)] for r in reports], axis=0)
    seeds = ", ".join(os.path.basename(d).removeprefix("seed") for d, _ in finished)
    lines = [
        f"**{order} · {display_name(method)}** (mean of seeds {seeds})",
        "",
        "| after \\ on | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for i, name in enumerate(tasks):
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * mean[i][j]:.1f}" if j <= i else "" for j in range(len(tasks))) + " |"
        )
    if method.startswith("jumplora"):
        sparsity = np.mean([[task["sparsity"]["mean"] for task in r["per_task"]] for r in reports], axis=0)
        overlap = np.mean(
            [[task["jaccard_with_previous"]["mean"] for task in r["per_task"][1:]] for r in reports], axis=0
        )
        lines += [
            "",
            "Sparsity of each task's merged update (%): "
            + ", ".join(f"{100 * s:.1f}" for s in sparsity)
            + ". Mean Jaccard overlap with the earlier tasks' supports: "
            + ", ".join(f"{j:.3f}" for j in overlap)
            + ".",
        ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder holding <order>/<method>/seed<N> run dirs (runs, docs/results)")
    parser.add_argument("orders", nargs="+")
    args = parser.parse_args(argv)
    sections = [s for order in args.orders for method in METHODS if (s := method_section(args.root, order, method))]
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()

"""Console output of a continual run, shared by the recipes and the demo: one progress line per task, the report."""

from __future__ import annotations

import sys
import time

from ..callback import ContinualCallback
from ..methods import display_name


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"  # BWT is undefined after a single task


def print_report(report: dict) -> None:
    """The accuracy matrix, OA, BWT, and the sparsity / Jaccard overlap of each merged update."""
    print(f"\n{display_name(report['method'])}: a[i][j] = accuracy on task j after training task i")
    for name, row in zip(report["tasks"], report["accuracy_matrix"]):
        print(f"  after {name}: " + "  ".join("  -  " if a is None else f"{a:.3f}" for a in row))
    oa = report["overall_accuracy"]
    print(f"OA {'-' if oa is None else format(oa, '.3f')}   BWT {_signed(report['backward_transfer'])}")
    for task in report["per_task"]:
        sparsity = task["sparsity"]["mean"]
        text = "dense (0% sparse)" if sparsity < 1e-6 else f"sparsity {sparsity:.3f}"
        overlap = task.get("jaccard_with_previous")
        print(
            f"  {task['name']}: {text}"
            + (f", mean Jaccard with earlier tasks {overlap['mean']:.3f}" if overlap else "")
        )


def comparison_line(reports: dict[str, dict]) -> str:
    """One line with OA and BWT per method, e.g. "IncLoRA OA 0.600 BWT -0.380 | JumpLoRA + IncLoRA OA 0.700 ..."."""
    return " | ".join(
        f"{display_name(method)} OA {r['overall_accuracy']:.3f} BWT {_signed(r['backward_transfer'])}"
        for method, r in reports.items()
    )


def comparison_table(reports: dict[str, dict]) -> str:
    """The methods side by side: OA, BWT, and the mean sparsity / Jaccard overlap of their merged updates."""
    lines = ["method                 OA      BWT     sparsity  Jaccard with earlier tasks"]
    for method, r in reports.items():
        sparsity = [t["sparsity"]["mean"] for t in r["per_task"]]
        overlap = [t["jaccard_with_previous"]["mean"] for t in r["per_task"] if t.get("jaccard_with_previous")]
        mean_sparsity = sum(sparsity) / len(sparsity)
        lines.append(
            f"{display_name(method):<21}  {r['overall_accuracy']:.3f}  {_signed(r['backward_transfer']):>6}  "
            + ("dense    " if mean_sparsity < 1e-6 else f"{mean_sparsity:.3f}    ")
            + (f" {sum(overlap) / len(overlap):.3f}" if overlap else " -")
        )
    return "\n".join(lines)


class TaskProgress(ContinualCallback):
    """One line when a task starts and one when it is evaluated, with the time since `start` (main process only)."""

    def __init__(self, n_tasks: int, label: str = "", start: float | None = None, stream=None):
        self.n_tasks, self.label = n_tasks, label
        self.start = time.time() if start is None else start
        self.stream = stream
        self._task_start = 0.0

    def say(self, state, text: str) -> None:
        if state.is_world_process_zero:
            prefix = f"{self.label}: " if self.label else ""
            print(f"[{time.time() - self.start:6.0f} s] {prefix}{text}", file=self.stream or sys.stdout, flush=True)

    def on_task_begin(self, args, state, control, task=None, **kwargs):
        self._task_start = time.time()
        self.say(
            state,
            f"task {task.index + 1}/{self.n_tasks} '{task.name}': training, {task.num_examples} examples in {task.num_steps} steps",
        )

    def on_task_evaluated(self, args, state, control, task=None, row=None, **kwargs):
        scores = "  ".join("-" if a is None else f"{a:.3f}" for a in row)
        self.say(
            state,
            f"task {task.index + 1}/{self.n_tasks} '{task.name}' done in {time.time() - self._task_start:.0f} s: accuracies {scores}",
        )

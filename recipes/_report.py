"""Console output of a continual run, shared by the recipes."""

from __future__ import annotations

METHOD_LABELS = {"inclora": "IncLoRA", "ella": "ELLA", "jumplora_inclora": "JumpLoRA", "jumplora_ella": "JumpLoRA+ELLA"}


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"  # BWT is undefined after a single task


def print_report(report: dict) -> None:
    """The accuracy matrix, OA, BWT, and the sparsity / Jaccard overlap of each merged update."""
    print(f"\nmethod {report['method']}; a[i][j] = accuracy on task j after training task i")
    for name, row in zip(report["tasks"], report["accuracy_matrix"]):
        print(f"  after {name}: " + "  ".join("  -  " if a is None else f"{a:.3f}" for a in row))
    print(f"OA {report['overall_accuracy']:.3f}   BWT {_signed(report['backward_transfer'])}")
    for task in report["per_task"]:
        overlap = task["jaccard_with_previous"]
        print(f"  {task['name']}: sparsity {task['sparsity']['mean']:.3f}" + (f", Jaccard with earlier tasks {overlap['mean']:.3f}" if overlap else ""))


def comparison_line(reports: dict[str, dict]) -> str:
    """One line with OA and BWT per method, e.g. "IncLoRA OA 0.600 BWT -0.380 | JumpLoRA OA 0.700 BWT -0.250"."""
    return " | ".join(
        f"{METHOD_LABELS.get(method, method)} OA {r['overall_accuracy']:.3f} BWT {_signed(r['backward_transfer'])}"
        for method, r in reports.items()
    )

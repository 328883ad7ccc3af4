"""Continual-learning metrics as pure functions (paper §4.2 and §5).

`acc[i][j]` is the accuracy on task j after training on task i (0-based); rows are filled up to the
diagonal (entries above it are None). A run that evaluates the earlier tasks at the end only
(`eval_seen_tasks="at_end"`) leaves None below the diagonal too, in every row but the last; OA and BWT need a
complete last row. Supports are boolean masks of ΔW_final ≠ 0, stored bit-packed
(`pack_support`) so that a long task sequence keeps one bit per adapted weight per task.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AccuracyMatrix = Sequence[Sequence[float | None]]


def _filled_rows(acc: AccuracyMatrix) -> list[int]:
    return [i for i, row in enumerate(acc) if i < len(row) and row[i] is not None]


def _final_row(acc: AccuracyMatrix) -> int:
    filled = _filled_rows(acc)
    if not filled:
        raise ValueError("the accuracy matrix has no filled row yet")
    return filled[-1]


def row_is_complete(acc: AccuracyMatrix, i: int) -> bool:
    """Whether row i holds a[i][j] for every task j ≤ i."""
    return i < len(acc) and len(acc[i]) > i and all(acc[i][j] is not None for j in range(i + 1))


def final_row_is_complete(acc: AccuracyMatrix) -> bool:
    """Whether the last filled row holds every task seen so far, as OA and BWT need."""
    filled = _filled_rows(acc)
    return bool(filled) and row_is_complete(acc, filled[-1])


def _complete_final_row(acc: AccuracyMatrix) -> int:
    last = _final_row(acc)
    if not row_is_complete(acc, last):
        missing = [j for j in range(last + 1) if acc[last][j] is None]
        raise ValueError(
            f"row {last} of the accuracy matrix lacks tasks {missing}: they were not evaluated after task {last} "
            "(eval_seen_tasks='at_end' evaluates them after the last task only); OA and BWT need that row complete"
        )
    return last


def overall_accuracy(acc: AccuracyMatrix) -> float:
    """OA = mean_j a[T][j] over the tasks seen so far (T = last filled row, which must be complete)."""
    last = _complete_final_row(acc)
    return float(np.mean([acc[last][j] for j in range(last + 1)]))


def backward_transfer(acc: AccuracyMatrix) -> float | None:
    """BWT = mean_{j<T} (a[T][j] − a[j][j]); None after a single task."""
    last = _complete_final_row(acc)
    if last == 0:
        return None
    return float(np.mean([acc[last][j] - acc[j][j] for j in range(last)]))


def forward_transfer(acc: AccuracyMatrix, single_task: Sequence[float]) -> float:
    """FWT = mean_j (a[j][j] − a0[j]), a0[j] = accuracy of task j trained alone from the base model."""
    last = _final_row(acc)
    if len(single_task) < last + 1:
        raise ValueError(f"need {last + 1} single-task accuracies, got {len(single_task)}")
    return float(np.mean([acc[j][j] - single_task[j] for j in range(last + 1)]))


def pack_support(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool).ravel())


def support_sparsity(packed: np.ndarray, numel: int) -> float:
    """Fraction of the `numel` entries outside the support (1 − nnz/numel)."""
    return 1.0 - int(np.bitwise_count(packed).sum()) / numel


def support_jaccard(packed_a: np.ndarray, packed_b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two packed supports (0 when both are empty)."""
    union = int(np.bitwise_count(packed_a | packed_b).sum())
    if union == 0:
        return 0.0
    return int(np.bitwise_count(packed_a & packed_b).sum()) / union


def mean_jaccard_with_previous(
    current: dict[str, np.ndarray], previous: Sequence[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Per layer: mean Jaccard overlap of the current task's support with each previous task's (paper Fig. 3)."""
    if not previous:
        return {}
    return {
        name: float(np.mean([support_jaccard(packed, past[name]) for past in previous]))
        for name, packed in current.items()
    }

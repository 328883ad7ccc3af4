"""Continual-learning metrics as pure functions (paper §4.2 and §5).

`acc[i][j]` is the accuracy on task j after training on task i (0-based); rows are filled up to the
diagonal (entries above it are None). Supports are boolean masks of ΔW_final ≠ 0, stored bit-packed
(`pack_support`) so that a long task sequence keeps one bit per adapted weight per task.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AccuracyMatrix = Sequence[Sequence[float | None]]


def _final_row(acc: AccuracyMatrix) -> int:
    filled = [i for i, row in enumerate(acc) if i < len(row) and row[i] is not None]
    if not filled:
        raise ValueError("the accuracy matrix has no filled row yet")
    return filled[-1]


def overall_accuracy(acc: AccuracyMatrix) -> float:
    """OA = mean_j a[T][j] over the tasks seen so far (T = last filled row)."""
    last = _final_row(acc)
    return float(np.mean([acc[last][j] for j in range(last + 1)]))


def backward_transfer(acc: AccuracyMatrix) -> float | None:
    """BWT = mean_{j<T} (a[T][j] − a[j][j]); None after a single task."""
    last = _final_row(acc)
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

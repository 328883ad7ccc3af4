"""`ContinualRecord`: the finished tasks of a sequence, their updates' statistics and the accuracy matrix; its
`report()` is what continual_metrics.json holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .updates import MergedTaskUpdate


@dataclass
class ContinualRecord:
    """The finished tasks of a sequence and their accuracies; `report()` is what continual_metrics.json holds."""

    method: str
    sequence: list[str]  # every task of the run, in order
    single_task_baselines: bool = False
    single_task_accuracies: list[float] | None = None  # a0, for FWT
    metric_names: list[str] = field(default_factory=list)  # per task of `sequence`
    tasks: list[str] = field(default_factory=list)  # the finished ones
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    updates: list[MergedTaskUpdate] = field(default_factory=list)
    notes: dict[int, dict] = field(default_factory=dict)  # per task index: what listeners added to its report entry

    def note(self, index: int, **values) -> None:
        self.notes.setdefault(index, {}).update(values)

    def has_finished(self, index: int) -> bool:
        return index < len(self.tasks)

    def add_task(self, name: str, update: MergedTaskUpdate) -> None:
        self.tasks.append(name)
        self.updates.append(update)

    def add_row(self, index: int, row: Sequence[float | None]) -> None:
        self.accuracy_matrix.append(list(row) + [None] * (len(self.sequence) - len(row)))

    def report(self) -> dict:
        per_task = []
        for index, (name, update) in enumerate(zip(self.tasks, self.updates)):
            sparsity = update.sparsity()
            entry = {
                "name": name,
                "metric": self._metric(index),
                "sparsity": {"mean": _mean(sparsity), "per_layer": sparsity},
            }
            if not self.single_task_baselines and index < len(self.accuracy_matrix):
                partial = [row[: index + 1] for row in self.accuracy_matrix[: index + 1]]
                complete = metrics.row_is_complete(partial, index)  # not with eval_seen_tasks="at_end" before the end
                entry["overall_accuracy"] = metrics.overall_accuracy(partial) if complete else None
                entry["backward_transfer"] = metrics.backward_transfer(partial) if complete else None
                overlap = update.jaccard
                entry["jaccard_with_previous"] = {"mean": _mean(overlap), "per_layer": overlap} if overlap else None
            if update.taus:
                entry["tau"] = dict(update.taus)
            entry.update(self.notes.get(index, {}))
            per_task.append(entry)
        base = {"method": self.method, "tasks": self.tasks, "metrics": self.metric_names[: len(self.tasks)]}
        if self.single_task_baselines:
            return {
                **base,
                "single_task_baselines": True,
                "single_task_accuracies": [row[i] for i, row in enumerate(self.accuracy_matrix)],
                "per_task": per_task,
            }
        acc = self.accuracy_matrix
        fwt = None
        if self.single_task_accuracies is not None and acc:
            fwt = metrics.forward_transfer(acc, self.single_task_accuracies)
        complete = metrics.final_row_is_complete(acc)
        return {
            **base,
            "accuracy_matrix": acc,
            "overall_accuracy": metrics.overall_accuracy(acc) if complete else None,
            "backward_transfer": metrics.backward_transfer(acc) if complete else None,
            "forward_transfer": fwt,
            "single_task_accuracies": self.single_task_accuracies,
            "per_task": per_task,
        }

    def _metric(self, index: int) -> str:
        return self.metric_names[index] if index < len(self.metric_names) else "exact_match"


def _mean(values: dict[str, float]) -> float | None:
    return float(np.mean(list(values.values()))) if values else None

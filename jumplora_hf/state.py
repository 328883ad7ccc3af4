"""The state of a task sequence: what is recorded after each task, and the run directory that makes it resumable.

`ContinualRecord` holds the finished tasks, their merged-update supports and the accuracy matrix, and builds the
report (`continual_metrics.json`). `RunDirectory` writes, after every task, the task's ledger file, the resume state
and the report; `load_run_state` reads the resume state back. Everything on disk is safetensors (tensors) and JSON:
nothing is unpickled, so a run dir handed over by someone else cannot run code when it is resumed.

Resume state: `continual_state.json` is the commit point. It names the tensor file of the same task count
(`continual_state-NN.safetensors`: the merged adapted weights, W_past and the supports) and the ledger files with
their SHA-256, so a crash between two writes never pairs a state with the tensors or ledger of another task.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import metrics
from .files import read_json, write_json_atomic
from .layer import iter_jumplora_layers
from .ledger import TaskLedger
from .lifecycle import ContinualCallback, MergedTaskUpdate
from .zero import gathered_adapters

METRICS_FILE = "continual_metrics.json"
STATE_FILE = "continual_state.json"
LEGACY_STATE_FILE = "continual_state.pt"  # jumplora_hf 0.1 (a pickle): refused, never loaded
STATE_FORMAT = 2


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
                overlap = metrics.mean_jaccard_with_previous(
                    update.supports, [u.supports for u in self.updates[:index]]
                )
                partial = [row[: index + 1] for row in self.accuracy_matrix[: index + 1]]
                entry["overall_accuracy"] = metrics.overall_accuracy(partial)
                entry["backward_transfer"] = metrics.backward_transfer(partial)
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
        return {
            **base,
            "accuracy_matrix": acc,
            "overall_accuracy": metrics.overall_accuracy(acc) if acc else None,
            "backward_transfer": metrics.backward_transfer(acc) if acc else None,
            "forward_transfer": fwt,
            "single_task_accuracies": self.single_task_accuracies,
            "per_task": per_task,
        }

    def _metric(self, index: int) -> str:
        return self.metric_names[index] if index < len(self.metric_names) else "exact_match"


def _mean(values: dict[str, float]) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


# ----------------------------------------------------------------------------- merged state of the model
def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the finished tasks left in the model: the adapted layers' merged weights (the float32 copy for bf16/fp16
    weights) and W_past, on CPU, as flat safetensors keys."""
    tensors = {}
    for name, layer in iter_jumplora_layers(model):
        tensors[f"weight/{name}"] = layer.merged_weight().detach().cpu().clone()
        if layer.ella_w_past is not None:
            tensors[f"w_past/{name}"] = layer.ella_w_past.detach().cpu().clone()
    return tensors


@torch.no_grad()
def restore_merged_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put `merged_state(...)` of an earlier run back into a model built the same way."""
    layers = dict(iter_jumplora_layers(model))
    saved = {key.split("/", 1)[1] for key in tensors if key.startswith("weight/")}
    if set(layers) != saved:
        raise ValueError(
            f"the saved state adapts {len(saved)} layers, this model {len(layers)}; resume with the same model and "
            "target_modules"
        )
    for name, layer in layers.items():
        layer.restore_merged_weight(tensors[f"weight/{name}"])
        past = tensors.get(f"w_past/{name}")
        layer.ella_w_past = None if past is None else past.to(layer.get_base_layer().weight.device)


# ----------------------------------------------------------------------------- the run directory
def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class SavedRun:
    """A run dir's resume state: its record (finished tasks) and the merged tensors to restore."""

    record: ContinualRecord
    tensors: dict[str, torch.Tensor]
    ledger: list[dict]


def load_run_state(output_dir: str, method: str, sequence: Sequence[str]) -> SavedRun | None:
    """The resume state of `output_dir`, checked against this run (method, task order); None if there is none."""
    if os.path.exists(os.path.join(output_dir, LEGACY_STATE_FILE)) and not os.path.exists(
        os.path.join(output_dir, STATE_FILE)
    ):
        raise ValueError(
            f"{output_dir} holds {LEGACY_STATE_FILE}, the resume state of jumplora_hf 0.1, a pickle, which this version "
            "never loads (unpickling a file can run code). Start the run in a new output_dir, or delete that file to "
            "start over in this one"
        )
    path = os.path.join(output_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    saved = read_json(path)
    if saved.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{path} has format {saved.get('format')!r}, this version reads {STATE_FORMAT}; start in a new output_dir"
        )
    done = saved["tasks"]
    if saved["method"] != method or list(sequence[: len(done)]) != done:
        raise ValueError(
            f"{path} holds a {saved['method']} run of tasks {done}, which does not start this run ({method}: "
            f"{list(sequence)}); choose another output_dir, or remove {STATE_FILE} to start over"
        )
    tensor_path = os.path.join(output_dir, saved["tensors"]["file"])
    if not os.path.exists(tensor_path) or sha256_file(tensor_path) != saved["tensors"]["sha256"]:
        raise ValueError(
            f"{tensor_path} is missing or does not match {STATE_FILE}; the run dir is damaged: start in a new output_dir"
        )
    tensors = load_file(tensor_path)
    record = ContinualRecord(
        method=method,
        sequence=list(sequence),
        single_task_baselines=saved.get("single_task_baselines", False),
        metric_names=list(saved.get("metrics", [])),
        tasks=list(done),
        accuracy_matrix=[
            row[: len(sequence)] + [None] * (len(sequence) - len(row)) for row in saved["accuracy_matrix"]
        ],
        notes={int(k): v for k, v in saved.get("notes", {}).items()},
    )
    for index in range(len(done)):
        prefix = f"support/{index}/"
        supports = {k[len(prefix) :]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}
        update = MergedTaskUpdate(
            supports=supports, numels=dict(saved["numels"]), taus=dict(saved.get("taus", [{}] * len(done))[index])
        )
        record.updates.append(update)
    return SavedRun(
        record, {k: v for k, v in tensors.items() if not k.startswith("support/")}, saved.get("ledger", [])
    )


def saved_merged_weights(output_dir: str) -> dict[str, torch.Tensor]:
    """The merged adapted weights a run dir's resume state holds (after its last finished task), by layer name."""
    saved = read_json(os.path.join(output_dir, STATE_FILE))
    tensors = load_file(os.path.join(output_dir, saved["tensors"]["file"]))
    return {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("weight/")}


class RunDirectory(ContinualCallback):
    """Writes, after every task (main process only), the run's config, the task's ledger file, the resume state and
    the report, and with a per-task Hub strategy pushes the model after the task (`publisher`, a hub.HubPublisher).

    All processes gather the merged weights (ZeRO-3); only the world main process writes. A resumed run continues
    the same ledger: the files of finished tasks are listed in the state and never written again.
    """

    def __init__(
        self,
        output_dir: str,
        task_metadata: dict[str, dict] | None = None,
        write_ledger: bool = True,
        ledger: Sequence[dict] = (),
        run_config: dict | None = None,
        publisher=None,
    ):
        self.output_dir = output_dir
        self.task_metadata = task_metadata or {}
        self.write_ledger = write_ledger
        self.ledger_files = list(ledger)
        self.run_config = run_config
        self.publisher = publisher
        self._pending: MergedTaskUpdate | None = None

    def on_task_end(self, args, state, control, update=None, **kwargs):
        self._pending = update

    def on_task_evaluated(self, args, state, control, task=None, record=None, model=None, **kwargs):
        with gathered_adapters(model, include_base=True):  # every rank takes part in the ZeRO-3 gather
            tensors = merged_state(model)
        if state.is_world_process_zero:
            self._write(task, record, tensors)
        self._pending = None
        if self.publisher is not None and self.publisher.per_task:
            self.publisher.push_task(task.index, task.name, record.report())  # every rank: the model is gathered

    def _write(self, task, record: ContinualRecord, tensors: dict[str, torch.Tensor]) -> None:
        if self.run_config is not None:
            write_json_atomic(os.path.join(self.output_dir, "run_config.json"), self.run_config)
        if self.write_ledger and self._pending is not None and self._pending.layers:
            meta = {**self.task_metadata.get(task.name, {}), "steps": task.num_steps, "examples": task.num_examples}
            path = TaskLedger(self.output_dir).write_task(task.index, task.name, record.method, self._pending, meta)
            self.ledger_files = [e for e in self.ledger_files if e["index"] != task.index]
            self.ledger_files.append(
                {"index": task.index, "file": os.path.relpath(path, self.output_dir), "sha256": sha256_file(path)}
            )
        write_state(self.output_dir, record, tensors, self.ledger_files)
        write_json_atomic(os.path.join(self.output_dir, METRICS_FILE), record.report())


def write_state(
    output_dir: str, record: ContinualRecord, tensors: dict[str, torch.Tensor], ledger: Sequence[dict]
) -> None:
    """The resume state after `len(record.tasks)` tasks: tensors first, then the JSON that names them."""
    os.makedirs(output_dir, exist_ok=True)
    count = len(record.tasks)
    all_tensors = dict(tensors)
    for index, update in enumerate(record.updates):
        for name, packed in update.supports.items():
            all_tensors[f"support/{index}/{name}"] = torch.from_numpy(np.ascontiguousarray(packed))
    tensor_file = f"continual_state-{count:02d}.safetensors"
    tmp = os.path.join(output_dir, tensor_file + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in all_tensors.items()}, tmp, metadata={"format": str(STATE_FORMAT)})
    os.replace(tmp, os.path.join(output_dir, tensor_file))
    numels = record.updates[-1].numels if record.updates else {}
    write_json_atomic(
        os.path.join(output_dir, STATE_FILE),
        {
            "format": STATE_FORMAT,
            "method": record.method,
            "tasks": record.tasks,
            "single_task_baselines": record.single_task_baselines,
            "metrics": record.metric_names[:count],
            "accuracy_matrix": record.accuracy_matrix,
            "numels": numels,
            "taus": [u.taus for u in record.updates],
            "notes": {str(k): v for k, v in record.notes.items()},
            "tensors": {"file": tensor_file, "sha256": sha256_file(os.path.join(output_dir, tensor_file))},
            "ledger": sorted(ledger, key=lambda e: e["index"]),
        },
    )
    for old in glob.glob(os.path.join(output_dir, "continual_state-*.safetensors")):
        if os.path.basename(old) != tensor_file:
            os.remove(old)

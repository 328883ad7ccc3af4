"""The state of a task sequence: what is recorded after each task, and the run directory that makes it resumable.

`ContinualRecord` holds the finished tasks, their merged-update supports and the accuracy matrix, and builds the
report (`continual_metrics.json`). `RunDirectory` writes, after every task, the task's ledger file, the resume state
and the report; `load_run_state` and `restore_run_tensors` read the resume state back. Everything on disk is
safetensors (tensors) and JSON: nothing is unpickled, so a run dir handed over by someone else cannot run code when it
is resumed.

Resume state: `continual_state.json` is the commit point. It names the tensor file of the same task count
(`continual_state-NN.safetensors`: the merged adapted weights, W_past and the supports) and the ledger files with
their SHA-256, so a crash between two writes never pairs a state with the tensors or ledger of another task.

Only the main process (global rank 0) reads and writes the run dir; the other processes get what they need from it
by broadcast, so the run dir need only be on the main node's disk. The tensors go through the main process one layer
at a time: a write gathers each layer's entries from the processes that hold them (ZeRO-3) and streams it into the
file, a restore broadcasts each layer and every process keeps its own entries. No process holds the whole state.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import metrics
from ._deprecation import moved
from .entries import broadcast_from_main, broadcast_json, gather_entries_to_main, is_main_process
from .files import SAFETENSORS_DTYPES, SafetensorsWriter, read_json, write_json_atomic
from .ledger import STATE_FILE
from .osf import iter_adapted_layers
from .record import ContinualRecord
from .updates import MergedTaskUpdate

METRICS_FILE = "continual_metrics.json"
LEGACY_STATE_FILE = "continual_state.pt"  # jumplora_hf 0.1 (a pickle): refused, never loaded
STATE_FORMAT = 2


# ----------------------------------------------------------------------------- the resume state's tensors
def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _support_bytes(numel: int) -> int:
    return (numel + 7) // 8


def _state_specs(model: torch.nn.Module, record: ContinualRecord) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The tensors of the resume state, in the order they are written: per layer its merged weight (the float32 copy
    for bf16/fp16 weights) and W_past, then every finished task's support, a bit per entry."""
    specs = []
    for name, layer in iter_adapted_layers(model):
        shape = (layer.out_features, layer.in_features)
        specs.append((f"weight/{name}", layer.merged_weight().dtype, shape))
        if layer.ella_w_past is not None:
            specs.append((f"w_past/{name}", torch.float32, shape))
        if layer.olora_past_A is not None:  # whole on every process (r rows per task)
            specs.append((f"olora_A/{name}", torch.float32, tuple(layer.olora_past_A.shape)))
    for index, update in enumerate(record.updates):
        for name, numel in update.numels.items():
            specs.append((f"support/{index}/{name}", torch.uint8, (_support_bytes(numel),)))
    return specs


def _gathered_support(packed: np.ndarray, partition) -> torch.Tensor | None:
    """A whole layer's packed support on the main process, from every process's packed part of it."""
    if not partition.sharded:
        return torch.from_numpy(np.ascontiguousarray(packed)) if is_main_process() else None
    bits = torch.from_numpy(np.unpackbits(packed, count=partition.end - partition.start))
    whole = gather_entries_to_main(bits, partition)
    return None if whole is None else torch.from_numpy(np.packbits(whole.reshape(-1).numpy()))


def write_state(
    output_dir: str,
    record: ContinualRecord,
    model: torch.nn.Module,
    ledger: Sequence[dict],
    run: dict | None = None,
) -> None:
    """The resume state after `len(record.tasks)` tasks: the tensor file first, then the JSON that names it (the
    commit point). Every process must call it (ZeRO-3 layers are gathered one at a time); the main process writes."""
    count = len(record.tasks)
    tensor_file = f"continual_state-{count:02d}.safetensors"
    specs = _state_specs(model, record)
    writer, failure = None, None
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        writer = SafetensorsWriter(os.path.join(output_dir, tensor_file), specs)
        writer.set_metadata({"format": str(STATE_FORMAT)})

    def put(key: str, tensor: torch.Tensor | None) -> None:
        nonlocal writer, failure
        if writer is not None and tensor is not None:
            try:
                writer.add(key, tensor)
            except Exception as error:  # the other processes still gather: finish the loop, then fail everywhere
                failure, writer = error, writer.abort()

    layers = dict(iter_adapted_layers(model))
    for name, layer in layers.items():
        partition = layer.entry_partition()
        put(f"weight/{name}", gather_entries_to_main(layer.merged_weight(), partition))
        if layer.ella_w_past is not None:
            put(f"w_past/{name}", gather_entries_to_main(layer.ella_w_past, partition))
        if layer.olora_past_A is not None:
            put(f"olora_A/{name}", layer.olora_past_A.detach().cpu() if is_main_process() else None)
    for index, update in enumerate(record.updates):
        for name, packed in update.supports.items():
            put(f"support/{index}/{name}", _gathered_support(packed, layers[name].entry_partition()))
    if writer is not None:
        try:
            writer.close()
        except Exception as error:
            failure = error
    error = broadcast_json(None if failure is None else f"{type(failure).__name__}: {failure}")
    if error is not None:
        raise OSError(f"could not write the resume state in {output_dir}: {error}")
    if not is_main_process():
        return
    write_json_atomic(
        os.path.join(output_dir, STATE_FILE),
        {
            "format": STATE_FORMAT,
            "method": record.method,
            "tasks": record.tasks,
            "single_task_baselines": record.single_task_baselines,
            "metrics": record.metric_names[:count],
            "accuracy_matrix": record.accuracy_matrix,
            "numels": record.updates[-1].numels if record.updates else {},
            "taus": [u.taus for u in record.updates],
            "notes": {str(k): v for k, v in record.notes.items()},
            "tensors": {"file": tensor_file, "sha256": sha256_file(os.path.join(output_dir, tensor_file))},
            "ledger": sorted(ledger, key=lambda e: e["index"]),
            "run": run,  # what determines the result, and the world size: a restart is checked against it
        },
    )
    for old in glob.glob(os.path.join(output_dir, "continual_state-*.safetensors")):
        if os.path.basename(old) != tensor_file:
            os.remove(old)


@dataclass
class SavedRun:
    """A run dir's resume state: its record (finished tasks; their supports come with `restore_run_tensors`), the
    ledger files it lists, and its tensor file (read by the main process) with each tensor's dtype and shape."""

    record: ContinualRecord
    ledger: list[dict]
    tensor_path: str
    manifest: dict[str, list]
    run: dict | None = None  # the fingerprint of the run that wrote it (None: jumplora_hf 0.2 did not record it)


def run_differences(saved: dict | None, run: dict | None) -> list[str]:
    """The settings that determine the result and differ between a saved run and this one, as 'name: saved → now'.

    Tasks compare by their data, for the tasks both runs have (a sequence may grow: the task order itself is checked
    against the finished tasks)."""
    if not saved or not run:
        return []
    before, now = _flatten(saved.get("fields", {})), _flatten(run.get("fields", {}))
    differences = []
    for key in sorted(set(before) | set(now)):
        if key.startswith("tasks.") and (key not in before or key not in now):
            continue
        if before.get(key) != now.get(key):
            differences.append(f"{key}: {before.get(key)!r} → {now.get(key)!r}")
    return differences


def _flatten(fields: dict, prefix: str = "") -> dict:
    """{"training": {"seed": 1}} → {"training.seed": 1}, for the groups of a run fingerprint."""
    flat = {}
    for key, value in fields.items():
        if isinstance(value, dict) and (key in ("training", "adapters", "tasks") or prefix.startswith("tasks.")):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_run_state(output_dir: str, method: str, sequence: Sequence[str], run: dict | None = None) -> dict | None:
    """The main process's reading of the run dir: the state's JSON and the tensor file's manifest, checked."""
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
    differences = run_differences(saved.get("run"), run)
    if differences:
        raise ValueError(
            f"{path} holds a run with other settings, so continuing it would give neither run's result: "
            + "; ".join(differences)
            + f". Restart with the settings it was started with, or choose another output_dir (or remove {STATE_FILE} "
            "to start over there)"
        )
    tensor_path = os.path.join(output_dir, saved["tensors"]["file"])
    if not os.path.exists(tensor_path) or sha256_file(tensor_path) != saved["tensors"]["sha256"]:
        raise ValueError(
            f"{tensor_path} is missing or does not match {STATE_FILE}; the run dir is damaged: start in a new output_dir"
        )
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    with safe_open(tensor_path, framework="pt") as f:
        manifest = {key: [str(names[f.get_slice(key).get_dtype()]), f.get_slice(key).get_shape()] for key in f.keys()}
    return {"state": saved, "manifest": manifest}


def load_run_state(output_dir: str, method: str, sequence: Sequence[str], run: dict | None = None) -> SavedRun | None:
    """The resume state of `output_dir`, checked against this run (method, task order, and with `run` every setting
    that determines the result: see `run_differences`); None if there is none.

    Every process must call it: the main process reads the run dir and sends the result (or its refusal) to the
    others, so the other nodes need no copy of the run dir."""
    reading = None
    if is_main_process():
        try:
            reading = {"ok": _read_run_state(output_dir, method, sequence, run)}
        except ValueError as error:
            reading = {"error": str(error)}
    reading = broadcast_json(reading)
    if "error" in reading:
        raise ValueError(reading["error"])
    if reading["ok"] is None:
        return None
    saved, manifest = reading["ok"]["state"], reading["ok"]["manifest"]
    done = saved["tasks"]
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
    taus = saved.get("taus", [{}] * len(done))
    for index in range(len(done)):
        record.updates.append(MergedTaskUpdate(numels=dict(saved["numels"]), taus=dict(taus[index])))
    tensor_path = os.path.join(output_dir, saved["tensors"]["file"])
    return SavedRun(record, saved.get("ledger", []), tensor_path, manifest, saved.get("run"))


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


@torch.no_grad()
def restore_run_tensors(model: torch.nn.Module, saved: SavedRun, weights: bool = True) -> None:
    """Put the saved merged weights and W_past back into `model` (unless `weights` is False) and the supports into
    `saved.record`, one layer at a time. Every process must call it: the main process reads, the others receive."""
    layers = dict(iter_adapted_layers(model))
    saved_layers = {key.split("/", 1)[1] for key in saved.manifest if key.startswith("weight/")}
    if set(layers) != saved_layers:
        raise ValueError(
            f"the saved state adapts {len(saved_layers)} layers, this model {len(layers)}; resume with the same model "
            "and target_modules"
        )
    reader = safe_open(saved.tensor_path, framework="pt") if is_main_process() else None

    def receive(key: str) -> torch.Tensor:
        dtype, shape = saved.manifest[key]
        return broadcast_from_main(reader.get_tensor(key) if reader is not None else None, shape, _dtype(dtype))

    updates = saved.record.updates
    for name, layer in layers.items():
        partition = layer.entry_partition()
        if weights:
            layer.restore_merged_weight(partition.local(receive(f"weight/{name}")))
            past = f"w_past/{name}"
            layer.restore_w_past(partition.local(receive(past)) if past in saved.manifest else None)
            olora = f"olora_A/{name}"
            device = layer.lora_A[next(iter(layer.lora_A))].weight.device if layer.lora_A else None
            layer.olora_past_A = receive(olora).to(device) if olora in saved.manifest else None
        wholes = []
        for update in updates:
            packed = receive(f"support/{len(wholes)}/{name}").numpy()
            update.nonzeros[name] = int(np.bitwise_count(packed).sum())
            if wholes:
                update.jaccard[name] = float(np.mean([metrics.support_jaccard(packed, p) for p in wholes]))
            wholes.append(packed)
            if partition.sharded:
                bits = np.unpackbits(packed, count=partition.numel)[partition.start : partition.end]
                update.supports[name] = np.packbits(bits)
            else:
                update.supports[name] = packed


def saved_merged_weights(output_dir: str) -> dict[str, torch.Tensor]:
    """The merged adapted weights a run dir's resume state holds (after its last finished task), by layer name."""
    saved = read_json(os.path.join(output_dir, STATE_FILE))
    tensors = load_file(os.path.join(output_dir, saved["tensors"]["file"]))
    return {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("weight/")}


# the 0.2 names of what moved in 0.3
__getattr__ = moved(
    __name__, {"ContinualRecord": ("record", "ContinualRecord"), "RunDirectory": ("run_directory", "RunDirectory")}
)

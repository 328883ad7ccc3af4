"""The task ledger: the exact update every task added to every adapted weight, one safetensors file per task.

    <run_dir>/ledger/task-03-agnews.safetensors

JumpLoRA's updates are stored sparse (where ΔW_final ≠ 0 — as int32 flat indices, or as a bit per entry when that is
smaller, i.e. above 1/32 density — and the float32 values β·ΔW_final added there), the
dense methods' as their factors A and B (update = β·B·A, recomputed with the merge's own product). The file's
metadata holds the task (name, index), method, β, τ per threshold group, sparsity, steps, examples, a fingerprint of
the training data and the package version. From the base model and the ledger any subset of tasks can be composed,
bit-identical to the trained model for the full set (same device and dtype); a task can be reverted from a merged
model (W ← W − Δ_t), and a model checked against base + ledger.

    python -m jumplora_hf.ledger show RUN_DIR
    python -m jumplora_hf.ledger rebuild RUN_DIR --base BASE_MODEL --out DIR [--tasks 1,2,4]
    python -m jumplora_hf.ledger revert RUN_DIR --base BASE_MODEL --task agnews --out DIR   # compose all others
    python -m jumplora_hf.ledger revert RUN_DIR --model MERGED_MODEL --task agnews --out DIR  # subtract Δ_t
    python -m jumplora_hf.ledger verify RUN_DIR --base BASE_MODEL --model MERGED_MODEL
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open

from .files import SafetensorsWriter
from .metrics import pack_support, support_jaccard
from .updates import LayerUpdate, MergedTaskUpdate, dense_lora_delta

LEDGER_DIR = "ledger"
STATE_FILE = "continual_state.json"  # the run's commit point (state.py), which lists the committed ledger files
FORMAT = "jumplora-ledger/1"
PEFT_PREFIX = "base_model.model."
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "task"


def ledger_filename(index: int, name: str) -> str:
    """`task-03-agnews.safetensors` for the third task (1-based in the name, as the Hub tags)."""
    return f"task-{index + 1:02d}-{_slug(name)}.safetensors"


def module_name(layer_name: str) -> str:
    """The adapted module's name in the plain transformers model (without PEFT's `base_model.model.` prefix)."""
    return layer_name[len(PEFT_PREFIX) :] if layer_name.startswith(PEFT_PREFIX) else layer_name


@dataclass
class LedgerEntry:
    """One task's file: its metadata, and its per-layer updates loaded on demand."""

    path: str
    metadata: dict

    @property
    def index(self) -> int:
        return int(self.metadata["index"])

    @property
    def name(self) -> str:
        return self.metadata["task"]

    def layers(self) -> dict[str, LayerUpdate]:
        updates = {}
        with safe_open(self.path, framework="pt") as f:
            keys = set(f.keys())
            for module, info in self.metadata["layers"].items():
                shape, scaling = tuple(info["shape"]), float(info["scaling"])
                if f"{module}.indices" in keys or f"{module}.mask" in keys:
                    if f"{module}.mask" in keys:  # a bit per entry, for the denser updates
                        bits = np.unpackbits(f.get_tensor(f"{module}.mask").numpy(), count=shape[0] * shape[1])
                        indices = torch.from_numpy(np.flatnonzero(bits)).long()
                    else:
                        indices = f.get_tensor(f"{module}.indices").long()
                    updates[module] = LayerUpdate(
                        shape, scaling, indices=indices, values=f.get_tensor(f"{module}.values")
                    )
                else:
                    updates[module] = LayerUpdate(
                        shape,
                        scaling,
                        lora_A=f.get_tensor(f"{module}.lora_A"),
                        lora_B=f.get_tensor(f"{module}.lora_B"),
                    )
        return updates

    def supports(self) -> dict[str, np.ndarray]:
        return {module: pack_support((update.dense() != 0).numpy()) for module, update in self.layers().items()}


class TaskLedger:
    """The ledger of one run directory."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.folder = os.path.join(run_dir, LEDGER_DIR)

    # ----------------------------------------------------------------- writing
    def writer(self, index: int, name: str, method: str) -> LedgerWriter:
        """A writer of task `index`'s file that takes the layers one at a time (`add`), then `close(update, meta)`."""
        return LedgerWriter(os.path.join(self.folder, ledger_filename(index, name)), index, name, method)

    def write_task(
        self,
        index: int,
        name: str,
        method: str,
        update: MergedTaskUpdate,
        layers: dict[str, LayerUpdate],
        metadata: dict | None = None,
    ) -> str:
        """Write one task's updates (atomically); returns the file's path."""
        with self.writer(index, name, method) as writer:
            for layer_name, layer in layers.items():
                writer.add(layer_name, layer)
            return writer.close(update, metadata)

    # ----------------------------------------------------------------- reading
    def committed_files(self) -> set[str] | None:
        """The ledger files the run's resume state lists (the commit point), or None for a folder without one."""
        path = os.path.join(self.run_dir, STATE_FILE)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            listed = json.load(f).get("ledger", [])
        return {os.path.basename(e["file"]) for e in listed}

    def entries(self) -> list[LedgerEntry]:
        """The tasks of the ledger. A file the run state does not list (a task whose run died before committing it)
        is left out, with a warning."""
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(
                f"{self.run_dir} has no {LEDGER_DIR}/ folder: it was trained without a ledger, or is not a run dir"
            )
        committed = self.committed_files()
        entries, ignored = [], []
        for filename in sorted(os.listdir(self.folder)):
            if not filename.endswith(".safetensors"):
                continue
            if committed is not None and filename not in committed:
                ignored.append(filename)
                continue
            path = os.path.join(self.folder, filename)
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("jumplora", "{}"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} file")
            entries.append(LedgerEntry(path, meta))
        if ignored:
            warnings.warn(
                f"{self.folder}: {ignored} ignored: {STATE_FILE} does not list them (the run stopped before it "
                "committed those tasks; a restart of the run writes them again)",
                stacklevel=2,
            )
        return sorted(entries, key=lambda e: e.index)

    def select(self, tasks: Iterable[str | int] | None) -> list[LedgerEntry]:
        """The entries of `tasks` (names, or 1-based positions), in training order; all when None."""
        entries = self.entries()
        if tasks is None:
            return entries
        chosen = set()
        for task in tasks:
            match = [e for e in entries if e.name == str(task) or str(e.index + 1) == str(task)]
            if not match:
                raise ValueError(
                    f"no task {task!r} in the ledger of {self.run_dir}; it has {[e.name for e in entries]}"
                )
            chosen.add(match[0].index)
        return [e for e in entries if e.index in chosen]

    def summary(self) -> list[dict]:
        """Per task: method, steps, examples, τ, mean sparsity, and the mean Jaccard overlap with earlier tasks."""
        rows, earlier = [], []
        for entry in self.entries():
            supports = entry.supports()
            overlap = (
                [np.mean([support_jaccard(s, past[m]) for past in earlier]) for m, s in supports.items()]
                if earlier
                else []
            )
            meta = entry.metadata
            rows.append(
                {
                    "task": entry.index + 1,
                    "name": entry.name,
                    "method": meta["method"],
                    "steps": meta.get("steps"),
                    "examples": meta.get("examples"),
                    "tau": meta.get("tau"),
                    "sparsity": meta.get("sparsity_mean"),
                    "jaccard_with_earlier": float(np.mean(overlap)) if overlap else None,
                    "per_layer_sparsity": {m: info["sparsity"] for m, info in meta["layers"].items()},
                    "bytes": os.path.getsize(entry.path),
                }
            )
            earlier.append(supports)
        return rows

    # ----------------------------------------------------------------- composing
    def compose(self, model: torch.nn.Module, tasks: Iterable[str | int] | None = None) -> torch.nn.Module:
        """Add the updates of `tasks` (all by default) to `model` (the base model) in training order, exactly as the
        merges did: for bf16/fp16 weights through a float32 copy rounded once at the end. Returns `model`."""
        apply_entries(model, self.select(tasks), sign=1.0)
        return model

    def revert(self, model: torch.nn.Module, task: str | int) -> torch.nn.Module:
        """W ← W − Δ_task on a merged model (rounds once per weight in bf16; compose the others from the base model
        for an exact result)."""
        apply_entries(model, self.select([task]), sign=-1.0)
        return model

    def verify(self, model: torch.nn.Module, base: torch.nn.Module, tasks: Iterable[str | int] | None = None) -> float:
        """Max |W_model − W_(base + ledger)| over the adapted weights (0.0: bit-identical)."""
        rebuilt = self.compose(base, tasks)
        params = {name: param.detach() for name, param in model.named_parameters()}
        worst = 0.0
        for entry in self.select(tasks)[:1]:
            for module in entry.metadata["layers"]:
                reference = dict(rebuilt.named_parameters())[f"{module}.weight"].detach()
                worst = max(worst, float((params[f"{module}.weight"].float() - reference.float()).abs().max()))
        return worst


class LedgerWriter:
    """One task's ledger file, written a layer at a time (the main process receives each layer's update during the
    merge and never holds the whole task's); the file appears at `close`. Use it as a context manager."""

    def __init__(self, path: str, index: int, name: str, method: str):
        self.path, self.index, self.name, self.method = path, index, name, method
        self.layers: dict[str, dict] = {}
        self._names: dict[str, str] = {}  # module → layer name in the model
        self._file = SafetensorsWriter(path)

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()

    def add(self, layer_name: str, layer: LayerUpdate) -> None:
        module = module_name(layer_name)
        self._names[module] = layer_name
        self.layers[module] = {"shape": list(layer.shape), "scaling": layer.scaling}
        if layer.is_sparse:
            numel = layer.shape[0] * layer.shape[1]
            if 4 * len(layer.indices) > numel / 8:  # denser than 1/32: a bit per entry beats an int32 per nonzero
                mask = np.zeros(numel, dtype=bool)
                mask[layer.indices.numpy()] = True
                self._file.add(f"{module}.mask", torch.from_numpy(np.packbits(mask)))
            else:
                self._file.add(f"{module}.indices", layer.indices.to(torch.int32 if numel < 2**31 else torch.int64))
            self._file.add(f"{module}.values", layer.values.float())  # in flat order, as the indices
        else:
            self._file.add(f"{module}.lora_A", layer.lora_A)
            self._file.add(f"{module}.lora_B", layer.lora_B)

    def close(self, update: MergedTaskUpdate, metadata: dict | None = None) -> str:
        """Write the file with its metadata (τ and sparsity from `update`); returns its path."""
        from . import __version__

        sparsity = update.sparsity()
        for module, info in self.layers.items():
            info["sparsity"] = sparsity.get(self._names[module])
        meta = {
            "format": FORMAT,
            "task": self.name,
            "index": self.index,
            "method": self.method,
            "package_version": __version__,
            "tau": update.taus,
            "sparsity_mean": float(np.mean(list(sparsity.values()))) if sparsity else None,
            "layers": self.layers,
            **(metadata or {}),
        }
        self._file.set_metadata({"jumplora": json.dumps(meta)})
        return self._file.close()

    def abort(self) -> None:
        self._file.abort()


@torch.no_grad()
def apply_entries(model: torch.nn.Module, entries: Sequence[LedgerEntry], sign: float) -> None:
    params = dict(model.named_parameters())
    masters: dict[str, torch.Tensor] = {}
    for entry in entries:
        for module, update in entry.layers().items():
            key = f"{module}.weight"
            if key not in params:
                raise ValueError(
                    f"the ledger adapts {module}, which {type(model).__name__} does not have: is it the same base model?"
                )
            weight = params[key]
            if weight.shape != torch.Size(update.shape):
                raise ValueError(f"{key} has shape {tuple(weight.shape)}, the ledger's update {update.shape}")
            target = weight
            if weight.dtype in LOW_PRECISION:
                target = masters.setdefault(key, weight.detach().float().clone())
            _add(target, update, sign)
    for key, master in masters.items():
        params[key].copy_(master)


def _add(weight: torch.Tensor, update: LayerUpdate, sign: float) -> None:
    if update.is_sparse:
        values = update.values.to(weight.device)
        flat = weight.view(-1)
        indices = update.indices.to(weight.device)
        flat[indices] = flat[indices] + (values if sign > 0 else -values).to(weight.dtype)
    else:
        # B·A on the weight's device: the product training merged, so a rebuild on that device is bit-identical
        delta = dense_lora_delta(update.lora_A.to(weight.device), update.lora_B.to(weight.device)) * update.scaling
        weight.add_((delta if sign > 0 else -delta).to(weight.dtype))


# ----------------------------------------------------------------------------- CLI
def load_model(path: str):
    """A transformers checkpoint (causal LM or seq2seq) in its own dtype; a clear error for a missing local folder,
    and for one the Hub cannot give either."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    from .adapters import check_model_path

    check_model_path(path)
    hf_logging.disable_progress_bar()  # one line per command, not the loader's bars

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype="auto")


def save_model(model, out: str, source: str) -> None:
    """`model` and, when `source` has one, its tokenizer into `out`."""
    model.save_pretrained(out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jumplora_hf.ledger", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="list the tasks with sparsity and overlap")
    show.add_argument("run_dir")
    show.add_argument("--layers", action="store_true", help="also the sparsity of every layer")
    rebuild = sub.add_parser("rebuild", help="base model + the ledger (or a subset of its tasks)")
    revert = sub.add_parser("revert", help="take one task back out")
    verify = sub.add_parser("verify", help="does a model equal base + ledger?")
    for p in (rebuild, revert, verify):
        p.add_argument("run_dir")
        p.add_argument("--base", help="the base model (a folder or Hub id)")
    rebuild.add_argument("--tasks", help="comma-separated names or 1-based positions (default: all)")
    rebuild.add_argument("--out", required=True)
    revert.add_argument("--task", required=True)
    revert.add_argument("--model", help="the merged model to subtract from (without --base)")
    revert.add_argument("--out", required=True)
    verify.add_argument("--model", required=True)
    verify.add_argument("--tasks")
    args = parser.parse_args(argv)
    try:
        ledger = TaskLedger(args.run_dir)
        if args.command == "show":
            for row in ledger.summary():
                jac = (
                    ""
                    if row["jaccard_with_earlier"] is None
                    else f"  Jaccard with earlier {row['jaccard_with_earlier']:.3f}"
                )
                sparsity = "dense" if not row["sparsity"] else f"sparsity {100 * row['sparsity']:.1f}%"
                print(
                    f"task {row['task']} {row['name']} ({row['method']}): {sparsity}{jac}  {row['bytes'] / 1e6:.2f} MB"
                )
                if args.layers:
                    for module, value in row["per_layer_sparsity"].items():
                        print(f"    {module}: {100 * (value or 0):.1f}%")
            return 0
        if args.command in ("rebuild", "verify") or (args.command == "revert" and args.base):
            if not args.base:
                parser.error(f"{args.command} needs --base")
        tasks = args.tasks.split(",") if getattr(args, "tasks", None) else None
        if args.command == "rebuild":
            save_model(ledger.compose(load_model(args.base), tasks), args.out, args.base)
        elif args.command == "revert":
            if args.base:
                keep = [e.name for e in ledger.entries() if e not in ledger.select([args.task])]
                save_model(ledger.compose(load_model(args.base), keep), args.out, args.base)
            elif args.model:
                save_model(ledger.revert(load_model(args.model), args.task), args.out, args.model)
            else:
                parser.error("revert needs --base (exact: compose every other task) or --model (subtract)")
        else:
            worst = ledger.verify(load_model(args.model), load_model(args.base), tasks)
            print(f"max |model − (base + ledger)| = {worst:.3g}" + ("  (bit-identical)" if worst == 0 else ""))
            return 0 if worst == 0 else 1
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

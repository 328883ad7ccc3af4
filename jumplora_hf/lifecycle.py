"""The life of one task (Algorithm 1), in one place: begin, every step, end; and the events it announces.

    begin_task   A Kaiming uniform from (seed, task), B = 0, gate open, γ = 0           → on_task_begin
    gate_step    before each optimizer step s of the task: γ = clip((s − S_start)/(S_final − S_start), 0, 1);
                 at the first s ≥ S_start, τ such that #{|ΔW| > τ} = #A + #B          → on_task_step
    end_task     W ← W + β·ΔW_final (W_past += ΔW_final for ELLA), B = 0               → on_task_end(update)
    (evaluation of every task seen so far, by the trainer)                              → on_task_evaluated

`TaskSequence` drives these over a task sequence inside one `Trainer.train()` (ContinualSeq2SeqTrainer);
`JumpLoRATrainerCallback` (callback.py) drives them for one task per `train()` of any Trainer. Whatever listens
(the γ/τ schedule, ELLA, logging, the run directory, progress lines) is a `ContinualCallback` in the Trainer's
callback list and only receives these events: the order of the callback list does not matter, and no callback
reaches into the trainer. The layer-level operations are `JumpLoraLinear.reset_task_adapter`/`fold_final_delta`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .entries import all_reduce_sum, is_main_process
from .files import write_json_atomic
from .gate import interpolation_gamma
from .layer import JumpLoraLinear, iter_jumplora_layers, set_interpolation_gamma
from .metrics import pack_support
from .sequence import TaskSpan, reset_optimizer_state
from .thresholds import initialize_thresholds, threshold_statistics
from .zero import gathered_adapters, writing_adapters

CHECKPOINT_STATE_FILE = "jumplora_state.json"  # in each Trainer checkpoint folder, beside trainer_state.json


@dataclass
class LayerUpdate:
    """Exactly what one task added to one adapted weight: W ← W + update (float32, already scaled by β).

    Sparse (JumpLoRA): the flat indices of ΔW_final ≠ 0 and the values added there. Dense (IncLoRA, ELLA): the
    factors, update = β·(B·A) in float32, recomputed with the same product as the merge.
    """

    shape: tuple[int, int]
    scaling: float
    indices: torch.Tensor | None = None  # int64, flat
    values: torch.Tensor | None = None  # float32, β·ΔW_final at `indices`
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    def dense(self) -> torch.Tensor:
        """The update as a d_out × d_in float32 tensor."""
        if self.is_sparse:
            out = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.float32)
            out[self.indices] = self.values
            return out.view(self.shape)
        return dense_lora_delta(self.lora_A, self.lora_B) * self.scaling


def dense_lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """ΔW = B·A in float32, the product `JumpLoraLinear.delta_weight` computes."""
    if lora_A.dtype in (torch.float16, torch.bfloat16):
        lora_A, lora_B = lora_A.float(), lora_B.float()
    return (lora_B @ lora_A).float()


@dataclass
class MergedTaskUpdate:
    """What a task left in the base weights, per adapted layer: the support of ΔW_final (bit-packed, over this
    process's entries: the whole layer, or under ZeRO-3 its partition), the whole layer's entry and support counts,
    the mean Jaccard overlap of the support with each earlier task's (computed at the merge, over every process), and
    τ per threshold group."""

    supports: dict[str, np.ndarray] = field(default_factory=dict)
    numels: dict[str, int] = field(default_factory=dict)
    nonzeros: dict[str, int] = field(default_factory=dict)
    jaccard: dict[str, float] = field(default_factory=dict)  # empty for the first task
    taus: dict[str, float] = field(default_factory=dict)  # τ per threshold group at the merge (JumpLoRA)
    workspace_bytes: int = 0  # the largest transient tensors of one layer's merge on this process

    def sparsity(self) -> dict[str, float]:
        return {name: 1.0 - self.nonzeros[name] / self.numels[name] for name in self.numels}

    def support_nbytes(self) -> int:
        return sum(packed.nbytes for packed in self.supports.values())


class ContinualCallback(TrainerCallback):
    """A `TrainerCallback` that also receives the task events. Override any of them; each gets the Trainer's
    `args, state, control` and keyword arguments: `task` (a `TaskSpan`), `model`, and per event:

    - `on_task_begin`: the adapters are fresh (ΔW = 0) and the optimizer state is empty (`optimizer`); with
      `resumed=True` instead, a restart continues the task from a checkpoint (its adapters and optimizer state
      restored), and `load_task_state` follows with what `task_state` saved there;
    - `on_task_step`: before the forward of each optimizer step, after the gate's γ/τ of that step are set
      (`step` is the step within the task);
    - `on_task_log`: `logs`, the dict about to be logged (add scalars to it; they reach `log_history` and every
      `report_to` backend);
    - `on_task_layer_merged` (main process only): `name` and `layer_update`, the exact `LayerUpdate` one adapted
      layer just received, one call per layer during the merge (the ledger streams them to disk);
    - `on_task_end`: `update`, the `MergedTaskUpdate` just merged into the base weights, and `record` (add what
      the report should say about the task with `record.note(task.index, key=value)`);
    - `on_task_evaluated`: `row` (the accuracies after this task) and `record` (the `ContinualRecord` so far).
    """

    def on_task_begin(self, args, state, control, **kwargs):
        pass

    def on_task_step(self, args, state, control, **kwargs):
        pass

    def on_task_log(self, args, state, control, **kwargs):
        pass

    def on_task_layer_merged(self, args, state, control, **kwargs):
        pass

    def task_state(self) -> dict | None:
        """JSON of what this listener must carry to continue the current task after a restart (saved with every
        Trainer checkpoint); None if nothing."""
        return None

    def load_task_state(self, state: dict, model=None) -> None:
        """Put back what `task_state` returned, after `on_task_begin(resumed=True)` of the resumed task."""

    def on_task_end(self, args, state, control, **kwargs):
        pass

    def on_task_evaluated(self, args, state, control, **kwargs):
        pass


def dispatch(callbacks: Sequence, event: str, args, state, control, **kwargs) -> None:
    """Call `event` on every ContinualCallback of `callbacks` (the Trainer's callback list)."""
    for callback in callbacks:
        if isinstance(callback, ContinualCallback):
            getattr(callback, event)(args, state, control, **kwargs)


# ----------------------------------------------------------------------------- the task's operations
def task_generator(seed: int, task_index: int) -> torch.Generator:
    """The generator of a task's fresh A: the same on every rank and across reruns, whatever else used the RNG."""
    return torch.Generator().manual_seed(seed * 1_000_003 + task_index)


def begin_task(model: torch.nn.Module, task_index: int, seed: int, adapter: str = "default") -> None:
    """Re-initialise every adapter in place (A Kaiming uniform from (seed, task_index), B = 0, gate open, γ = 0)."""
    generator = task_generator(seed, task_index)
    for _, layer in iter_jumplora_layers(model):
        if adapter in layer.lora_A:
            layer.reset_task_adapter(adapter, generator)


def gate_step(model: torch.nn.Module, config, step: int, num_steps: int, adapter: str = "default") -> float:
    """Set γ for the task's optimizer step `step` (0-based) of `num_steps`; initialise τ at the first step ≥ S_start.

    `config` is the adapter's JumpLoraConfig (its s_start / s_final fractions). Returns γ.
    """
    start, final = round(config.s_start * num_steps), round(config.s_final * num_steps)
    if step >= start and not _thresholds_ready(model, adapter):
        with writing_adapters(model):  # every rank sees the whole ΔW; rank 0's τ is kept (ZeRO-3)
            initialize_thresholds(model, adapter)
    gamma = interpolation_gamma(step, start, final)
    set_interpolation_gamma(model, gamma, adapter)
    return gamma


def _thresholds_ready(model: torch.nn.Module, adapter: str) -> bool:
    for _, layer in iter_jumplora_layers(model):
        if layer.is_jump(adapter):
            return layer.jump_tau_ready[adapter]
    return True


def _sparse_update(layer: JumpLoraLinear, adapter: str, final: torch.Tensor) -> LayerUpdate:
    scaling = float(layer.scaling[adapter])
    flat = final.reshape(-1).cpu()  # extracted in host memory: the device holds only the layer's ΔW_final
    indices = torch.nonzero(flat, as_tuple=True)[0]
    return LayerUpdate(tuple(final.shape), scaling, indices=indices, values=flat[indices] * scaling)


def _dense_update(layer: JumpLoraLinear, adapter: str) -> LayerUpdate:
    a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
    shape = (layer.out_features, layer.in_features)
    return LayerUpdate(shape, float(layer.scaling[adapter]), lora_A=a.cpu().clone(), lora_B=b.cpu().clone())


def end_task(
    model: torch.nn.Module,
    accumulate_w_past: bool,
    adapter: str = "default",
    on_layer: Callable[[str, LayerUpdate], None] | None = None,
    previous: Sequence[MergedTaskUpdate] = (),
) -> MergedTaskUpdate:
    """W ← W + β·ΔW_final for every adapted layer (and W_past ← W_past + ΔW_final for ELLA), one layer at a time.

    The adapters (A, B, τ) must be whole on every process (`zero.writing_adapters`); the base weights are not
    gathered: each process writes its own entries (entries.py), so the extra memory of the merge is one layer's
    ΔW_final. The adapters' update is removed (B = 0), so the model then computes the merged base model alone.
    `on_layer(name, layer_update)`, on the main process, receives each layer's exact update as it is merged (the
    ledger); `previous` are the earlier tasks' updates, for the overlap of the supports. Every process must call it.
    """
    update = MergedTaskUpdate()
    main = is_main_process()
    counts, partitions = [], []
    for name, layer in iter_jumplora_layers(model):
        if adapter not in layer.lora_A:
            continue
        dense = _dense_update(layer, adapter) if on_layer is not None and main and not layer.is_jump(adapter) else None
        if layer.is_jump(adapter) and layer.jump_threshold_group[adapter] not in update.taus:
            update.taus[layer.jump_threshold_group[adapter]] = float(layer.log_tau(adapter).detach().exp())
        final = layer.fold_final_delta(adapter, accumulate_w_past)  # zeroes B: the factors are read before
        partition = layer.jump_partition
        local = partition.local(final) != 0
        masks = 2 * final.numel() if layer.is_jump(adapter) else 0  # gate.hard_threshold_ (see merge_workspace_nbytes)
        update.workspace_bytes = max(
            update.workspace_bytes, final.numel() * final.element_size() + masks + local.numel()
        )
        if on_layer is not None and main:
            on_layer(name, dense if dense is not None else _sparse_update(layer, adapter, final))
        del final
        packed = pack_support(local.cpu().numpy())
        del local
        update.supports[name] = packed
        update.numels[name] = partition.numel
        row = [int(np.bitwise_count(packed).sum())]
        for past in previous:
            row += [
                int(np.bitwise_count(packed & past.supports[name]).sum()),
                int(np.bitwise_count(packed | past.supports[name]).sum()),
            ]
        counts.append(row)
        partitions.append(partition)
    _sum_over_partitions(counts, partitions)
    for (name, numel), row in zip(update.numels.items(), counts):
        update.nonzeros[name] = row[0]
        if previous:
            pairs = [(row[1 + 2 * p], row[2 + 2 * p]) for p in range(len(previous))]
            update.jaccard[name] = float(np.mean([inter / union if union else 0.0 for inter, union in pairs]))
    return update


def _sum_over_partitions(counts: list[list[int]], partitions: list) -> None:
    """Sum, in place, the counts of the layers whose entries are spread over processes (one all-reduce)."""
    rows = [i for i, p in enumerate(partitions) if p.sharded]
    if not rows:
        return
    group = partitions[rows[0]].group
    summed = all_reduce_sum(torch.tensor([counts[i] for i in rows], dtype=torch.int64), group).tolist()
    for i, row in zip(rows, summed):
        counts[i] = row


# ----------------------------------------------------------------------------- listeners of the lifecycle
class JumpLoRASchedule(ContinualCallback):
    """The γ schedule and the τ initialisation of every task, and the `jump/*` scalars of its logs."""

    def __init__(self, adapter_name: str = "default"):
        self.adapter_name = adapter_name

    def _config(self, model):
        config = getattr(model, "peft_config", {}).get(self.adapter_name)
        return config if getattr(config, "use_jumprelu", False) else None

    def on_task_step(self, args, state, control, task=None, step=0, model=None, **kwargs):
        config = self._config(model)
        if config is not None:
            gate_step(model, config, step, task.num_steps, self.adapter_name)

    def on_task_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._config(model) is not None and logs is not None:
            with gathered_adapters(model):
                logs.update(threshold_statistics(model, self.adapter_name))


class TaskSequence(TrainerCallback):
    """Runs the tasks of `spans` inside one `Trainer.train()`: each begins at its first optimizer step and is
    finished once its last step is done and logged (at the next step's start, or at the end of training: the
    Trainer logs a step after `on_step_end`, so the logs of a task's last step still describe its adapters).

    Its inputs are its own: the spans, the seed, what to do once the engine exists (`start`: restore a resumed run's
    state) and at a task's start (`prepare`), how to evaluate (`evaluate(task) -> row`), the record it fills and the
    callbacks it announces the events to; for checkpoints, what identifies the run (`run`, written into every Trainer
    checkpoint with the listeners' `task_state()`), and, when the Trainer resumes inside a task, the listeners' state
    saved there (`resumed_listeners`).

    Resumed inside a task (the Trainer restored the adapters, optimizer, scheduler and RNG of a checkpoint), the task
    does not begin again: its listeners get `on_task_begin(resumed=True)` and then their saved `task_state`.
    """

    def __init__(
        self,
        spans: Sequence[TaskSpan],
        seed: int,
        record,
        evaluate: Callable[[TaskSpan], list],
        callbacks: Callable[[], Sequence],
        accumulate_w_past: bool,
        prepare: Callable[[torch.nn.Module], None] | None = None,
        start: Callable[[torch.nn.Module], None] | None = None,
        run: dict | None = None,
        resumed_listeners: dict | None = None,
    ):
        self.spans, self.seed, self.record = list(spans), seed, record
        self.evaluate, self.callbacks, self.prepare, self.start = evaluate, callbacks, prepare, start
        self.accumulate_w_past = accumulate_w_past
        self.run, self.resumed_listeners = run, resumed_listeners
        self.current: TaskSpan | None = None

    def _span_at(self, step: int, attribute: str) -> TaskSpan | None:
        return next((s for s in self.spans if getattr(s, attribute) == step), None)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.start is not None:  # the engine exists: under ZeRO-3 the weights are partitioned by now
            self.start(model)
        for _, layer in iter_jumplora_layers(model):  # γ and τ of the adapters a checkpoint may have restored
            for adapter in layer.lora_gate_state:
                layer.sync_gate_mirrors(adapter)
        inside = next((s for s in self.spans if s.first_step < state.global_step < s.end_step), None)
        if inside is not None:
            self.current = inside
            callbacks = self.callbacks()
            dispatch(
                callbacks,
                "on_task_begin",
                args,
                state,
                control,
                task=inside,
                model=model,
                optimizer=optimizer,
                resumed=True,
            )
            saved = self.resumed_listeners or {}
            for callback in callbacks:
                if isinstance(callback, ContinualCallback) and type(callback).__name__ in saved:
                    callback.load_task_state(saved[type(callback).__name__], model=model)

    def on_save(self, args, state, control, **kwargs):
        """Next to the Trainer's checkpoint: what identifies the run and the listeners' state inside the task."""
        if not is_main_process():
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            return
        listeners = {}
        for callback in self.callbacks():
            if isinstance(callback, ContinualCallback) and callback.task_state() is not None:
                listeners[type(callback).__name__] = callback.task_state()
        write_json_atomic(
            os.path.join(folder, CHECKPOINT_STATE_FILE),
            {
                "format": 1,
                "global_step": state.global_step,
                "task": self.current.index if self.current is not None else None,
                "total_steps": self.spans[-1].end_step if self.spans else 0,
                "run": self.run,
                "listeners": listeners,
            },
        )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        ending = self._span_at(state.global_step, "end_step")
        if ending is not None and not self.record.has_finished(ending.index):
            self._end(args, state, control, ending, model)
        beginning = self._span_at(state.global_step, "first_step")
        if beginning is not None:
            self._begin(args, state, control, beginning, model, optimizer)
        if self.current is not None:
            step = state.global_step - self.current.first_step
            dispatch(self.callbacks(), "on_task_step", args, state, control, task=self.current, step=step, model=model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        ending = self._span_at(state.global_step, "end_step")
        if ending is not None and not self.record.has_finished(ending.index):
            self._end(args, state, control, ending, model)

    def _begin(self, args, state, control, task: TaskSpan, model, optimizer) -> None:
        self.current = task
        set_seed(self.seed + task.index)  # dropout etc. of a task independent of the tasks before it
        if self.prepare is not None:
            self.prepare(model)
        with writing_adapters(model):
            begin_task(model, task.index, self.seed)
        reset_optimizer_state(optimizer)  # Adam moments and step count start afresh, as in a new optimizer
        dispatch(self.callbacks(), "on_task_begin", args, state, control, task=task, model=model, optimizer=optimizer)

    def _end(self, args, state, control, task: TaskSpan, model) -> None:
        callbacks = self.callbacks()

        def merged(name: str, layer_update: LayerUpdate) -> None:
            dispatch(
                callbacks,
                "on_task_layer_merged",
                args,
                state,
                control,
                task=task,
                name=name,
                layer_update=layer_update,
                record=self.record,
            )

        with writing_adapters(model):  # A, B and τ whole on every process; the base weights are written in place
            update = end_task(model, self.accumulate_w_past, on_layer=merged, previous=self.record.updates)
        self.record.add_task(task.name, update)
        dispatch(
            self.callbacks(),
            "on_task_end",
            args,
            state,
            control,
            task=task,
            update=update,
            record=self.record,
            model=model,
        )
        row = self.evaluate(task)
        self.record.add_row(task.index, row)
        dispatch(
            self.callbacks(),
            "on_task_evaluated",
            args,
            state,
            control,
            task=task,
            row=row,
            record=self.record,
            model=model,
        )
        self.current = None

"""The life of one task (Algorithm 1), in one place: begin, every step, end.

    begin_task   A Kaiming uniform from (seed, task), B = 0, gate open, γ = 0           → on_task_begin
    gate_step    before each optimizer step s of the task: γ = clip((s − S_start)/(S_final − S_start), 0, 1);
                 at the first s ≥ S_start, τ such that #{|ΔW| > τ} = #A + #B          → on_task_step
    end_task     W ← W + β·ΔW_final (W_past += ΔW_final for ELLA), B = 0               → on_task_end(update)

`TaskSequence` (sequence.py) runs them over a task sequence inside one `Trainer.train()`; `JumpLoraCallback`
(trainer_callback.py) for one task per `train()` of any Trainer; the events they announce are callback.py's. The
layer-level operations are `JumpLoraLinear.reset_task_adapter` / `fold_final_delta`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ._deprecation import moved
from .entries import all_reduce_sum, is_main_process
from .gate import interpolation_gamma
from .layer import JumpLoraLinear, iter_jumplora_layers, set_interpolation_gamma
from .metrics import pack_support
from .thresholds import initialize_thresholds
from .updates import LayerUpdate, MergedTaskUpdate
from .zero import writing_adapters


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
    supports = SupportTally(update, previous)
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
        supports.add(name, local, partition)
        del local
    supports.finish()
    return update


class SupportTally:
    """The supports of one task's merged updates, layer by layer: each layer's bits (this process's entries) and the
    counts behind its sparsity and its overlap with the earlier tasks' supports (`previous`), summed at `finish()`
    over the processes that share a layer's entries (one all-reduce)."""

    def __init__(self, update: MergedTaskUpdate, previous: Sequence[MergedTaskUpdate]):
        self.update, self.previous = update, previous
        self.counts: list[list[int]] = []
        self.partitions: list = []

    def add(self, name: str, local_support: torch.Tensor, partition) -> None:
        packed = pack_support(local_support.cpu().numpy())
        self.update.supports[name] = packed
        self.update.numels[name] = partition.numel
        row = [int(np.bitwise_count(packed).sum())]
        for past in self.previous:
            row += [
                int(np.bitwise_count(packed & past.supports[name]).sum()),
                int(np.bitwise_count(packed | past.supports[name]).sum()),
            ]
        self.counts.append(row)
        self.partitions.append(partition)

    def finish(self) -> None:
        counts, partitions = self.counts, self.partitions
        rows = [i for i, p in enumerate(partitions) if p.sharded]
        if rows:
            group = partitions[rows[0]].group
            summed = all_reduce_sum(torch.tensor([counts[i] for i in rows], dtype=torch.int64), group).tolist()
            for i, row in zip(rows, summed):
                counts[i] = row
        for name, row in zip(self.update.numels, counts):
            self.update.nonzeros[name] = row[0]
            if self.previous:
                pairs = [(row[1 + 2 * p], row[2 + 2 * p]) for p in range(len(self.previous))]
                self.update.jaccard[name] = float(np.mean([inter / union if union else 0.0 for inter, union in pairs]))


# the 0.2 names of what moved in 0.3
__getattr__ = moved(
    __name__,
    {
        "ContinualCallback": ("callback", "ContinualCallback"),
        "dispatch": ("callback", "dispatch"),
        "LayerUpdate": ("updates", "LayerUpdate"),
        "MergedTaskUpdate": ("updates", "MergedTaskUpdate"),
        "dense_lora_delta": ("updates", "dense_lora_delta"),
        "JumpLoRASchedule": ("schedule", "JumpLoraSchedule"),
        "TaskSequence": ("sequence", "TaskSequence"),
        "CHECKPOINT_STATE_FILE": ("sequence", "CHECKPOINT_STATE_FILE"),
    },
)

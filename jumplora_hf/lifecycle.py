"""The per-task lifecycle of Algorithm 1: a fresh adapter at task start, the sparse merge at task end."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .layer import iter_jumplora_layers
from .metrics import pack_support, support_sparsity


@dataclass
class MergedTaskUpdate:
    """What a task left in the base weights: per adapted layer, the support of ΔW_final."""

    supports: dict[str, np.ndarray] = field(default_factory=dict)  # packed bits of ΔW_final != 0
    numels: dict[str, int] = field(default_factory=dict)

    def sparsity(self) -> dict[str, float]:
        return {name: support_sparsity(packed, self.numels[name]) for name, packed in self.supports.items()}


def begin_task(model: torch.nn.Module, task_index: int, seed: int, adapter: str = "default") -> None:
    """Re-initialise every adapter in place (A Kaiming uniform, B = 0, gate open, γ = 0).

    A generator seeded from (seed, task_index) makes A identical on every rank and across reruns,
    whatever else consumed the global RNG before.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + task_index)
    for _, layer in iter_jumplora_layers(model):
        if adapter in layer.lora_A:
            layer.reset_task_adapter(adapter, generator)


def end_task(model: torch.nn.Module, accumulate_w_past: bool, adapter: str = "default") -> MergedTaskUpdate:
    """W ← W + β·ΔW_final for every adapted layer (and W_past ← W_past + ΔW_final for ELLA).

    The adapters' update is removed (B = 0), so the model then computes the merged base model alone.
    """
    update = MergedTaskUpdate()
    for name, layer in iter_jumplora_layers(model):
        if adapter not in layer.lora_A:
            continue
        final = layer.fold_final_delta(adapter, accumulate_w_past)
        update.supports[name] = pack_support((final != 0).cpu().numpy())
        update.numels[name] = final.numel()
    return update


def merged_state(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """What the finished tasks left in the model: the adapted layers' base weights and W_past (on CPU)."""
    weights, w_past = {}, {}
    for name, layer in iter_jumplora_layers(model):
        weights[name] = layer.get_base_layer().weight.detach().cpu().clone()
        if layer.ella_w_past is not None:
            w_past[name] = layer.ella_w_past.detach().cpu().clone()
    return {"weights": weights, "w_past": w_past}


@torch.no_grad()
def restore_merged_state(model: torch.nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put `merged_state(...)` of an earlier run back into a model built the same way."""
    layers = dict(iter_jumplora_layers(model))
    if set(layers) != set(state["weights"]):
        raise ValueError(
            f"the saved state adapts {len(state['weights'])} layers, this model {len(layers)}; "
            "resume with the same model and target_modules"
        )
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        weight.copy_(state["weights"][name].to(weight.device, weight.dtype))
        past = state["w_past"].get(name)
        layer.ella_w_past = None if past is None else past.to(weight.device)

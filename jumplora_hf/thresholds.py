"""Threshold initialisation at S_start and threshold statistics.

At S_start each τ is set so that, over its threshold group, exactly as many entries of |ΔW| exceed τ
as the group's A and B matrices have parameters (Algorithm 1, line 8). The k-th value is found by a
radix select over the float32 bit patterns of |ΔW| (non-negative floats order like their bits), in
two 16-bit passes that each recompute one layer's ΔW at a time: peak extra memory is about one
layer's ΔW, never the concatenation of all of them, and the result equals `torch.kthvalue` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .layer import JumpLoraLinear, iter_jumplora_layers

_BINS = 1 << 16
_TINY = torch.finfo(torch.float32).tiny


def _abs_bits(layer: JumpLoraLinear, adapter: str) -> torch.Tensor:
    with torch.no_grad():
        return layer.delta_weight(adapter).float().abs().flatten().view(torch.int32)


def _select_bin(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bin holding the `rank`-th smallest (1-based) element, and the rank inside that bin."""
    cumulative = histogram.cumsum(0)
    index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype, device=cumulative.device)))
    below = int(cumulative[index - 1]) if index > 0 else 0
    return index, rank - below


def kth_smallest_abs_delta(layers: Sequence[JumpLoraLinear], adapter: str, rank: int) -> float:
    """The `rank`-th smallest (1-based) |ΔW| entry over `layers`, streaming layer by layer."""
    device = layers[0].lora_A[adapter].weight.device
    high = torch.zeros(_BINS, dtype=torch.int64, device=device)
    for layer in layers:
        high += torch.bincount(_abs_bits(layer, adapter) >> 16, minlength=_BINS)
    high_bin, rank_in_bin = _select_bin(high, rank)
    low = torch.zeros(_BINS, dtype=torch.int64, device=device)
    for layer in layers:
        bits = _abs_bits(layer, adapter)
        low += torch.bincount(bits[(bits >> 16) == high_bin] & 0xFFFF, minlength=_BINS)
    low_bin, _ = _select_bin(low, rank_in_bin)
    return torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32).item()


def threshold_groups(model: torch.nn.Module, adapter: str = "default") -> dict[int, list[JumpLoraLinear]]:
    """Layers grouped by the log τ parameter they share (the tie *is* the group)."""
    groups: dict[int, list[JumpLoraLinear]] = {}
    for _, layer in iter_jumplora_layers(model):
        if layer.is_jump(adapter):
            groups.setdefault(id(layer.lora_log_tau[adapter]), []).append(layer)
    return groups


def tie_thresholds(model: torch.nn.Module, adapter: str | None = None) -> int:
    """Make the layers of each threshold group share one log τ parameter; returns the number of groups.

    Called when the model is built (`get_jumplora_model`, `load_jumplora_adapter`, and by the trainer and the
    callback for models that PEFT or trl built), before any optimizer exists: the optimizer must see the shared
    parameter. Idempotent. All adapters when `adapter` is None.
    """
    groups: dict[tuple[str, str], torch.nn.Parameter] = {}
    for _, layer in iter_jumplora_layers(model):
        for name in list(layer.lora_log_tau):
            if adapter is not None and name != adapter:
                continue
            key = (name, layer.jump_threshold_group[name])
            shared = groups.setdefault(key, layer.lora_log_tau[name])
            if layer.lora_log_tau[name] is not shared:
                if shared.device != layer.lora_log_tau[name].device:
                    raise ValueError(
                        f"threshold group {key[1]!r} spans layers on {shared.device} and {layer.lora_log_tau[name].device}; "
                        "put the adapted layers on one device or use threshold_mode='per_module'"
                    )
                layer.lora_log_tau[name] = shared
    return len(groups)


def thresholds_are_tied(model: torch.nn.Module, adapter: str = "default") -> bool:
    """Whether every threshold group shares one parameter (see `tie_thresholds`)."""
    names = {}
    for _, layer in iter_jumplora_layers(model):
        if layer.is_jump(adapter):
            names.setdefault(layer.jump_threshold_group[adapter], set()).add(id(layer.lora_log_tau[adapter]))
    return all(len(ids) == 1 for ids in names.values())


def _log_tau_between(low: float, high: float) -> float:
    """A float32 log τ with low ≤ exp(log τ) < high as float32 computes it (log/exp do not round-trip)."""
    log_tau = torch.tensor(math.log(max(low, _TINY)), dtype=torch.float32)
    for _ in range(64):
        if log_tau.exp().item() < low:
            log_tau = torch.nextafter(log_tau, torch.tensor(math.inf))
        elif log_tau.exp().item() >= high and log_tau.exp().item() > low:
            log_tau = torch.nextafter(log_tau, torch.tensor(-math.inf))
        else:
            break
    return log_tau.item()


def initialize_thresholds(model: torch.nn.Module, adapter: str = "default") -> dict[str, float]:
    """Set every group's τ so that #{|ΔW| > τ} = #params(A, B) of the group; returns τ per group name."""
    taus = {}
    for layers in threshold_groups(model, adapter).values():
        budget = sum(layer.lora_A[adapter].weight.numel() + layer.lora_B[adapter].weight.numel() for layer in layers)
        entries = sum(layer.in_features * layer.out_features for layer in layers)
        rank = entries - budget  # the `budget` largest entries must exceed τ: v_rank ≤ τ < v_rank+1
        if rank >= 1:
            low = kth_smallest_abs_delta(layers, adapter, rank)
            high = kth_smallest_abs_delta(layers, adapter, rank + 1)
        else:  # fewer entries than adapter parameters: everything survives
            low, high = 0.0, math.inf
        # τ = 0 (e.g. ΔW still all zero) would make log τ infinite: keep the smallest normal float instead
        log_tau = _log_tau_between(max(low, _TINY), high)
        for layer in layers:
            layer.set_log_tau(adapter, log_tau)
        taus[layers[0].jump_threshold_group[adapter]] = math.exp(log_tau)
    return taus


@torch.no_grad()
def threshold_statistics(model: torch.nn.Module, adapter: str = "default") -> dict[str, float]:
    """γ, and once τ is set (S_start) the τ summary over groups and the sparsity of ΔW_jump over all JumpLoRA layers.
    Before S_start the gate is open (τ is a placeholder, the smallest float32): no τ is logged then."""
    groups = threshold_groups(model, adapter)
    if not groups:
        return {}
    first = next(iter(groups.values()))[0]
    stats = {"jump/gamma": first.jump_gamma[adapter]}
    if first.jump_tau_ready[adapter]:
        taus = [layers[0].log_tau(adapter).exp().item() for layers in groups.values()]
        stats.update({"jump/tau_min": min(taus), "jump/tau_mean": sum(taus) / len(taus), "jump/tau_max": max(taus)})
        kept = total = 0
        for layers in groups.values():
            for layer in layers:
                kept += int((layer.final_delta(adapter) != 0).sum())
                total += layer.in_features * layer.out_features
        stats["jump/sparsity"] = 1.0 - kept / total
    return stats

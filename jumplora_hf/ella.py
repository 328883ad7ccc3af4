"""The ELLA regulariser λ·‖ΔW_x ⊙ W_past‖²_F, averaged over adapted layers (Biswas et al. 2026)."""

from __future__ import annotations

import torch

from .layer import iter_jumplora_layers

ELLA_DELTA_MODES = ("sparse", "interpolated")


def ella_penalty(model: torch.nn.Module, mode: str = "sparse", adapter: str = "default") -> torch.Tensor | None:
    """mean over adapted layers of ‖ΔW_x ⊙ W_past‖²_F (without λ); None before any task was merged.

    ΔW_x is the raw update (no LoRA scale), as W_past accumulates raw ΔW_final (Algorithm 1, line 21):
    "sparse" uses ΔW_jump once τ is initialised (the dense ΔW before S_start), "interpolated" ΔW_interp.
    """
    if mode not in ELLA_DELTA_MODES:
        raise ValueError(f"unknown ELLA delta mode {mode!r}; use one of {ELLA_DELTA_MODES}")
    terms, layers = [], 0
    for _, layer in iter_jumplora_layers(model):
        layers += 1
        if layer.ella_w_past is not None and adapter in layer.lora_A:
            delta = layer.penalty_delta(adapter, mode).float()
            terms.append((delta * layer.ella_w_past).pow(2).sum())
    if not terms:
        return None
    return torch.stack(terms).sum() / layers

"""The ELLA regulariser λ·‖ΔW_x ⊙ W_past‖²_F, averaged over adapted layers (Biswas et al. 2026).

ΔW_x is the raw update (no LoRA scale), as W_past accumulates raw ΔW_final (Algorithm 1, line 21):
"sparse" uses ΔW_jump once τ is initialised (the dense ΔW before S_start), "interpolated" ΔW_interp.
"""

from __future__ import annotations

import torch

from .layer import iter_jumplora_layers

ELLA_DELTA_MODES = ("sparse", "interpolated")


def _check_mode(mode: str) -> None:
    if mode not in ELLA_DELTA_MODES:
        raise ValueError(f"unknown ELLA delta mode {mode!r}; use one of {ELLA_DELTA_MODES}")


def ella_penalty(model: torch.nn.Module, mode: str = "sparse", adapter: str = "default") -> torch.Tensor | None:
    """mean over adapted layers of ‖ΔW_x ⊙ W_past‖²_F (without λ), computed now; None before any merge.

    It reads A and B outside the model's forward: fine for inspection and tests, but a training loss
    under DDP or ZeRO-3 must use the terms recorded in the forward (`record_ella_terms` + `pop_ella_penalty`).
    """
    _check_mode(mode)
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    terms = [l.ella_squared_norm(adapter, mode) for l in layers if l.ella_w_past is not None and adapter in l.lora_A]
    if not terms:
        return None
    return torch.stack(terms).sum() / len(layers)


def record_ella_terms(model: torch.nn.Module, mode: str | None) -> None:
    """Make every JumpLoRA layer record its ELLA term during training forwards (None switches it off)."""
    if mode is not None:
        _check_mode(mode)
    for _, layer in iter_jumplora_layers(model):
        layer.ella_delta_mode = mode
        layer.ella_term = None


def pop_ella_penalty(model: torch.nn.Module) -> torch.Tensor | None:
    """The mean ELLA term recorded by the last forward (None if nothing was recorded); clears the records."""
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    terms = [layer.ella_term for layer in layers if layer.ella_term is not None]
    for layer in layers:
        layer.ella_term = None
    if not terms:
        return None
    return torch.stack(terms).sum() / len(layers)

"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning") as a listener.

Each task's loss gets λ1·Σ_layers Σ|A_past·A_tᵀ| + λ2·Σ_layers (‖A_t‖₂ + ‖B_t‖₂), as O-LoRA's code computes it (the
sum of the absolute entries of the product with every earlier task's A, and the Frobenius norms of the current
factors). O-LoRA keeps the earlier tasks' LoRA modules; here their updates are merged into the base weights at each
task's end like every other method's, and each layer keeps the earlier tasks' A matrices as a frozen float32 buffer
(`olora_past_A`, r rows per task): the subspaces the loss keeps the new task away from. The terms are recorded inside
each adapted layer's forward (DDP sees the use of A and B; ZeRO-3 has them gathered) and summed here.
"""

from __future__ import annotations

import torch

from .callback import ContinualCallback
from .layer import iter_jumplora_layers
from .zero import gathered_adapters


def record_olora_terms(model: torch.nn.Module, on: bool) -> None:
    for _, layer in iter_jumplora_layers(model):
        layer.olora_recording = on
        layer.olora_terms = None


def pop_olora_terms(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(Σ orthogonality, Σ L2) over the adapted layers, recorded by the last forward; clears the records."""
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    terms = [layer.olora_terms for layer in layers if layer.olora_terms is not None]
    for layer in layers:
        layer.olora_terms = None
    if not terms:
        return None
    return torch.stack([t[0] for t in terms]).sum(), torch.stack([t[1] for t in terms]).sum()


class OLoraRegularizer(ContinualCallback):
    """The O-LoRA terms of each task's loss, and the earlier tasks' A matrices they need."""

    def __init__(self, lambda1: float, lambda2: float, adapter: str = "default"):
        self.lambda1, self.lambda2, self.adapter = float(lambda1), float(lambda2), adapter
        self._logged_sum, self._logged_steps = torch.zeros(()), 0

    def on_task_begin(self, args, state, control, model=None, **kwargs):
        self._logged_sum, self._logged_steps = torch.zeros(()), state.global_step
        record_olora_terms(model, self.lambda1 > 0 or self.lambda2 > 0)

    def on_task_end(self, args, state, control, model=None, **kwargs):
        """The finished task's A joins the subspace later tasks stay orthogonal to (A is kept by the merge)."""
        record_olora_terms(model, False)
        with gathered_adapters(model):
            for _, layer in iter_jumplora_layers(model):
                if self.adapter not in layer.lora_A:
                    continue
                a = layer.lora_A[self.adapter].weight.detach().float().clone()
                past = layer.olora_past_A
                layer.olora_past_A = a if past is None else torch.cat([past, a.to(past.device)], dim=0)

    def loss_term(
        self, model: torch.nn.Module, loss: torch.Tensor, accumulation_steps: int, scaled_for_ga: bool
    ) -> torch.Tensor | None:
        terms = pop_olora_terms(model)
        if terms is None:
            return None
        term = self.lambda1 * terms[0] + self.lambda2 * terms[1]
        per_step = 1.0 / accumulation_steps
        self._logged_sum = self._logged_sum.to(term.device) + term.detach() * per_step
        return term * per_step if scaled_for_ga else term

    def on_task_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        steps = state.global_step - self._logged_steps
        if steps > 0:
            logs["loss_olora"] = float(self._logged_sum) / steps
        self._logged_sum, self._logged_steps = torch.zeros(()), state.global_step

"""The JumpLoRA math, in one place.

Every other module computes the gated update through :func:`jump_interpolated_delta` or
:func:`hard_threshold`, so a fused kernel can replace this file's autograd function without
touching the layer, the thresholds or the trainer.

Notation (paper, arXiv 2604.16171, eqs. 1-5): ``delta`` is the raw update ΔW = B·A (before the LoRA
scale β = α/r), ``tau`` the threshold τ = exp(log τ) and ``eps`` the bandwidth ε of the rectangle
kernel.
"""

from __future__ import annotations

import torch


class _SymmetricJumpReLU(torch.autograd.Function):
    """ΔW_jump = ΔW ⊙ H(|ΔW| − τ) with the straight-through pseudo-derivatives of Rajamanoharan et al.

    * ∂ΔW_jump/∂ΔW = H(|ΔW| − τ)  (the jump is ignored, the identity passes where the gate is open)
    * ∂ΔW_jump/∂τ  = −sign(ΔW)·(τ/ε)·rect((|ΔW| − τ)/ε)

    The sign factor is what the paper's symmetric composition JumpReLU_τ(ΔW) − JumpReLU_τ(−ΔW)
    (eq. 5) gives when each half carries the one-sided pseudo-derivative −(τ/ε)·rect((x − τ)/ε):
    raising τ past a negative entry removes a value of about −τ, which *raises* the output.

    The τ gradient is reduced by a **sum** over the entries of ΔW (and, through a shared τ, over every
    layer of its threshold group). The sum is the exact chain rule of the per-entry pseudo-derivative;
    a mean would silently rescale the threshold's learning rate by 1/(d_in·d_out·layers), making the
    effective step depend on model width and on the threshold grouping.
    """

    @staticmethod
    def forward(ctx, delta: torch.Tensor, tau: torch.Tensor, eps: float) -> torch.Tensor:
        mask = delta.abs() > tau
        ctx.save_for_backward(delta, tau)
        ctx.eps = eps
        return delta * mask

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        delta, tau = ctx.saved_tensors
        eps = ctx.eps
        magnitude = delta.abs()
        grad_delta = grad_out * (magnitude > tau) if ctx.needs_input_grad[0] else None
        grad_tau = None
        if ctx.needs_input_grad[1]:
            in_band = (magnitude - tau).abs() < 0.5 * eps  # rect(u) = 1 for |u| < 1/2
            local = -(tau / eps) * torch.sign(delta) * in_band
            grad_tau = (grad_out * local).sum().reshape(tau.shape).to(tau.dtype)
        return grad_delta, grad_tau, None


def symmetric_jump_relu(delta: torch.Tensor, tau: torch.Tensor, eps: float) -> torch.Tensor:
    """ΔW ⊙ H(|ΔW| − τ) with straight-through gradients for ``delta`` and ``tau``."""
    return _SymmetricJumpReLU.apply(delta, tau.to(delta.dtype), eps)


def jump_interpolated_delta(delta: torch.Tensor, log_tau: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """ΔW_interp = (1 − γ)·ΔW + γ·ΔW_jump (paper eq. 3); the update the forward pass applies."""
    if gamma <= 0.0:
        return delta
    jumped = symmetric_jump_relu(delta, log_tau.exp(), eps)
    if gamma >= 1.0:
        return jumped
    return (1.0 - gamma) * delta + gamma * jumped


def hard_threshold(delta: torch.Tensor, log_tau: torch.Tensor) -> torch.Tensor:
    """ΔW_final = ΔW ⊙ H(|ΔW| − τ), no gradient (Algorithm 1, line 19)."""
    with torch.no_grad():
        return delta * (delta.abs() > log_tau.exp().to(delta.dtype))


def interpolation_gamma(step: int, start_step: int, final_step: int) -> float:
    """γ = clip((s − S_start)/(S_final − S_start), 0, 1) (paper eq. 4); a step function if S_final ≤ S_start."""
    if final_step <= start_step:
        return 1.0 if step >= start_step else 0.0
    return min(1.0, max(0.0, (step - start_step) / (final_step - start_step)))

"""The JumpLoRA math, in one place.

Every other module computes the gated update through :func:`jump_interpolated_delta`,
:func:`fused_jump_linear` or :func:`hard_threshold`. The gate itself (the mask H(|ΔW| − τ) and the
τ pseudo-derivative −sign(ΔW)·(τ/ε)·rect((|ΔW| − τ)/ε)) is defined once, in :func:`gate_mask` and
:func:`gate_tau_local`, and both the reference autograd path and the fused linear use them.

Notation (paper, arXiv 2604.16171, eqs. 1-5): ``delta`` is the raw update ΔW = B·A (before the LoRA
scale β = α/r), ``tau`` the threshold τ = exp(log τ) and ``eps`` the bandwidth ε of the rectangle
kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def gate_mask(delta: torch.Tensor, tau: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """H(|ΔW| − τ): 1 where the gate is open (|ΔW| > τ, strictly), as `dtype` (bool unless asked otherwise)."""
    magnitude = delta.abs()
    out = magnitude if dtype == magnitude.dtype else torch.empty(delta.shape, dtype=dtype, device=delta.device)
    return torch.gt(magnitude, tau, out=out)


def gate_tau_local(delta: torch.Tensor, tau: torch.Tensor, eps: float) -> torch.Tensor:
    """∂ΔW_jump/∂τ per entry: −sign(ΔW)·(τ/ε)·rect((|ΔW| − τ)/ε), with rect(u) = 1 for |u| < 1/2."""
    distance = delta.abs().sub_(tau).abs_()
    in_band = torch.lt(distance, 0.5 * eps, out=distance)  # 0/1 in delta's dtype
    return in_band.mul_(delta).sign_().mul_(-(tau / eps))  # sign(rect·ΔW) = rect·sign(ΔW), one buffer


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
        mask = gate_mask(delta, tau)
        ctx.save_for_backward(delta, tau)
        ctx.eps = eps
        return delta * mask

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        delta, tau = ctx.saved_tensors
        eps = ctx.eps
        grad_delta = grad_out * gate_mask(delta, tau) if ctx.needs_input_grad[0] else None
        grad_tau = None
        if ctx.needs_input_grad[1]:
            grad_tau = (grad_out * gate_tau_local(delta, tau, eps)).sum().reshape(tau.shape).to(tau.dtype)
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


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """ΔW, the mask and the τ gradient are computed in float32 for bf16/fp16 adapters."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _update_scale(delta: torch.Tensor, tau: torch.Tensor, gamma: float, scaling: float) -> torch.Tensor | float:
    """β·((1 − γ) + γ·H(|ΔW| − τ)): W_eff = W + ΔW ⊙ this, and dΔW = G ⊙ this (straight-through).

    A float β when γ = 0 (the gate is off), else a d_out×d_in tensor built from :func:`gate_mask`.
    """
    if gamma <= 0.0:
        return scaling
    scale = gate_mask(delta, tau, dtype=delta.dtype).mul_(scaling * gamma)
    return scale.add_(scaling * (1.0 - gamma)) if gamma < 1.0 else scale


def _effective_weight(weight, delta, scale, dtype):
    """W_eff = W + ΔW ⊙ scale (ΔW ⊙ scale alone when there is no base weight), in `dtype`, built in ΔW's storage."""
    if weight is None:
        out = delta.mul_(scale)
    elif torch.promote_types(weight.dtype, delta.dtype) != delta.dtype:  # e.g. a float64 W with float32 A, B
        out = weight + delta * scale
    elif isinstance(scale, float):
        out = torch.add(weight, delta, alpha=scale, out=delta)
    else:
        out = torch.addcmul(weight, delta, scale, out=delta)
    return out.to(dtype)


class _FusedJumpLinear(torch.autograd.Function):
    """y = x·W_effᵀ + b with W_eff = W + β·ΔW_interp, ΔW_interp = (1 − γ)·ΔW + γ·ΔW ⊙ H(|ΔW| − τ), ΔW = B·A.

    Memory-lean: between forward and backward it keeps only x, A, B, log τ and a reference to the
    frozen W (a parameter, no copy). No d_out×d_in tensor is saved: ΔW, the mask and W_eff are
    transient in the forward and recomputed in the backward. Forward: one (r-deep) ΔW product and one
    dense GEMM. Backward: grad_x = g·W_eff (skipped when x needs no gradient) and one dense weight-gradient
    GEMM G = gᵀx over all leading dimensions, from which everything else follows in d_out×d_in work:
    dΔW_interp = β·G, dΔW = dΔW_interp ⊙ ((1 − γ) + γ·mask), dτ = γ·Σ dΔW_interp ⊙ ∂ΔW_jump/∂τ,
    dB = dΔW·Aᵀ, dA = Bᵀ·dΔW, d log τ = dτ·τ. The gate uses :func:`gate_mask` and :func:`gate_tau_local`,
    like :class:`_SymmetricJumpReLU`, so both paths share one definition.

    Under autocast the GEMMs run in the autocast dtype (as `F.linear` would); ΔW, the mask and the τ
    gradient are computed in float32 whenever A and B are bf16/fp16 (G = gᵀx comes out of the GEMM in the
    input dtype, with float32 accumulation inside the GEMM, and is then widened).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, log_tau, gamma, eps, scaling):
        device_type = x.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        acc = _accumulation_dtype(lora_A.dtype)
        with torch.autocast(device_type, enabled=False):
            x_c = x.to(compute_dtype)
            delta = lora_B.to(acc) @ lora_A.to(acc)
            scale = _update_scale(delta, log_tau.exp().to(acc), gamma, scaling)
            w_eff = _effective_weight(weight, delta, scale, compute_dtype)
            del delta, scale
            out = F.linear(x_c, w_eff, None if bias is None else bias.to(compute_dtype))
        ctx.save_for_backward(x_c, weight, lora_A, lora_B, log_tau)
        ctx.gamma, ctx.eps, ctx.scaling = gamma, eps, scaling
        ctx.compute_dtype, ctx.acc_dtype, ctx.x_dtype = compute_dtype, acc, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, log_tau = ctx.saved_tensors
        need_x, need_w, need_bias, need_A, need_B, need_tau = ctx.needs_input_grad[:6]
        gamma, eps, scaling, acc = ctx.gamma, ctx.eps, ctx.scaling, ctx.acc_dtype
        need_tau = need_tau and gamma > 0.0  # at γ = 0 the output does not depend on τ
        need_dense = need_w or need_A or need_B or need_tau
        grad_x = grad_w = grad_bias = grad_A = grad_B = grad_log_tau = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(ctx.compute_dtype).reshape(-1, grad_out.shape[-1])
            if need_bias:
                grad_bias = g.sum(0).to(ctx.bias_dtype)
            if need_x or need_dense:
                a, b = lora_A.detach().to(acc), lora_B.detach().to(acc)
                delta = b @ a  # recomputed: r-deep, cheap next to the dense GEMMs
                tau = log_tau.detach().exp().to(acc)
                scale = _update_scale(delta, tau, gamma, scaling)
            if need_dense:
                dense = g.t() @ x.reshape(-1, x.shape[-1])  # G = gᵀx, the one weight-gradient GEMM
                if need_w:
                    grad_w = dense.to(weight.dtype)
                dense = dense.to(acc)
                if need_tau:  # dτ = γ·β·Σ G ⊙ ∂ΔW_jump/∂τ;  d log τ = dτ·τ
                    d_tau = torch.dot(dense.reshape(-1), gate_tau_local(delta, tau, eps).reshape(-1))
                    grad_log_tau = (d_tau * (gamma * scaling) * tau).reshape(log_tau.shape).to(log_tau.dtype)
                if need_A or need_B:
                    d_delta = dense.mul_(scale) if dense is not grad_w else dense * scale  # G ⊙ β((1−γ) + γ·mask)
                    if need_B:
                        grad_B = (d_delta @ a.t()).to(lora_B.dtype)
                    if need_A:
                        grad_A = (b.t() @ d_delta).to(lora_A.dtype)
                    del d_delta
                del dense
            if need_x:  # last, so that W_eff may reuse ΔW's storage
                w_eff = _effective_weight(weight, delta, scale, ctx.compute_dtype)
                del delta, scale
                grad_x = (g @ w_eff).reshape(x.shape).to(ctx.x_dtype)
        return grad_x, grad_w, grad_bias, grad_A, grad_B, grad_log_tau, None, None, None


def fused_jump_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    log_tau: torch.Tensor,
    gamma: float,
    eps: float,
    scaling: float,
) -> torch.Tensor:
    """x·(W + β·ΔW_interp)ᵀ + b in one dense GEMM, saving no d_out×d_in tensor for the backward.

    Same value and gradients (x, A, B, log τ, and W / b if they require grad) as the reference
    ``F.linear(x, W, b) + β·F.linear(x, jump_interpolated_delta(B @ A, log_tau, γ, ε))``. ``weight=None``
    gives the update's contribution alone, β·x·ΔW_interpᵀ (+ b).
    """
    return _FusedJumpLinear.apply(x, weight, bias, lora_A, lora_B, log_tau, float(gamma), float(eps), float(scaling))


def hard_threshold(delta: torch.Tensor, log_tau: torch.Tensor) -> torch.Tensor:
    """ΔW_final = ΔW ⊙ H(|ΔW| − τ), no gradient (Algorithm 1, line 19)."""
    with torch.no_grad():
        return delta * gate_mask(delta, log_tau.exp().to(delta.dtype))


def hard_threshold_(delta: torch.Tensor, log_tau: torch.Tensor) -> torch.Tensor:
    """`hard_threshold` in place: `delta` becomes ΔW ⊙ H(|ΔW| − τ). |ΔW| > τ is tested as ΔW > τ or ΔW < −τ, so the
    only extra memory is two boolean masks the size of ΔW (the task-end merge of a large layer runs this)."""
    with torch.no_grad():
        tau = log_tau.exp().to(delta.dtype)
        keep = torch.gt(delta, tau)
        keep.logical_or_(torch.lt(delta, -tau))
        return delta.mul_(keep)


def interpolation_gamma(step: int, start_step: int, final_step: int) -> float:
    """γ = clip((s − S_start)/(S_final − S_start), 0, 1) (paper eq. 4); a step function if S_final ≤ S_start."""
    if final_step <= start_step:
        return 1.0 if step >= start_step else 0.0
    return min(1.0, max(0.0, (step - start_step) / (final_step - start_step)))

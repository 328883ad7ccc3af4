import pytest
import torch

from jumplora_hf.gate import hard_threshold, interpolation_gamma, jump_interpolated_delta, symmetric_jump_relu


def _hand_derived(delta, tau, eps, grad_out):
    """∂/∂ΔW = H(|ΔW|−τ); ∂/∂τ = −sign(ΔW)(τ/ε) rect((|ΔW|−τ)/ε), summed over entries."""
    mask = (delta.abs() > tau).to(delta.dtype)
    rect = (((delta.abs() - tau) / eps).abs() < 0.5).to(delta.dtype)
    return grad_out * mask, (grad_out * -torch.sign(delta) * (tau / eps) * rect).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_gradients_equal_pseudo_derivatives(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.rand(40, 30, generator=gen, dtype=dtype) * 2 - 1).requires_grad_()
    log_tau = torch.tensor(0.4, dtype=torch.float32).log().requires_grad_()
    eps = 0.05
    grad_out = torch.randn(40, 30, generator=gen, dtype=dtype)
    out = symmetric_jump_relu(delta, log_tau.exp(), eps)
    out.backward(grad_out)
    tau = log_tau.exp().detach().to(dtype)
    expected_delta, expected_tau = _hand_derived(delta.detach(), tau, eps, grad_out)
    assert torch.equal(out.detach(), delta.detach() * (delta.detach().abs() > tau))
    assert torch.allclose(delta.grad, expected_delta)
    assert ((delta.detach().abs() - tau).abs() < eps / 2).sum() > 10  # the band is really exercised
    # τ = exp(log τ): the chain rule multiplies by τ
    assert torch.allclose(log_tau.grad.to(dtype), expected_tau * tau, rtol=1e-5)


def test_negative_entries_push_tau_the_other_way():
    """Raising τ past a negative entry removes ≈ −τ, so its pseudo-derivative has the opposite sign."""
    tau = torch.tensor(0.5, requires_grad=True)
    for value, sign in [(0.5002, -1.0), (-0.5002, 1.0)]:
        tau.grad = None
        symmetric_jump_relu(torch.tensor([value]), tau, 0.001).sum().backward()
        assert tau.grad.item() == pytest.approx(sign * 0.5 / 0.001)


def test_interpolation_endpoints_and_midpoint():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 6, generator=gen)
    log_tau = torch.tensor(0.7).log()
    jumped = delta * (delta.abs() > 0.7)
    assert jump_interpolated_delta(delta, log_tau, 0.0, 1e-3) is delta
    assert torch.equal(jump_interpolated_delta(delta, log_tau, 1.0, 1e-3), jumped)
    assert torch.allclose(jump_interpolated_delta(delta, log_tau, 0.25, 1e-3), 0.75 * delta + 0.25 * jumped)
    assert torch.equal(hard_threshold(delta, log_tau), jumped)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (19, 0.0), (20, 0.0), (50, 0.5), (80, 1.0), (99, 1.0)])
def test_gamma_schedule(step, expected):
    assert interpolation_gamma(step, 20, 80) == pytest.approx(expected)


def test_gamma_schedule_degenerate_interval_is_a_step():
    assert interpolation_gamma(2, 3, 3) == 0.0 and interpolation_gamma(3, 3, 3) == 1.0

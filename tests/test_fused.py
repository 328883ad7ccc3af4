"""The fused, memory-lean JumpLoRA linear equals the reference autograd path, and saves no d_out×d_in tensor.

Tolerances: float32 results must agree to 1e-5 relative to the largest entry of the reference (the two
paths only sum in a different order). bfloat16 results are compared with the float32 reference evaluated on
the same bf16-rounded inputs, to 1e-2 relative to the largest entry (bf16 has an 8-bit mantissa; the fused
function keeps ΔW, the mask and the τ gradient in float32, so the gate itself is not approximated).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_MODELS

import jumplora_hf.layer as layer_module
from jumplora_hf import JumpLoraConfig, get_jumplora_model
from jumplora_hf.gate import fused_jump_linear, gate_tau_local, jump_interpolated_delta
from jumplora_hf.layer import JumpLoraLinear, iter_jumplora_layers, set_interpolation_gamma
from jumplora_hf.thresholds import initialize_thresholds

D_IN, D_OUT, RANK, SCALING = 48, 40, 4, 2.0
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _reference(x, weight, bias, lora_A, lora_B, log_tau, gamma, eps, scaling):
    return F.linear(x, weight, bias) + scaling * F.linear(
        x, jump_interpolated_delta(lora_B @ lora_A, log_tau, gamma, eps)
    )


def _problem(dtype, shape, bias, seed=0):
    """Inputs in `dtype`, with τ at the median |ΔW| and ε wide enough that many entries sit in the band."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D_IN, generator=gen).to(dtype)
    weight = (torch.randn(D_OUT, D_IN, generator=gen) / D_IN**0.5).to(dtype)
    b = (torch.randn(D_OUT, generator=gen) * 0.1).to(dtype) if bias else None
    lora_A = (torch.randn(RANK, D_IN, generator=gen) / D_IN**0.5).to(dtype)
    lora_B = (torch.randn(D_OUT, RANK, generator=gen) * 0.1).to(dtype)
    delta = lora_B.float() @ lora_A.float()
    tau = delta.abs().median()
    eps = float(0.2 * tau)
    assert ((delta.abs() - tau).abs() < eps / 2).sum() > 50  # the τ gradient is really exercised
    grad_out = torch.randn(*shape, D_OUT, generator=gen).to(dtype)
    return x, weight, b, lora_A, lora_B, tau.log().reshape(()), eps, grad_out


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _assert_close(actual, expected, tol, what):
    assert actual is not None and expected is not None, what
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} × {scale:.3e}"


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(11,), (3, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fused_equals_reference(gamma, dtype, shape, bias):
    x, weight, b, lora_A, lora_B, log_tau, eps, grad_out = _problem(dtype, shape, bias)
    fused_in = _leaves([x, weight, b, lora_A, lora_B, log_tau])
    ref_in = _leaves([x, weight, b, lora_A, lora_B], torch.float32) + _leaves([log_tau])
    out = fused_jump_linear(*fused_in[:6], gamma, eps, SCALING)
    expected = _reference(*ref_in[:6], gamma, eps, SCALING)
    out.backward(grad_out)
    expected.backward(grad_out.float())
    assert out.dtype == dtype and out.shape == (*shape, D_OUT)
    tol = TOLERANCE[dtype]
    _assert_close(out, expected, tol, "output")
    for name, got, want in zip(["x", "W", "b", "A", "B"], fused_in, ref_in):
        if got is not None:
            assert got.grad.dtype == dtype, name
            _assert_close(got.grad, want.grad, tol, f"grad {name}")
    if gamma == 0.0:  # the output does not depend on τ
        assert fused_in[5].grad is None and ref_in[5].grad is None
        return
    # dτ is a signed sum over the ε band: compare it with the size of the terms it sums, not with itself
    delta = ref_in[4].detach() @ ref_in[3].detach()
    tau = log_tau.exp()
    dense = grad_out.float().reshape(-1, D_OUT).t() @ ref_in[0].detach().reshape(-1, D_IN)
    magnitude = gamma * SCALING * tau * (dense * gate_tau_local(delta, tau, eps)).abs().sum()
    assert magnitude > 0 and ref_in[5].grad.abs() > 1e-3 * magnitude
    err = (fused_in[5].grad - ref_in[5].grad).abs()
    assert err <= tol * magnitude, f"grad log τ: {fused_in[5].grad} vs {ref_in[5].grad} (terms {magnitude:.3e})"


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_frozen_input_and_frozen_adapter_gradients(gamma):
    """needs_input_grad is respected: x without grad (the first layer of a frozen model), or only τ trained."""
    x, weight, b, lora_A, lora_B, log_tau, eps, grad_out = _problem(torch.float32, (3, 7), True)
    for trained in ([3, 4, 5], [5], [0]):
        inputs = [x, weight, b, lora_A, lora_B, log_tau]
        fused_in = [t.detach().clone().requires_grad_(i in trained) for i, t in enumerate(inputs)]
        ref_in = [t.detach().clone().requires_grad_(i in trained) for i, t in enumerate(inputs)]
        fused_jump_linear(*fused_in, gamma, eps, SCALING).backward(grad_out)
        _reference(*ref_in, gamma, eps, SCALING).backward(grad_out)
        for i in range(6):
            if i in trained:
                _assert_close(fused_in[i].grad, ref_in[i].grad, 1e-5, f"input {i}")
            else:
                assert fused_in[i].grad is None


def test_autocast_runs_in_the_autocast_dtype_and_matches_float32():
    x, weight, b, lora_A, lora_B, log_tau, eps, grad_out = _problem(torch.float32, (3, 7), True)
    fused_in = _leaves([x, weight, b, lora_A, lora_B, log_tau])
    ref_in = _leaves([x, weight, b, lora_A, lora_B, log_tau])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_jump_linear(*fused_in, 0.5, eps, SCALING)
    assert out.dtype == torch.bfloat16
    out.backward(grad_out.bfloat16())
    expected = _reference(*ref_in, 0.5, eps, SCALING)
    expected.backward(grad_out)
    _assert_close(out, expected, TOLERANCE[torch.bfloat16], "output")
    for i in (0, 3, 4, 5):
        assert fused_in[i].grad.dtype == torch.float32
        _assert_close(fused_in[i].grad, ref_in[i].grad, TOLERANCE[torch.bfloat16], f"input {i}")


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("gamma", [0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_saves_no_dense_update(gamma, dtype):
    """Only the frozen W itself (a parameter, saved by reference) is d_out×d_in among the saved tensors."""
    x, weight, b, lora_A, lora_B, log_tau, eps, _ = _problem(dtype, (2, 5), True)
    assert x.numel() < D_IN * D_OUT
    weight = torch.nn.Parameter(weight, requires_grad=False)
    lora_A, lora_B, log_tau = (t.requires_grad_() for t in (lora_A, lora_B, log_tau))
    x.requires_grad_()
    _, saved = _saved_tensors(lambda: fused_jump_linear(x, weight, b, lora_A, lora_B, log_tau, gamma, eps, SCALING))
    large = [t for t in saved if t.numel() >= D_IN * D_OUT]
    assert len(large) == 1 and large[0].data_ptr() == weight.data_ptr() and large[0].shape == weight.shape
    # the hook does see the dense tensors the reference path keeps
    _, saved_ref = _saved_tensors(lambda: _reference(x, weight, b, lora_A, lora_B, log_tau, gamma, eps, SCALING))
    assert any(t.shape == (D_OUT, D_IN) and t.data_ptr() != weight.data_ptr() for t in saved_ref)


def _layer(jump_fused, gamma):
    torch.manual_seed(0)
    config = JumpLoraConfig(r=RANK, lora_alpha=2 * RANK, jump_fused=jump_fused)
    layer = JumpLoraLinear(
        torch.nn.Linear(D_IN, D_OUT), "default", config=config, r=RANK, lora_alpha=2 * RANK, target_name="l"
    )
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.1)
        delta = layer.delta_weight("default")
        layer.set_log_tau("default", float(delta.abs().median().log()))
    layer.jump_bandwidth["default"] = float(0.2 * delta.abs().median())
    layer.set_gamma("default", gamma)
    return layer


@pytest.mark.parametrize("path", ["layer", "variant"])
def test_layer_fused_equals_reference_and_saves_no_dense_update(path):
    # seeded: with the global RNG the input depended on the tests run before, and some draws cancel τ's gradient (a
    # sum over every entry in the band) down to where float32 rounding of either summation order passes 1e-5 of it
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(0)).requires_grad_()
    results = {}
    for fused in (True, False):
        layer = _layer(fused, 0.5)
        x.grad = None

        def run():
            if path == "layer":
                return layer(x)
            result = layer.get_base_layer()(x)  # as PEFT's Linear.forward calls the variant
            return layer.lora_variant["default"].forward(layer, active_adapter="default", x=x, result=result)

        out, saved = _saved_tensors(run)
        out.pow(2).sum().backward()
        weight = layer.get_base_layer().weight
        dense = [t for t in saved if t.numel() >= D_IN * D_OUT and t.data_ptr() != weight.data_ptr()]
        assert (not dense) if fused else dense
        grads = [x.grad] + [p.grad for n, p in layer.named_parameters() if p.requires_grad]
        results[fused] = (out.detach(), [g.clone() for g in grads])
    _assert_close(results[True][0], results[False][0], 1e-5, "output")
    for got, want in zip(results[True][1], results[False][1]):
        _assert_close(got, want, 1e-5, "grad")


def test_layer_falls_back_at_gamma_zero_merged_and_disabled(monkeypatch):
    calls = []
    monkeypatch.setattr(
        layer_module, "fused_jump_linear", lambda *a, **k: calls.append(1) or fused_jump_linear(*a, **k)
    )
    layer = _layer(True, 0.0)
    x = torch.randn(3, D_IN)
    layer(x)
    assert not calls
    layer.set_gamma("default", 1.0)
    expected = layer(x)
    assert len(calls) == 1
    layer.merge()
    assert torch.allclose(layer(x), expected, atol=1e-5) and len(calls) == 1
    layer.unmerge()
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.get_base_layer()(x)) and len(calls) == 1


def test_jump_fused_is_saved_with_the_adapter_config(tmp_path):
    JumpLoraConfig(target_modules=["q"], jump_fused=False).save_pretrained(tmp_path)
    assert JumpLoraConfig.from_pretrained(tmp_path).jump_fused is False
    assert JumpLoraConfig().jump_fused is True


TARGETS = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_model_fused_equals_reference(arch, monkeypatch):
    """Same loss and the same gradients of every trainable parameter at γ = 0.5, τ initialised."""
    calls = []
    monkeypatch.setattr(
        layer_module, "fused_jump_linear", lambda *a, **k: calls.append(1) or fused_jump_linear(*a, **k)
    )
    base = TINY_MODELS[arch]()
    models = {}
    for fused in (True, False):
        config = JumpLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], jump_bandwidth=0.01, jump_fused=fused)
        models[fused] = get_jumplora_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in iter_jumplora_layers(models[True]):
            layer.lora_B["default"].weight.copy_(
                torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.05
            )
    models[False].load_state_dict(models[True].state_dict())
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 300, (2, 9), generator=gen)
    labels = torch.randint(3, 300, (2, 5) if arch == "t5" else (2, 9), generator=gen)
    losses, grads = {}, {}
    for fused, model in models.items():
        initialize_thresholds(model)
        set_interpolation_gamma(model, 0.5)
        model.train()
        calls.clear()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        assert len(calls) == (len(list(iter_jumplora_layers(model))) if fused else 0)
        losses[fused] = loss.detach()
        grads[fused] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert torch.allclose(losses[True], losses[False], rtol=1e-6)
    assert grads[True].keys() == grads[False].keys() and any("log_tau" in n for n in grads[True])
    for name, got in grads[True].items():
        assert got is not None and grads[False][name] is not None, name
        _assert_close(got, grads[False][name], 1e-4, name)
    tau_grads = [g for n, g in grads[True].items() if "log_tau" in n]
    assert all(g.abs() > 0 for g in tau_grads)  # some |ΔW| lie in the ε band

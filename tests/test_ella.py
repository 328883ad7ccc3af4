import pytest
import torch
from tiny import TINY_MODELS

from jumplora_hf import (
    JumpLoraConfig,
    begin_task,
    ella_penalty,
    end_task,
    get_jumplora_model,
    initialize_thresholds,
    iter_jumplora_layers,
    set_interpolation_gamma,
)


def _randomise_adapters(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_jumplora_layers(model):
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.1)


def _model(use_jumprelu=True):
    return get_jumplora_model(TINY_MODELS["t5"](), JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_jumprelu=use_jumprelu))


def test_w_past_accumulates_final_deltas_task_after_task():
    model = _model()
    assert ella_penalty(model) is None  # nothing merged yet
    expected = {}
    for task in range(3):
        begin_task(model, task, seed=0)
        _randomise_adapters(model, seed=task)
        initialize_thresholds(model)
        finals = {name: layer.final_delta("default") for name, layer in iter_jumplora_layers(model)}
        end_task(model, accumulate_w_past=True)
        for name, layer in iter_jumplora_layers(model):
            expected[name] = expected.get(name, 0) + finals[name]
            assert torch.allclose(layer.ella_w_past, expected[name])


@pytest.mark.parametrize("mode", ["sparse", "interpolated"])
def test_penalty_equals_formula(mode):
    model = _model()
    _randomise_adapters(model, seed=0)
    initialize_thresholds(model)
    end_task(model, accumulate_w_past=True)
    begin_task(model, 1, seed=0)
    _randomise_adapters(model, seed=1)
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    # before S_start both modes use the dense ΔW
    dense = sum(((l.lora_B["default"].weight @ l.lora_A["default"].weight) * l.ella_w_past).pow(2).sum() for l in layers) / len(layers)
    assert torch.allclose(ella_penalty(model, mode), dense)
    initialize_thresholds(model)
    set_interpolation_gamma(model, 0.5)
    terms = []
    for l in layers:
        delta = l.lora_B["default"].weight @ l.lora_A["default"].weight
        jumped = delta * (delta.abs() > l.log_tau("default").exp())
        delta_x = jumped if mode == "sparse" else 0.5 * delta + 0.5 * jumped
        terms.append((delta_x * l.ella_w_past).pow(2).sum())
    penalty = ella_penalty(model, mode)
    assert torch.allclose(penalty, sum(terms) / len(terms))
    penalty.backward()
    assert all(l.lora_B["default"].weight.grad is not None for l in layers)


def test_plain_lora_penalty_uses_dense_delta():
    model = _model(use_jumprelu=False)
    _randomise_adapters(model, seed=0)
    end_task(model, accumulate_w_past=True)
    _randomise_adapters(model, seed=1)
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    expected = sum(((l.lora_B["default"].weight @ l.lora_A["default"].weight) * l.ella_w_past).pow(2).sum() for l in layers) / len(layers)
    assert torch.allclose(ella_penalty(model), expected)

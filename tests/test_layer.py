"""Adapter / merged / unloaded / reloaded states agree, over a tiny T5 and a tiny Llama."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tiny import TINY_MODELS

from jumplora_hf import (
    JumpLoraConfig,
    JumpLoraLinear,
    begin_task,
    end_task,
    get_jumplora_model,
    initialize_thresholds,
    iter_jumplora_layers,
    load_jumplora_adapter,
    set_interpolation_gamma,
)

TARGETS = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}


def _inputs(arch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 9), generator=gen)
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, 300, (2, 4), generator=gen)}
    return {"input_ids": ids}


def _trained_like(model, seed=1):
    """Give every adapter a non-trivial B so that ΔW ≠ 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_jumplora_layers(model):
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.05)
    return model


def _jump_model(arch, **config):
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], **config}
    return _trained_like(get_jumplora_model(TINY_MODELS[arch](), JumpLoraConfig(**config))).eval()


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_gamma_zero_is_exactly_plain_lora(arch):
    base = TINY_MODELS[arch]()
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch])).eval()
    jump = get_jumplora_model(base, JumpLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch])).eval()
    _trained_like(jump)
    plain.load_state_dict(jump.state_dict(), strict=False)
    initialize_thresholds(jump)  # τ is set, but γ = 0 must ignore it
    with torch.no_grad():
        assert torch.equal(jump(**_inputs(arch)).logits, plain(**_inputs(arch)).logits)


def test_gamma_one_is_the_dense_layer_with_the_jumped_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    layer = JumpLoraLinear(copy.deepcopy(base), "default", config=JumpLoraConfig(r=3, lora_alpha=6), r=3, lora_alpha=6, target_name="l")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_log_tau["default"].fill_(torch.tensor(0.3).log())
    layer.jump_gamma["default"] = 1.0
    x = torch.randn(5, 4, 12)
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    jumped = delta * (delta.abs() > 0.3)
    assert 0 < (jumped == 0).float().mean() < 1
    expected = F.linear(x, base.weight + 2.0 * jumped, base.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("threshold_mode", ["global", "per_block", "per_module"])
def test_merge_and_unload_equals_adapter_at_gamma_one(arch, threshold_mode):
    model = _jump_model(arch, threshold_mode=threshold_mode)
    initialize_thresholds(model)
    set_interpolation_gamma(model, 1.0)
    before = {name: layer.get_base_layer().weight.detach().clone() for name, layer in iter_jumplora_layers(model)}
    masks = {name: layer.final_delta("default") != 0 for name, layer in iter_jumplora_layers(model)}
    with torch.no_grad():
        adapter_out = model(**_inputs(arch)).logits
        merged = model.merge_and_unload()
        merged_out = merged(**_inputs(arch)).logits
    assert torch.allclose(adapter_out, merged_out, atol=1e-5)
    modules = dict(merged.named_modules())
    for name, weight in before.items():
        changed = modules[name.removeprefix("base_model.model.")].weight != weight
        assert torch.equal(changed, masks[name]), name  # W changes exactly on the support of ΔW_final
        assert 0 < masks[name].float().mean() < 1


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_task_end_merge_then_fresh_adapter_starts_from_zero(arch):
    model = _jump_model(arch)
    initialize_thresholds(model)
    set_interpolation_gamma(model, 1.0)
    with torch.no_grad():
        adapter_out = model(**_inputs(arch)).logits
    end_task(model, accumulate_w_past=False)
    with torch.no_grad():  # the update now lives in the base weights only: nothing is applied twice
        assert torch.allclose(model(**_inputs(arch)).logits, adapter_out, atol=1e-5)
    begin_task(model, task_index=1, seed=0)
    for _, layer in iter_jumplora_layers(model):
        assert not layer.lora_B["default"].weight.any()
        assert layer.jump_gamma["default"] == 0.0 and not layer.jump_tau_ready["default"]
    with torch.no_grad():
        fresh_out = model(**_inputs(arch)).logits  # ΔW = 0: the merged base model alone
        with model.disable_adapter():
            base_out = model(**_inputs(arch)).logits
    assert torch.equal(fresh_out, base_out)
    assert torch.allclose(fresh_out, adapter_out, atol=1e-5)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_save_and_reload_adapter(tmp_path, arch):
    model = _jump_model(arch, threshold_mode="per_block")
    initialize_thresholds(model)
    set_interpolation_gamma(model, 1.0)
    with torch.no_grad():
        expected = model(**_inputs(arch)).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    reloaded = load_jumplora_adapter(TINY_MODELS[arch](), str(tmp_path)).eval()
    assert reloaded.peft_config["default"].threshold_mode == "per_block"
    layers = [layer for _, layer in iter_jumplora_layers(reloaded)]
    assert len({id(layer.lora_log_tau["default"]) for layer in layers}) == {"t5": 4, "llama": 2}[arch]  # ties rebuilt
    with torch.no_grad():
        assert torch.allclose(reloaded(**_inputs(arch)).logits, expected, atol=1e-6)


@pytest.mark.parametrize(
    "threshold_mode,groups", [("global", 1), ("per_block", 4), ("per_module", 12)]
)
def test_threshold_groups_share_one_parameter(threshold_mode, groups):
    model = get_jumplora_model(TINY_MODELS["t5"](), JumpLoraConfig(target_modules=["q", "v"], threshold_mode=threshold_mode))
    taus = {id(layer.lora_log_tau["default"]) for _, layer in iter_jumplora_layers(model)}
    assert len(taus) == groups
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "log_tau" in n]
    assert len(trainable) == groups  # named_parameters de-duplicates shared parameters: one τ per group


def test_one_config_reused_for_two_models_shares_nothing():
    config = JumpLoraConfig(target_modules=["q", "v"])
    first = get_jumplora_model(TINY_MODELS["t5"](), config)
    second = get_jumplora_model(TINY_MODELS["t5"](), config)
    tau = lambda m: next(layer for _, layer in iter_jumplora_layers(m)).lora_log_tau["default"]
    assert tau(first) is not tau(second)


def test_target_modules_matching_nothing_names_the_modules_seen():
    with pytest.raises(ValueError, match=r"matched no module.*'q'.*'v'"):
        get_jumplora_model(TINY_MODELS["t5"](), JumpLoraConfig(target_modules=["query_proj"]))


def test_tied_output_head_is_refused():
    with pytest.raises(ValueError, match="shares its weight"):
        get_jumplora_model(TINY_MODELS["t5"](), JumpLoraConfig(target_modules=["q", "lm_head"]))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"s_start": 0.8, "s_final": 0.2}, "smaller than s_final"),
        ({"s_start": 0.5, "s_final": 0.5}, "smaller than s_final"),
        ({"s_start": -0.1}, r"in \[0, 1\]"),
        ({"s_final": 1.5}, r"in \[0, 1\]"),
        ({"threshold_mode": "local"}, "threshold_mode='local' is unknown"),
        ({"lora_dropout": 0.1}, "lora_dropout"),
        ({"jump_bandwidth": 0.0}, "jump_bandwidth"),
        ({"use_dora": True}, "use_dora"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JumpLoraConfig(**kwargs)

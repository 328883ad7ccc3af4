import pytest
import torch
from tiny import TINY_MODELS

from jumplora_hf import JumpLoraConfig, get_jumplora_model
from jumplora_hf.layer import iter_jumplora_layers
from jumplora_hf.thresholds import initialize_thresholds, kth_smallest_abs_delta, threshold_groups

TARGETS = {"t5": ["q", "k", "v", "o", "wi"], "llama": ["q_proj", "v_proj", "up_proj"]}


def _model(arch, threshold_mode, seed=0):
    model = get_jumplora_model(
        TINY_MODELS[arch](),
        JumpLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], threshold_mode=threshold_mode),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_jumplora_layers(model):
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen))
    return model


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("threshold_mode", ["global", "per_block", "per_module"])
def test_surviving_count_equals_adapter_parameter_count(arch, threshold_mode):
    model = _model(arch, threshold_mode)
    taus = initialize_thresholds(model)
    groups = threshold_groups(model)
    assert len(taus) == len(groups) > 0
    for layers in groups.values():
        budget = sum(
            layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel() for layer in layers
        )
        survivors = sum(int((layer.final_delta("default") != 0).sum()) for layer in layers)
        assert survivors == budget
        assert all(layer.jump_tau_ready["default"] for layer in layers)


@pytest.mark.parametrize("threshold_mode", ["global", "per_block", "per_module"])
def test_streaming_select_equals_kthvalue(threshold_mode):
    model = _model("t5", threshold_mode, seed=3)
    for layers in threshold_groups(model).values():
        flat = torch.cat([layer.delta_weight("default").detach().abs().flatten() for layer in layers])
        for rank in (1, 7, flat.numel() // 2, flat.numel()):
            assert kth_smallest_abs_delta(layers, "default", rank) == torch.kthvalue(flat, rank).values.item()


def test_per_block_groups_are_transformer_blocks():
    model = _model("t5", "per_block")
    names = {layers[0].jump_threshold_group["default"] for layers in threshold_groups(model).values()}
    assert names == {"encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"}


def test_group_with_more_adapter_parameters_than_entries_keeps_everything():
    # r = 16 on 32×32 q/v: A+B has 1024 parameters, ΔW 1024 entries
    model = get_jumplora_model(
        TINY_MODELS["t5"](), JumpLoraConfig(r=16, lora_alpha=16, target_modules=["q"], threshold_mode="per_module")
    )
    with torch.no_grad():
        for _, layer in iter_jumplora_layers(model):
            layer.lora_B["default"].weight.normal_()
    initialize_thresholds(model)
    for _, layer in iter_jumplora_layers(model):
        assert torch.isfinite(layer.log_tau("default"))
        assert torch.equal(layer.final_delta("default"), layer.delta_weight("default").detach())

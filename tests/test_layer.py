"""The JumpLoRA layer through PEFT's operations, in peft's style (`tests/testing_common.py`): one table of cases
over {tiny T5, tiny Llama} × threshold mode × {fused, reference}, each compared across the adapter, merged,
unmerged, deleted, reloaded and low-precision states, with "merged ≠ base" so that no check passes on an
identity adapter."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from tiny import TINY_MODELS

from jumplora_hf import JumpLoraConfig, get_jumplora_model, load_jumplora_adapter
from jumplora_hf.layer import JumpLoraLinear, iter_jumplora_layers, set_interpolation_gamma
from jumplora_hf.lifecycle import begin_task, end_task
from jumplora_hf.thresholds import initialize_thresholds

TARGETS = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}
GROUPS = {
    ("t5", "global"): 1,
    ("t5", "per_block"): 4,
    ("t5", "per_module"): 12,
    ("llama", "global"): 1,
    ("llama", "per_block"): 2,
    ("llama", "per_module"): 4,
}
CASES = [
    pytest.param(arch, mode, fused, id=f"{arch}-{mode}-{'fused' if fused else 'reference'}")
    for arch in ("t5", "llama")
    for mode in ("global", "per_block", "per_module")
    for fused in (True, False)
]


def _inputs(arch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 9), generator=gen)
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, 300, (2, 4), generator=gen)}
    return {"input_ids": ids}


def _logits(model, arch):
    with torch.no_grad():
        return model(**_inputs(arch)).logits


def _trained_like(model, adapter="default", seed=1):
    """A non-trivial B (ΔW ≠ 0), τ at S_start and the gate fully on: the state a task ends in."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_jumplora_layers(model):
            weight = layer.lora_B[adapter].weight
            weight.copy_(torch.randn(weight.shape, generator=gen) * 0.05)
    initialize_thresholds(model, adapter)
    set_interpolation_gamma(model, 1.0, adapter)
    return model


def _config(arch, mode="global", fused=True, **overrides):
    return JumpLoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], threshold_mode=mode, jump_fused=fused, **overrides
    )


def _model(arch, mode="global", fused=True):
    return _trained_like(get_jumplora_model(TINY_MODELS[arch](), _config(arch, mode, fused))).eval()


def _base_weights(model):
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in iter_jumplora_layers(model)}


@pytest.mark.parametrize("arch,mode,fused", CASES)
def test_merge_unmerge_and_safe_merge(arch, mode, fused):
    model = _model(arch, mode, fused)
    base_logits = _logits(TINY_MODELS[arch]().eval(), arch)
    adapter_logits = _logits(model, arch)
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # the adapter is not the identity
    weights = _base_weights(model)
    masks = {name: layer.final_delta("default") != 0 for name, layer in iter_jumplora_layers(model)}
    assert len({id(layer.lora_log_tau["default"]) for _, layer in iter_jumplora_layers(model)}) == GROUPS[arch, mode]

    for safe in (False, True):
        model.merge_adapter(safe_merge=safe)
        assert torch.allclose(_logits(model, arch), adapter_logits, atol=1e-5)
        for name, layer in iter_jumplora_layers(model):
            changed = layer.get_base_layer().weight != weights[name]
            assert torch.equal(changed, masks[name]), name  # W changes exactly on the support of ΔW_final
        model.unmerge_adapter()
        assert torch.allclose(_logits(model, arch), adapter_logits, atol=1e-5)
        for name, layer in iter_jumplora_layers(model):
            assert torch.allclose(layer.get_base_layer().weight, weights[name], atol=1e-6), name

    merged = model.merge_and_unload()
    assert torch.allclose(_logits(merged, arch), adapter_logits, atol=1e-5)
    assert not torch.allclose(_logits(merged, arch), base_logits, atol=1e-4)  # merged ≠ base
    assert not any("lora" in name for name in merged.state_dict())


def test_peft_loads_a_jumplora_adapter_with_modules_to_save(tmp_path):
    config = JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["o_proj"])
    model = _trained_like(get_jumplora_model(TINY_MODELS["llama"](), config)).eval()
    saved_copies = [m for n, m in model.named_modules() if n.endswith("o_proj.modules_to_save.default")]
    assert saved_copies
    with torch.no_grad():
        for copy in saved_copies:
            copy.weight.add_(0.05)  # so that the reload must restore the trained copies too
    expected = _logits(model, "llama")
    model.save_pretrained(tmp_path)
    for reloaded in (
        PeftModel.from_pretrained(TINY_MODELS["llama"](), str(tmp_path)).eval(),
        load_jumplora_adapter(TINY_MODELS["llama"](), str(tmp_path)).eval(),
    ):
        assert reloaded.peft_config["default"].modules_to_save == ["o_proj"]
        assert torch.allclose(_logits(reloaded, "llama"), expected, atol=1e-6)


def test_without_jumplora_hf_peft_refuses_the_unknown_type(tmp_path):
    get_jumplora_model(TINY_MODELS["llama"](), _config("llama", "global", True)).save_pretrained(tmp_path)
    script = (
        "import json, sys; from peft import PeftConfig\n"
        "try:\n    PeftConfig.from_pretrained(sys.argv[1])\nexcept Exception as error:\n    print(type(error).__name__, error)"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert "JUMPLORA" in done.stdout  # PEFT alone does not know the type (no dense LoRA that would ignore τ)


def test_an_adapter_of_0_2_loads_and_converts(tmp_path):
    # jumplora_hf 0.2 saved peft_type LORA, the targets under jumplora_target_modules and a pattern matching nothing
    model = _trained_like(get_jumplora_model(TINY_MODELS["llama"](), _config("llama", "global", True))).eval()
    expected = _logits(model, "llama")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved.update(peft_type="LORA", jumplora_target_modules=saved["target_modules"])
    saved["target_modules"] = "(?#This is a JumpLoRA adapter - load it with jumplora_hf.load_jumplora_adapter)(?!)"
    path.write_text(json.dumps(saved))
    assert torch.allclose(_logits(load_jumplora_adapter(TINY_MODELS["llama"](), str(tmp_path)), "llama"), expected)
    with pytest.raises(ValueError, match="load_jumplora_adapter"):  # plain PEFT: LoRA layers would ignore τ
        PeftModel.from_pretrained(TINY_MODELS["llama"](), str(tmp_path))
    from jumplora_hf.adapters import main as adapters_cli

    assert adapters_cli(["convert", str(tmp_path)]) == 0
    converted = json.loads(path.read_text())
    assert converted["peft_type"] == "JUMPLORA" and sorted(converted["target_modules"]) == ["q_proj", "v_proj"]
    reloaded = PeftModel.from_pretrained(TINY_MODELS["llama"](), str(tmp_path)).eval()
    assert torch.allclose(_logits(reloaded, "llama"), expected, atol=1e-6)


@pytest.mark.parametrize("arch,mode,fused", CASES)
def test_save_reload_and_state_dict_into_a_fresh_model(tmp_path, arch, mode, fused):
    model = _model(arch, mode, fused)
    expected = _logits(model, arch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    reloaded = load_jumplora_adapter(TINY_MODELS[arch](), str(tmp_path)).eval()
    assert reloaded.peft_config["default"].threshold_mode == mode
    layers = [layer for _, layer in iter_jumplora_layers(reloaded)]
    assert len({id(layer.lora_log_tau["default"]) for layer in layers}) == GROUPS[arch, mode]  # ties rebuilt
    assert torch.allclose(_logits(reloaded, arch), expected, atol=1e-6)
    assert all(layer.jump_gamma["default"] == 1.0 and layer.jump_tau_ready["default"] for layer in layers)

    # PEFT's own loaders build the same model: the registered JUMPLORA method, τ and γ restored, ties rebuilt
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "JUMPLORA"
    plain = PeftModel.from_pretrained(TINY_MODELS[arch](), str(tmp_path)).eval()
    layers = [layer for _, layer in iter_jumplora_layers(plain)]
    assert len({id(layer.lora_log_tau["default"]) for layer in layers}) == GROUPS[arch, mode]
    assert torch.allclose(_logits(plain, arch), expected, atol=1e-6)

    # the state dict carries γ and τ: loaded into a freshly built model (γ = 0, gate open), the outputs match
    fresh = get_jumplora_model(TINY_MODELS[arch](), _config(arch, mode, fused)).eval()
    assert not torch.allclose(_logits(fresh, arch), expected, atol=1e-4)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    assert torch.allclose(_logits(fresh, arch), expected, atol=1e-6)


@pytest.mark.parametrize("arch,mode,fused", CASES)
def test_second_adapter_and_delete(arch, mode, fused):
    model = _model(arch, mode, fused)
    first = _logits(model, arch)
    base_logits = _logits(TINY_MODELS[arch]().eval(), arch)
    model.add_adapter("other", _config(arch, mode, fused))
    _trained_like(model, "other", seed=2)
    model.set_adapter("other")
    second = _logits(model, arch)
    assert not torch.allclose(first, second, atol=1e-4)
    for _, layer in iter_jumplora_layers(model):
        assert layer.lora_log_tau["other"] is not layer.lora_log_tau["default"]
        assert layer.lora_log_tau["other"].requires_grad and not layer.lora_log_tau["default"].requires_grad
    model.set_adapter("default")
    assert torch.allclose(_logits(model, arch), first, atol=1e-6)

    model.delete_adapter("other")
    for _, layer in iter_jumplora_layers(model):
        for state in (
            layer.lora_log_tau,
            layer.lora_gate_state,
            layer.jump_gamma,
            layer.jump_tau_ready,
            layer.jump_fused,
            layer.jump_bandwidth,
            layer.jump_threshold_group,
        ):
            assert "other" not in state
    assert not any(".other" in name for name in model.state_dict())
    assert torch.allclose(_logits(model, arch), first, atol=1e-6)
    model.delete_adapter("default")
    assert torch.allclose(
        _logits(model.base_model.model, arch), base_logits, atol=1e-6
    )  # PEFT keeps no active adapter


def test_tau_follows_peft_trainability_rules(tmp_path):
    # PEFT: set_requires_grad freezes or unfreezes an adapter; load_adapter(is_trainable=True) leaves the new,
    # inactive adapter trainable. τ must follow its adapter's A and B in both.
    model = get_jumplora_model(TINY_MODELS["t5"](), JumpLoraConfig(target_modules=["q", "v"]))
    model.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(TINY_MODELS["t5"](), tmp_path, is_trainable=True)
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    model.load_adapter(tmp_path, adapter_name="frozen", is_trainable=False)

    def trainable(adapter: str) -> set[bool]:
        return {p.requires_grad for n, p in model.named_parameters() if n.endswith(f".{adapter}")}

    assert trainable("default") == trainable("other") == {True} and trainable("frozen") == {False}
    assert all(layer.lora_log_tau["other"].requires_grad for _, layer in iter_jumplora_layers(model))
    model.base_model.set_requires_grad(["default", "other"], requires_grad=False)
    assert trainable("default") == trainable("other") == {False}
    model.base_model.set_requires_grad("other")
    assert trainable("other") == {True} and trainable("default") == {False}


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(arch, dtype):
    model = _model(arch)
    reference = _logits(model, arch)
    model = model.to(dtype)
    low = _logits(model, arch).float()
    assert torch.allclose(low, reference, atol=0.15, rtol=0.05)
    for _, layer in iter_jumplora_layers(model):
        assert layer.log_tau("default").dtype == torch.float32  # the threshold is never rounded by the cast
    merged = model.merge_and_unload()
    assert torch.allclose(_logits(merged, arch).float(), low, atol=0.15, rtol=0.05)


def test_add_weighted_adapter_is_refused():
    model = _model("t5")
    model.add_adapter("other", _config("t5"))
    with pytest.raises(NotImplementedError, match="add_weighted_adapter.*ΔW ⊙ H"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "combined", combination_type="linear")


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_gamma_zero_is_exactly_plain_lora(arch):
    base = TINY_MODELS[arch]()
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch])).eval()
    jump = get_jumplora_model(base, _config(arch)).eval()
    _trained_like(jump)
    set_interpolation_gamma(jump, 0.0)  # τ is set, but γ = 0 must ignore it
    plain.load_state_dict(jump.state_dict(), strict=False)
    assert torch.equal(_logits(jump, arch), _logits(plain, arch))


def test_gamma_one_is_the_dense_layer_with_the_jumped_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    config = JumpLoraConfig(r=3, lora_alpha=6)
    layer = JumpLoraLinear(copy.deepcopy(base), "default", config=config, r=3, lora_alpha=6, target_name="l")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer.set_log_tau("default", float(torch.tensor(0.3).log()))
    layer.set_gamma("default", 1.0)
    x = torch.randn(5, 4, 12)
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    jumped = delta * (delta.abs() > 0.3)
    assert 0 < (jumped == 0).float().mean() < 1
    expected = F.linear(x, base.weight + 2.0 * jumped, base.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_task_end_merge_then_fresh_adapter_starts_from_zero(arch):
    model = _model(arch)
    adapter_out = _logits(model, arch)
    end_task(model, accumulate_w_past=False)
    assert torch.allclose(_logits(model, arch), adapter_out, atol=1e-5)  # the update lives in the base weights only
    begin_task(model, task_index=1, seed=0)
    for _, layer in iter_jumplora_layers(model):
        assert not layer.lora_B["default"].weight.any()
        assert layer.jump_gamma["default"] == 0.0 and not layer.jump_tau_ready["default"]
    fresh_out = _logits(model, arch)  # ΔW = 0: the merged base model alone
    with model.disable_adapter():
        assert torch.equal(fresh_out, _logits(model, arch))
    assert torch.allclose(fresh_out, adapter_out, atol=1e-5)


def test_one_config_reused_for_two_models_shares_nothing():
    config = JumpLoraConfig(target_modules=["q", "v"])
    first = get_jumplora_model(TINY_MODELS["t5"](), config)
    second = get_jumplora_model(TINY_MODELS["t5"](), config)
    tau = lambda m: next(layer for _, layer in iter_jumplora_layers(m)).lora_log_tau["default"]
    assert tau(first) is not tau(second)


def test_plain_get_peft_model_ties_the_thresholds():
    # the registered JUMPLORA method ties each threshold group when PEFT injects the layers: trl's route too
    model = get_peft_model(TINY_MODELS["t5"](), JumpLoraConfig(target_modules=["q", "v"]))
    assert type(model.base_model).__name__ == "JumpLoraModel"
    assert len({id(layer.lora_log_tau["default"]) for _, layer in iter_jumplora_layers(model)}) == 1


@pytest.mark.parametrize(
    "targets,message",
    [
        (["query_proj"], r"match no module.*'query_proj'.*'q'.*'v'"),
        (["q", "vv"], r"match no module.*'vv' \(closest: \['v'"),
        (["q_proj", "v_proj"], r"'q_proj' \(closest: \['q'\]\); 'v_proj' \(closest: \['v'\]\)"),  # Llama's names on T5
        (["q", "lm_head"], "shares its weight"),
    ],
)
def test_bad_targets_are_refused(targets, message):
    with pytest.raises(ValueError, match=message):
        get_jumplora_model(TINY_MODELS["t5"](), JumpLoraConfig(target_modules=targets))


def test_a_typo_in_one_llama_target_is_refused_with_the_closest_name():
    with pytest.raises(ValueError, match=r"'v_prj' \(closest: \['v_proj'"):
        get_jumplora_model(TINY_MODELS["llama"](), JumpLoraConfig(target_modules=["q_proj", "v_prj"]))


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
        ({"target_modules": [], "target_parameters": ["q.weight"]}, "target_parameters"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JumpLoraConfig(**kwargs)


def test_method_is_the_one_switch_of_the_gate():
    unset = JumpLoraConfig(target_modules=["q"])
    assert unset.use_jumprelu and unset.with_gate(False, "inclora").use_jumprelu is False
    with pytest.raises(ValueError, match="conflicts with method 'inclora'"):
        JumpLoraConfig(target_modules=["q"], use_jumprelu=True).with_gate(False, "inclora")
    assert JumpLoraConfig(use_jumprelu=False).with_gate(False, "ella").use_jumprelu is False

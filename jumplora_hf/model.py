"""Wrapping a transformers model with JumpLoRA adapters, and reloading saved adapters."""

from __future__ import annotations

import dataclasses

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .config import JumpLoraConfig
from .layer import iter_jumplora_layers


def _resolved_targets(model: torch.nn.Module, config: JumpLoraConfig) -> JumpLoraConfig:
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if defaults is None:
        raise ValueError(f"no default target_modules for model type {model_type!r}; set target_modules explicitly")
    return dataclasses.replace(config, target_modules=list(defaults))


def check_target_modules(model: torch.nn.Module, config: JumpLoraConfig) -> list[str]:
    """Names of the modules `config` adapts; a clear error if none match or a match is not an nn.Linear."""
    resolved = _resolved_targets(model, config)
    if resolved.target_modules == "all-linear":  # PEFT expands it to every linear layer but the output head
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output]
    matched = [name for name, _ in model.named_modules() if name and check_target_module_exists(resolved, name)]
    linear_leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if not matched:
        raise ValueError(
            f"target_modules={sorted(resolved.target_modules) if not isinstance(resolved.target_modules, str) else resolved.target_modules!r} "
            f"matched no module of {type(model).__name__}; its nn.Linear modules are named {linear_leaves}"
        )
    modules = dict(model.named_modules())
    wrong = [f"{name} ({type(modules[name]).__name__})" for name in matched if not isinstance(modules[name], torch.nn.Linear)]
    if wrong:
        raise ValueError(f"JumpLoRA adapts nn.Linear layers only; target_modules also matched {wrong[:5]}")
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    tied = [n for n in matched if len(owners.get(id(modules[n].weight), ())) > 1]
    if tied:
        raise ValueError(
            f"{tied[0]} shares its weight with {[o for o in owners[id(modules[tied[0]].weight)] if not o.startswith(tied[0] + '.')]}: "
            "every task merges into the base weights, which would change the tied ones too; leave it out of target_modules"
        )
    return matched


def get_jumplora_model(model: torch.nn.Module, config: JumpLoraConfig, adapter_name: str = "default") -> PeftModel:
    """`peft.get_peft_model` after checking that the targets exist and are linear layers."""
    check_target_modules(model, config)
    return get_peft_model(model, config, adapter_name=adapter_name)


def load_jumplora_adapter(
    model: torch.nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Reload an adapter saved with `save_pretrained` (adapter_config.json + adapter_model.safetensors).

    The saved τ is restored and the gate set to γ = 1, so the adapter applies β·ΔW_jump: the sparse
    update that the end of its task merges (with `merge_and_unload()` too).
    """
    config = JumpLoraConfig.from_pretrained(path)
    config.inference_mode = not is_trainable
    peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config)
    for _, layer in iter_jumplora_layers(peft_model):
        if layer.is_jump(adapter_name):
            layer.jump_gamma[adapter_name] = 1.0
            layer.jump_tau_ready[adapter_name] = True
    return peft_model

"""A transformers model with JumpLoRA adapters: building it (targets checked, thresholds tied), reloading saved adapters,
and saving the merged model as a plain transformers checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import warnings

import torch
from peft import PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ._compat import check_target_module_exists
from .config import JumpLoraConfig
from .layer import iter_jumplora_layers
from .model import JumpLoraModel  # noqa: F401 (registers JumpLoRA with PEFT, which the functions here use)
from .thresholds import tie_thresholds


def check_model_path(path: str) -> None:
    """A clear error for a model path meant as a local folder that does not exist, before anything asks the Hub.

    A Hub id is `name` or `owner/name`; a path that starts with `.`, `/` or `~`, has more parts, or whose first part
    is a local folder (`models/nope` next to a `models/` folder) is a local path."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return
    parts = [p for p in path.replace(os.sep, "/").split("/") if p]
    local = path.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))
    if os.path.isfile(expanded) or local:
        raise FileNotFoundError(
            f"no such model folder: {path!r}"
            + (" (it is a file)" if os.path.isfile(expanded) else "")
            + ". Pass a folder with config.json and the weights, or a Hub id (owner/name); `make demo` converts an "
            "offline model into models/SmolLM2-135M-Instruct"
        )


def _resolved_targets(model: torch.nn.Module, config: JumpLoraConfig) -> JumpLoraConfig:
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if defaults is None:
        raise ValueError(f"no default target_modules for model type {model_type!r}; set target_modules explicitly")
    return dataclasses.replace(config, target_modules=list(defaults))


def _closest(name: str, leaves: list[str]) -> list[str]:
    """Module names close to `name`: by spelling, else by prefix (T5's `q` is Llama's `q_proj`, and the reverse)."""
    return difflib.get_close_matches(name, leaves, n=3, cutoff=0.5) or [
        leaf for leaf in leaves if leaf.startswith(f"{name}_") or name.startswith(f"{leaf}_")
    ]


def _unmatched_names(targets, names: list[str]) -> list[str]:
    """The names of a target list that match no module (as PEFT matches them: the name or a `.name` suffix)."""
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]


def check_target_modules(model: torch.nn.Module, config: JumpLoraConfig) -> list[str]:
    """Names of the modules `config` adapts; a clear error if a target name matches nothing (with the closest
    existing names) or a match is not an nn.Linear, or its weight is tied to another module's."""
    resolved = _resolved_targets(model, config)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if resolved.target_modules == "all-linear":  # PEFT expands it to every linear layer but the output head
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output]
    names = [name for name, _ in model.named_modules() if name]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    if not isinstance(resolved.target_modules, str):
        unmatched = _unmatched_names(sorted(resolved.target_modules), names)
        if unmatched:
            hints = {t: _closest(t, leaves) for t in unmatched}
            described = "; ".join(f"{t!r} (closest: {hints[t]})" if hints[t] else repr(t) for t in unmatched)
            error = ValueError(
                f"target_modules names that match no module of {type(model).__name__}: {described}. Its nn.Linear "
                f"modules are named {leaves}; fix or remove those names"
            )
            # the same targets with each unmatched name replaced by its closest match, when every one has one
            if all(hints[t] for t in unmatched):
                error.suggestion = [hints[t][0] if t in hints else t for t in sorted(resolved.target_modules)]
            raise error
    matched = [name for name in names if check_target_module_exists(resolved, name)]
    if not matched:
        raise ValueError(
            f"target_modules={resolved.target_modules!r} matched no module of {type(model).__name__}; its nn.Linear "
            f"modules are named {leaves}"
        )
    modules = dict(model.named_modules())
    wrong = [
        f"{name} ({type(modules[name]).__name__})"
        for name in matched
        if not isinstance(modules[name], torch.nn.Linear)
    ]
    if wrong:
        raise ValueError(f"JumpLoRA adapts nn.Linear layers only; target_modules also matched {wrong[:5]}")
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    tied = [n for n in matched if len(owners.get(id(modules[n].weight), ())) > 1]
    if tied:
        others = [o for o in owners[id(modules[tied[0]].weight)] if not o.startswith(tied[0] + ".")]
        raise ValueError(
            f"{tied[0]} shares its weight with {others}: every task merges into the base weights, which would change "
            "the tied ones too; leave it out of target_modules"
        )
    return matched


def check_target_modules_of_peft_model(model: torch.nn.Module, adapter: str = "default") -> None:
    """The checks of `check_target_modules` for a model that PEFT (or trl) already wrapped."""
    config = getattr(model, "peft_config", {}).get(adapter)
    if not isinstance(config, JumpLoraConfig):
        raise ValueError(
            f"adapter {adapter!r} is not a JumpLoRA adapter ({type(config).__name__}): build the model with "
            "get_jumplora_model, or pass peft_config=JumpLoraConfig(...) to the trainer"
        )
    layers = [layer for _, layer in iter_jumplora_layers(model) if adapter in layer.lora_A]
    if not layers:
        raise ValueError("no JumpLoRA layer in the model: were the targets injected with another config?")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(config.target_modules, (list, set, tuple)):
        names = [name for name, _ in base.named_modules() if name]
        unmatched = _unmatched_names(sorted(config.target_modules), names)
        if unmatched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
            hints = {t: difflib.get_close_matches(t, leaves, n=3, cutoff=0.5) for t in unmatched}
            raise ValueError(
                "target_modules names that match no module: "
                + "; ".join(f"{t!r} (closest: {hints[t]})" if hints[t] else repr(t) for t in unmatched)
                + f". The nn.Linear modules are named {leaves}; fix or remove those names"
            )
    owners: dict[int, list[str]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    tied = [layer for layer in layers if len(owners.get(id(layer.get_base_layer().weight), ())) > 1]
    if tied:
        raise ValueError(
            f"an adapted weight is shared with {owners[id(tied[0].get_base_layer().weight)]}: every task merges into "
            "the base weights, which would change the tied ones too; leave it out of target_modules"
        )


def get_jumplora_model(model: torch.nn.Module, config: JumpLoraConfig, adapter_name: str = "default") -> PeftModel:
    """`peft.get_peft_model` after checking the targets, with the thresholds of each group tied."""
    check_target_modules(model, config)
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    tie_thresholds(peft_model, adapter_name)
    return peft_model


def load_jumplora_adapter(
    model: torch.nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs
) -> PeftModel:
    """Reload an adapter saved with `save_pretrained` (adapter_config.json + adapter_model.safetensors).

    The saved τ and γ are restored (γ = 1 for an adapter saved after its task's schedule), so the adapter applies
    the update of its state, and `merge_and_unload()` gives the same model. Adapters saved by jumplora_hf 0.1 (no
    gate state) get γ = 1 and their full log τ. `kwargs` go to `PeftModel.from_pretrained` (revision, token, ...).
    """
    config = JumpLoraConfig.from_pretrained(
        path, **{k: v for k, v in kwargs.items() if k in ("revision", "subfolder", "token")}
    )
    config.inference_mode = not is_trainable
    peft_model = PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )
    tie_thresholds(peft_model, adapter_name)
    for _, layer in iter_jumplora_layers(peft_model):
        if (
            layer.is_jump(adapter_name)
            and not layer.jump_tau_ready[adapter_name]
            and layer.lora_log_tau[adapter_name].item() != 0.0
        ):
            # jumplora_hf 0.1 saved the whole log τ as lora_log_tau and no gate state: anchor it, gate fully on
            layer.set_log_tau(adapter_name, float(layer.lora_log_tau[adapter_name].item()))
            layer.set_gamma(adapter_name, 1.0)
    return peft_model


def merged_base_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PeftModel state dict without the (empty) adapters, with the plain model's key names."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key or ".osf_svd_params." in key or "._osf_" in key:
            continue  # the adapters are empty (B = 0; OSF: zero factors) after a task's merge
        out[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] = value
    return out


def save_merged_model(trainer, output_dir: str) -> None:
    """The base model with every finished task merged in, as a plain transformers checkpoint (+ tokenizer).

    Under ZeRO-3 the weights are gathered as a 16-bit state dict, which needs `zero3_save_16bit_model: true`
    (accelerate config) / `stage3_gather_16bit_weights_on_model_save`. Call it on every process; the main
    process writes.
    """
    wrapped = (
        trainer.model_wrapped
        if trainer.is_deepspeed_enabled and trainer.model_wrapped is not trainer.model
        else trainer.model
    )
    state = trainer.accelerator.get_state_dict(wrapped)
    if not trainer.is_world_process_zero():
        return
    trainer.model.get_base_model().save_pretrained(output_dir, state_dict=merged_base_state_dict(state))
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)


# ----------------------------------------------------------------------------- converting adapters of 0.2
def convert_adapter(path: str) -> bool:
    """Rewrite the adapter_config.json of a jumplora_hf 0.2 JumpLoRA adapter (peft_type LORA, its targets under
    `jumplora_target_modules`) as a JUMPLORA adapter that PEFT's own loaders take; True if it changed anything."""
    from .config import SAVED_MODULES_TO_SAVE_KEY, SAVED_TARGETS_KEY
    from .files import read_json, write_json_atomic

    config_path = os.path.join(path, "adapter_config.json")
    saved = read_json(config_path)
    if SAVED_TARGETS_KEY not in saved:
        return False
    saved["target_modules"] = saved.pop(SAVED_TARGETS_KEY)
    if SAVED_MODULES_TO_SAVE_KEY in saved:
        saved["modules_to_save"] = saved.pop(SAVED_MODULES_TO_SAVE_KEY)
    saved["peft_type"] = "JUMPLORA"
    write_json_atomic(config_path, saved, indent=2)
    return True


def main(argv: list[str] | None = None) -> int:
    """python -m jumplora_hf.adapters convert DIR [DIR ...]: adapters saved by jumplora_hf 0.2 → this version's format."""
    parser = argparse.ArgumentParser(prog="python -m jumplora_hf.adapters", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="rewrite 0.2 adapters as JUMPLORA adapters (in place)")
    convert.add_argument("folders", nargs="+")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            print(f"error: {folder} has no adapter_config.json", file=sys.stderr)
            return 2
        print(f"{folder}: " + ("converted" if convert_adapter(folder) else "already in this version's format"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

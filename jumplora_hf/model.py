"""`JumpLoraModel`: JumpLoRA as a PEFT method of its own (`peft_type` "JUMPLORA"), registered with PEFT.

Once registered (`import jumplora_hf`, then PEFT; jumplora_hf/__init__.py), PEFT's own entry points take JumpLoRA
adapters: `get_peft_model(model, JumpLoraConfig(...))`, `PeftModel.from_pretrained(base, path)`,
`AutoPeftModelForCausalLM` / `AutoPeftModelForSeq2SeqLM.from_pretrained(path)` and trl's `peft_config=`. The tuner is
PEFT's LoRA model (a JumpLoRA layer is a LoRA layer with a variant) that ties the τ of each threshold group after it
injects the layers, so every route gives the same model. Without jumplora_hf, PEFT refuses the type as unknown
instead of building dense LoRA layers that would ignore τ.
"""

from __future__ import annotations

from peft.tuners.lora import LoraModel

from ._deprecation import moved
from .config import PEFT_TYPE, JumpLoraConfig
from .thresholds import tie_thresholds


class JumpLoraModel(LoraModel):
    """PEFT's `LoraModel` with JumpLoRA layers; the thresholds of each group are tied once the layers exist."""

    prefix: str = "lora_"

    def inject_adapter(self, model, adapter_name: str, *args, **kwargs):
        result = super().inject_adapter(model, adapter_name, *args, **kwargs)
        tie_thresholds(model, adapter_name)  # before any optimizer sees the parameters
        return result


def register_with_peft() -> None:
    """Register JumpLoRA with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is JumpLoraModel:
        return
    register_peft_method(name="jumplora", config_cls=JumpLoraConfig, model_cls=JumpLoraModel, prefix="lora_")


register_with_peft()


# the 0.2 names of what moved in 0.3
__getattr__ = moved(
    __name__,
    {
        "get_jumplora_model": ("adapters", "get_jumplora_model"),
        "load_jumplora_adapter": ("adapters", "load_jumplora_adapter"),
        "check_target_modules": ("adapters", "check_target_modules"),
        "check_target_modules_of_peft_model": ("adapters", "check_target_modules_of_peft_model"),
        "save_merged_model": ("adapters", "save_merged_model"),
        "merged_base_state_dict": ("adapters", "merged_base_state_dict"),
    },
)

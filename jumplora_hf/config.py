"""`JumpLoraConfig`: a `peft.LoraConfig` whose targeted `nn.Linear` layers become JumpLoRA layers. Data only."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from peft import LoraConfig

from ._compat import add_peft_type, register_custom_lora_layer
from .files import read_json, write_json_atomic
from .groups import THRESHOLD_MODES

# The layer class for each base layer type; layer.py registers JumpLoraLinear for nn.Linear when it is imported
# (importing any public name from the package loads it first), so this module never imports the layer.
_LAYERS: dict[type, type] = {}
# jumplora_hf 0.2 saved a JumpLoRA adapter as peft_type LORA with its targets under this key and a `target_modules`
# pattern that matches no module (so plain PEFT failed instead of ignoring τ). Such adapters still load
# (`load_jumplora_adapter`), and `python -m jumplora_hf.adapters convert DIR` rewrites them as JUMPLORA adapters.
SAVED_TARGETS_KEY = "jumplora_target_modules"
SAVED_MODULES_TO_SAVE_KEY = "jumplora_modules_to_save"
PEFT_TYPE = add_peft_type("JUMPLORA")


def _peft_knows_jumplora() -> bool:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING


def register_jumplora_layer(base_type: type, layer_type: type) -> None:
    _LAYERS[base_type] = layer_type


@dataclass
class JumpLoraConfig(LoraConfig):
    """Configuration of JumpLoRA adapters (arXiv 2604.16171) on top of PEFT's LoRA.

    It is a `LoraConfig` (same `r`, `lora_alpha`, `target_modules`, ...) of its own PEFT type, "JUMPLORA" (model.py):
    after `import jumplora_hf`, `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained` and the
    `AutoPeftModel*` classes handle it; every targeted `nn.Linear` becomes a `JumpLoraLinear`. With
    `use_jumprelu=False` (IncLoRA, ELLA, O-LoRA) the adapter is saved as plain LoRA, which any PEFT loads.
    """

    use_jumprelu: bool | None = field(
        default=None,
        metadata={
            "help": (
                "Gate ΔW = B·A with the symmetric JumpReLU (JumpLoRA). False gives plain LoRA with the same layer (the "
                "IncLoRA and ELLA baselines). Unset, the continual method decides (ContinualTrainer's `method`), "
                "and a model built from the config alone gets the gate; a value that conflicts with the method is refused."
            ),
            "is_lora_variant": True,
        },
    )
    threshold_mode: str = field(
        default="global",
        metadata={
            "help": (
                "How thresholds τ are shared: 'global' (one τ for all adapted layers), 'per_block' (one τ per "
                "transformer block, the paper's 'local'; the block is the module path up to its first numeric "
                "index, e.g. 'encoder.block.3'), 'per_module' (one τ per adapted linear)."
            )
        },
    )
    jump_bandwidth: float = field(
        default=0.001,
        metadata={"help": "Bandwidth ε of the rectangle kernel in the τ pseudo-derivative (paper: 0.001)."},
    )
    jump_fused: bool = field(
        default=True,
        metadata={
            "help": (
                "Use the fused, memory-lean JumpLoRA linear (`gate.fused_jump_linear`) while the gate is on (γ > 0): "
                "one dense GEMM forward with W + β·ΔW_interp, and no d_out×d_in tensor kept for the backward. False "
                "selects the reference path (plain autograd through ΔW, the mask and ΔW_interp), which stays "
                "available for tests and debugging; both give the same values and gradients."
            )
        },
    )
    s_start: float = field(
        default=0.2,
        metadata={
            "help": (
                "S_start as a fraction of the task's optimizer steps: γ stays 0 before it, and τ is initialised "
                "at it so that as many |ΔW| entries exceed τ as A and B have parameters (per threshold group)."
            )
        },
    )
    s_final: float = field(
        default=0.8,
        metadata={"help": "S_final as a fraction of the task's optimizer steps: γ reaches 1 here (linear ramp)."},
    )

    def __post_init__(self):
        # Runtime only (not a field, never saved): whether the gate was left to the continual method.
        self.gate_from_method = self.use_jumprelu is None
        if self.use_jumprelu is None:
            self.use_jumprelu = True
        super().__post_init__()
        problems = []
        if self.threshold_mode not in THRESHOLD_MODES:
            problems.append(f"threshold_mode={self.threshold_mode!r} is unknown; use one of {THRESHOLD_MODES}")
        if not (0.0 <= self.s_start <= 1.0 and 0.0 <= self.s_final <= 1.0):
            problems.append(f"s_start={self.s_start} and s_final={self.s_final} must both lie in [0, 1]")
        elif self.s_start >= self.s_final:
            problems.append(f"s_start={self.s_start} must be smaller than s_final={self.s_final}")
        if not self.jump_bandwidth > 0:
            problems.append(f"jump_bandwidth={self.jump_bandwidth} must be > 0 (the paper uses 0.001)")
        if self.use_jumprelu and self.lora_dropout > 0:
            problems.append(
                f"lora_dropout={self.lora_dropout} is not supported with use_jumprelu=True: the gate acts on the "
                "dense ΔW, which cannot take input dropout without a second matmul; set lora_dropout=0"
            )
        if getattr(self, "target_parameters", None):
            problems.append(
                f"target_parameters={self.target_parameters!r} is not supported: JumpLoRA adapts nn.Linear modules; "
                "name them in target_modules"
            )
        if self.use_dora or self.lora_bias or self.fan_in_fan_out:
            problems.append("use_dora, lora_bias and fan_in_fan_out are not supported by JumpLoRA; set them to False")
        if self.init_lora_weights is not True:
            problems.append(
                f"init_lora_weights={self.init_lora_weights!r}: JumpLoRA re-initialises A (Kaiming uniform) and "
                "B (zeros) at every task, so only init_lora_weights=True is supported"
            )
        if problems:
            raise ValueError("Invalid JumpLoraConfig: " + "; ".join(problems) + ".")
        if not _LAYERS:
            raise ImportError(
                "the JumpLoRA layer is not registered: import JumpLoraConfig from jumplora_hf (which loads "
                "jumplora_hf.layer), not from jumplora_hf.config alone"
            )
        register_custom_lora_layer(self, {base: layer for base, layer in _LAYERS.items()})
        self.peft_type = PEFT_TYPE
        if not _peft_knows_jumplora():
            raise ImportError(
                "JumpLoRA is not registered with PEFT: import JumpLoraConfig from jumplora_hf (which loads "
                "jumplora_hf.model), not from jumplora_hf.config alone"
            )

    def with_gate(self, use_jumprelu: bool, method: str) -> JumpLoraConfig:
        """This config with the gate the continual `method` needs; refuses one that set the gate otherwise."""
        if self.use_jumprelu == use_jumprelu:
            return self
        if not self.gate_from_method:
            raise ValueError(
                f"JumpLoraConfig(use_jumprelu={self.use_jumprelu}) conflicts with method {method!r}, which "
                f"{'uses' if use_jumprelu else 'does not use'} the JumpReLU gate; leave use_jumprelu unset (the "
                "method decides) or pick the matching method"
            )
        config = dataclasses.replace(self, use_jumprelu=use_jumprelu)
        config.gate_from_method = True
        return config

    @classmethod
    def from_peft_type(cls, **kwargs):
        # keep our class for a JUMPLORA config, and for a LORA one of jumplora_hf 0.2 restore the saved targets; drop
        # keys that a newer or older version wrote but this one does not know
        kwargs.pop("peft_type", None)
        if SAVED_TARGETS_KEY in kwargs:
            kwargs["target_modules"] = kwargs.pop(SAVED_TARGETS_KEY)
        if SAVED_MODULES_TO_SAVE_KEY in kwargs:
            kwargs["modules_to_save"] = kwargs.pop(SAVED_MODULES_TO_SAVE_KEY)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        if self.use_jumprelu:
            return
        # a plain LoRA adapter (IncLoRA, ELLA, O-LoRA): saved as PEFT's LORA, which loads it without jumplora_hf
        path = os.path.join(save_directory, "adapter_config.json")
        saved = read_json(path)
        saved["peft_type"] = "LORA"
        write_json_atomic(path, saved, indent=2)

"""`JumpLoraConfig`: a `peft.LoraConfig` whose targeted `nn.Linear` layers become JumpLoRA layers. Data only."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from peft import LoraConfig

from ._compat import register_custom_lora_layer
from .files import read_json, write_json_atomic
from .groups import THRESHOLD_MODES

# The layer class for each base layer type; layer.py registers JumpLoraLinear for nn.Linear when it is imported
# (importing any public name from the package loads it first), so this module never imports the layer.
_LAYERS: dict[type, type] = {}
# In adapter_config.json, where a JumpLoRA adapter keeps its targets. Its `target_modules` is a pattern that matches
# no module, so that plain `PeftModel.from_pretrained` fails with this message instead of silently loading the
# dense LoRA update (its layers would ignore τ); `JumpLoraConfig.from_pretrained` restores the targets.
SAVED_TARGETS_KEY = "jumplora_target_modules"
# modules_to_save would give plain PEFT something to wrap, and its "no modules were targeted" error would then lose
# the hint: it is kept under its own key too
SAVED_MODULES_TO_SAVE_KEY = "jumplora_modules_to_save"
PLAIN_PEFT_SENTINEL = "(?#This is a JumpLoRA adapter - load it with jumplora_hf.load_jumplora_adapter)(?!)"


def register_jumplora_layer(base_type: type, layer_type: type) -> None:
    _LAYERS[base_type] = layer_type


@dataclass
class JumpLoraConfig(LoraConfig):
    """Configuration of JumpLoRA adapters (arXiv 2604.16171) on top of PEFT's LoRA.

    It is a `LoraConfig` (same `r`, `lora_alpha`, `target_modules`, ... and the same `get_peft_model` /
    `save_pretrained` flow); every targeted `nn.Linear` becomes a `JumpLoraLinear`. Reload a saved adapter with
    `jumplora_hf.load_jumplora_adapter` (plain `PeftModel.from_pretrained` refuses a JumpLoRA adapter).
    """

    use_jumprelu: bool | None = field(
        default=None,
        metadata={
            "help": (
                "Gate ΔW = B·A with the symmetric JumpReLU (JumpLoRA). False gives plain LoRA with the same layer (the "
                "IncLoRA and ELLA baselines). Unset, the continual method decides (ContinualSeq2SeqTrainer's `method`), "
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
        # PEFT would build a plain LoraConfig from `peft_type: LORA`; keep our class, restore the saved targets,
        # and drop keys that a newer or older version wrote but this one does not know.
        kwargs.pop("peft_type", None)
        if SAVED_TARGETS_KEY in kwargs:
            kwargs["target_modules"] = kwargs.pop(SAVED_TARGETS_KEY)
        if SAVED_MODULES_TO_SAVE_KEY in kwargs:
            kwargs["modules_to_save"] = kwargs.pop(SAVED_MODULES_TO_SAVE_KEY)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        if not self.use_jumprelu:
            return  # a plain LoRA adapter (IncLoRA, ELLA): plain PEFT loads it correctly
        path = os.path.join(save_directory, "adapter_config.json")
        saved = read_json(path)
        saved[SAVED_TARGETS_KEY] = saved["target_modules"]
        saved["target_modules"] = PLAIN_PEFT_SENTINEL
        if saved.get("modules_to_save"):
            saved[SAVED_MODULES_TO_SAVE_KEY], saved["modules_to_save"] = saved["modules_to_save"], None
        write_json_atomic(path, saved, indent=2)

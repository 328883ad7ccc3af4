"""`JumpLoraConfig`: a `peft.LoraConfig` that injects JumpLoRA layers."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig

THRESHOLD_MODES = ("global", "per_block", "per_module")
_FIRST_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def threshold_group(threshold_mode: str, module_name: str) -> str:
    """Name of the threshold group of an adapted module: "global", its block path, or its own name."""
    if threshold_mode == "global":
        return "global"
    if threshold_mode == "per_block":
        match = _FIRST_INDEX.match(module_name)
        return match.group(1) if match else module_name
    return module_name


@dataclass
class JumpLoraConfig(LoraConfig):
    """Configuration of JumpLoRA adapters (arXiv 2604.16171) on top of PEFT's LoRA.

    It is a `LoraConfig` (same `r`, `lora_alpha`, `target_modules`, ... and the same `get_peft_model`
    / `save_pretrained` flow); every targeted `nn.Linear` becomes a `JumpLoraLinear`. Reload a saved
    adapter with `jumplora_hf.load_jumplora_adapter` (or pass `config=JumpLoraConfig.from_pretrained(path)`
    to `PeftModel.from_pretrained`), because the file says `peft_type: LORA`.
    """

    use_jumprelu: bool = field(
        default=True,
        metadata={
            "help": (
                "Gate ΔW = B·A with the symmetric JumpReLU (JumpLoRA). False gives plain LoRA with the same "
                "layer, which is how the IncLoRA and ELLA baselines run."
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

        from .layer import JumpLoraLinear  # the layer module imports this one

        self._register_custom_module({torch.nn.Linear: JumpLoraLinear})
        # Runtime only (not a dataclass field, so never serialised): the shared log τ parameters of
        # the threshold groups of the model being injected, see `JumpLoraLinear.update_layer`.
        self._log_tau_bank: dict[tuple[str, str], torch.nn.Parameter] = {}
        self._log_tau_bank_members: set[tuple[str, str]] = set()

    @classmethod
    def from_peft_type(cls, **kwargs):
        # PEFT would build a plain LoraConfig from `peft_type: LORA`; keep our class and drop keys that a
        # newer or older version wrote but this one does not know.
        kwargs.pop("peft_type", None)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def shared_log_tau(self, adapter_name: str, group: str, module_name: str, device: torch.device) -> torch.nn.Parameter:
        """The log τ parameter of `group`, created on first use and shared by every member.

        A module name that joins twice means the config is being injected into a new model: the bank
        is then cleared so that two models built from one config never share a threshold.
        """
        member = (adapter_name, module_name)
        if member in self._log_tau_bank_members:
            self._log_tau_bank.clear()
            self._log_tau_bank_members.clear()
        self._log_tau_bank_members.add(member)
        key = (adapter_name, group)
        if key not in self._log_tau_bank:
            # shape (1,), not (): DeepSpeed ZeRO cannot flatten 0-dim parameters
            self._log_tau_bank[key] = torch.nn.Parameter(torch.zeros(1, dtype=torch.float32, device=device))
        param = self._log_tau_bank[key]
        if param.device != torch.device(device):
            raise ValueError(
                f"threshold_mode={self.threshold_mode!r} shares one τ across modules on {param.device} and "
                f"{device} ({module_name}); put the adapted layers on one device or use threshold_mode='per_module'."
            )
        return param

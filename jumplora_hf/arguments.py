"""`JumpLoraArguments`: the adapters' command-line flags, for `HfArgumentParser` next to a script's own dataclasses.

    parser = HfArgumentParser((ScriptArguments, TrainingArguments, JumpLoraArguments))
    script_args, training_args, jumplora_args = parser.parse_args_into_dataclasses()
    model = get_jumplora_model(model, jumplora_args.to_peft_config())

The flags carry a `jumplora_` prefix, so they sit beside trl's `ModelConfig` (`--lora_r`, `--use_peft`, ...) and
the Trainer's own without a clash. (`JumpLoraConfig` itself cannot be parsed: PEFT's field types are unions that
`HfArgumentParser` does not take.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .groups import THRESHOLD_MODES
from .methods import METHODS, get_method


@dataclass
class JumpLoraArguments:
    jumplora_method: str | None = field(
        default=None,
        metadata={
            "help": (
                "For a Trainer script: jumplora_inclora (the gate on), inclora (plain LoRA, merged per task), "
                "jumplora_ella or ella (with --jumplora_ella_lambda). Unset: jumplora_inclora. The recipes and "
                "ContinualTrainer take --method instead."
            ),
            "choices": sorted(m for m in METHODS if not (METHODS[m].olora or METHODS[m].osf)),
        },
    )
    jumplora_ella_lambda: list[str] | None = field(
        default=None,
        metadata={"help": "λ of the ELLA term for the ella methods: one value, one per task, or 'auto'."},
    )
    jumplora_ella_delta_mode: str = field(
        default="sparse",
        metadata={
            "help": "ΔW_x in the ELLA term: sparse (ΔW_jump) or interpolated.",
            "choices": ["sparse", "interpolated"],
        },
    )
    jumplora_ella_target_ratio: float = field(
        default=1.0, metadata={"help": "With --jumplora_ella_lambda auto: the term's size relative to the loss."}
    )
    jumplora_previous_task: str | None = field(
        default=None,
        metadata={
            "help": (
                "The previous task's merged model folder (with jumplora_continual.safetensors): where the task index "
                "and ELLA's W_past continue from. Default: the folder the model was loaded from, if it has one."
            )
        },
    )
    jumplora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    jumplora_alpha: float = field(default=32, metadata={"help": "LoRA α (the update is scaled by β = α/r)."})
    jumplora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Names of the nn.Linear modules to adapt (default: PEFT's defaults for the model type)."},
    )
    jumplora_threshold_mode: str = field(
        default="global",
        metadata={
            "help": "How τ is shared: global, per_block (the paper's local) or per_module.",
            "choices": list(THRESHOLD_MODES),
        },
    )
    jumplora_s_start: float = field(
        default=0.2, metadata={"help": "S_start: fraction of a task's steps where τ is set and γ starts."}
    )
    jumplora_s_final: float = field(
        default=0.8, metadata={"help": "S_final: fraction of a task's steps where γ reaches 1."}
    )
    jumplora_bandwidth: float = field(default=0.001, metadata={"help": "ε, the bandwidth of the τ pseudo-derivative."})
    jumplora_fused: bool = field(
        default=True, metadata={"help": "The fused JumpLoRA linear while the gate is on (one GEMM)."}
    )

    def __post_init__(self):
        if self.jumplora_method is not None:
            method = get_method(self.jumplora_method)
            if method.ella and not self.jumplora_ella_lambda:
                raise ValueError(
                    f"--jumplora_method {self.jumplora_method} needs --jumplora_ella_lambda (e.g. 3e4, or auto)"
                )
            if not method.ella and self.jumplora_ella_lambda:
                raise ValueError(f"--jumplora_ella_lambda is for the ella methods, not {self.jumplora_method}")

    def to_peft_config(self, **overrides):
        """The `JumpLoraConfig` of these flags (validated); `overrides` set any other LoraConfig field."""
        from .adapters import JumpLoraConfig  # here, so that parsing flags imports neither torch nor peft

        gate = None if self.jumplora_method is None else get_method(self.jumplora_method).jump_gate
        return JumpLoraConfig(
            r=self.jumplora_r,
            lora_alpha=self.jumplora_alpha,
            target_modules=self.jumplora_target_modules,
            threshold_mode=self.jumplora_threshold_mode,
            s_start=self.jumplora_s_start,
            s_final=self.jumplora_s_final,
            jump_bandwidth=self.jumplora_bandwidth,
            jump_fused=self.jumplora_fused,
            use_jumprelu=gate,
            **overrides,
        )

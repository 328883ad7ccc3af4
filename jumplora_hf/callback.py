"""`JumpLoRATrainerCallback`: the γ schedule and the τ initialisation inside any HF `Trainer`."""

from __future__ import annotations

from transformers import TrainerCallback

from .gate import interpolation_gamma
from .layer import iter_jumplora_layers, set_interpolation_gamma
from .thresholds import initialize_thresholds, threshold_statistics


class JumpLoRATrainerCallback(TrainerCallback):
    """Drives JumpLoRA over one `trainer.train()` call (one task).

    Steps are the task's optimizer steps (`state.global_step` from 0 to `state.max_steps`). Before each
    step s it sets γ = clip((s − S_start)/(S_final − S_start), 0, 1) on every JumpLoRA layer, and at
    the first step ≥ S_start it initialises τ. S_start and S_final are the fractions `s_start` and
    `s_final` of the model's `JumpLoraConfig` times `max_steps`. At each log it adds γ, the τ range
    and the current sparsity of ΔW_jump (`jump/...`) to the logs.
    """

    def __init__(self, adapter_name: str = "default"):
        self.adapter_name = adapter_name
        self.start_step = 0
        self.final_step = 0

    def _jump_config(self, model):
        config = getattr(model, "peft_config", {}).get(self.adapter_name)
        return config if getattr(config, "use_jumprelu", False) else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = self._jump_config(model)
        if config is None:
            return
        self.start_step = round(config.s_start * state.max_steps)
        self.final_step = round(config.s_final * state.max_steps)
        set_interpolation_gamma(model, interpolation_gamma(state.global_step, self.start_step, self.final_step), self.adapter_name)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._jump_config(model) is None:
            return
        step = state.global_step
        if step >= self.start_step and not self._thresholds_ready(model):
            initialize_thresholds(model, self.adapter_name)
        set_interpolation_gamma(model, interpolation_gamma(step, self.start_step, self.final_step), self.adapter_name)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        # ContinualSeq2SeqTrainer.log has already added them (so they reach log_history too)
        if logs is not None and "loss" in logs and "jump/gamma" not in logs and self._jump_config(model) is not None:
            logs.update(threshold_statistics(model, self.adapter_name))

    def _thresholds_ready(self, model) -> bool:
        for _, layer in iter_jumplora_layers(model):
            if layer.is_jump(self.adapter_name):
                return layer.jump_tau_ready[self.adapter_name]
        return True

"""`JumpLoRATrainerCallback`: the γ schedule and the τ initialisation inside any HF `Trainer`."""

from __future__ import annotations

from transformers import TrainerCallback

from .gate import interpolation_gamma
from .layer import iter_jumplora_layers, set_interpolation_gamma
from .thresholds import initialize_thresholds, threshold_statistics
from .zero import gathered_adapters, writing_adapters


class JumpLoRATrainerCallback(TrainerCallback):
    """Drives JumpLoRA over one task.

    By default one `trainer.train()` call is one task: its optimizer steps 0 .. `state.max_steps`. A
    trainer that runs several tasks in one `train()` (as `ContinualSeq2SeqTrainer` does) calls
    `start_task(first_step, num_steps)` at each task's first step. Before each step s of the task
    (counted from its first step) it sets γ = clip((s − S_start)/(S_final − S_start), 0, 1) on every
    JumpLoRA layer, and at the first step ≥ S_start it initialises τ. S_start and S_final are the
    fractions `s_start` and `s_final` of the model's `JumpLoraConfig` times the task's steps. At each
    log it adds γ, the τ range and the current sparsity of ΔW_jump (`jump/...`) to the logs.
    """

    def __init__(self, adapter_name: str = "default"):
        self.adapter_name = adapter_name
        self.first_step = 0
        self.num_steps = 0

    def _jump_config(self, model):
        config = getattr(model, "peft_config", {}).get(self.adapter_name)
        return config if getattr(config, "use_jumprelu", False) else None

    def start_task(self, first_step: int, num_steps: int) -> None:
        self.first_step, self.num_steps = first_step, num_steps

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_task(0, state.max_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        config = self._jump_config(model)
        if config is None:
            return
        step = state.global_step - self.first_step
        start, final = round(config.s_start * self.num_steps), round(config.s_final * self.num_steps)
        if step >= start and not self._thresholds_ready(model):
            with writing_adapters(model):  # every rank sees the whole ΔW; rank 0's τ is kept (ZeRO-3)
                initialize_thresholds(model, self.adapter_name)
        set_interpolation_gamma(model, interpolation_gamma(step, start, final), self.adapter_name)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        # ContinualSeq2SeqTrainer.log has already added them (so they reach log_history too)
        if logs is not None and "loss" in logs and "jump/gamma" not in logs and self._jump_config(model) is not None:
            with gathered_adapters(model):
                logs.update(threshold_statistics(model, self.adapter_name))

    def _thresholds_ready(self, model) -> bool:
        for _, layer in iter_jumplora_layers(model):
            if layer.is_jump(self.adapter_name):
                return layer.jump_tau_ready[self.adapter_name]
        return True

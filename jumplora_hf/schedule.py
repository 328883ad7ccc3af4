"""`JumpLoraSchedule`: the listener that runs the gate's schedule (γ every step, τ at S_start) and logs it."""

from __future__ import annotations

from .callback import ContinualCallback
from .lifecycle import gate_step
from .thresholds import threshold_statistics
from .zero import gathered_adapters


# ----------------------------------------------------------------------------- listeners of the lifecycle
class JumpLoraSchedule(ContinualCallback):
    """The γ schedule and the τ initialisation of every task, and the `jump/*` scalars of its logs."""

    def __init__(self, adapter_name: str = "default"):
        self.adapter_name = adapter_name

    def _config(self, model):
        config = getattr(model, "peft_config", {}).get(self.adapter_name)
        return config if getattr(config, "use_jumprelu", False) else None

    def on_task_step(self, args, state, control, task=None, step=0, model=None, **kwargs):
        config = self._config(model)
        if config is not None:
            gate_step(model, config, step, task.num_steps, self.adapter_name)

    def on_task_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._config(model) is not None and logs is not None:
            with gathered_adapters(model):
                logs.update(threshold_statistics(model, self.adapter_name))

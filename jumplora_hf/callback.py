"""The task events: `ContinualCallback`, a `TrainerCallback` with five more events, and their dispatch.

    on_task_begin        the task's first step: fresh adapters (ΔW = 0), empty optimizer state (or resumed=True)
    on_task_step         before each optimizer step of the task, after its γ / τ are set
    on_task_log          a log is being made: add scalars to `logs`
    on_task_layer_merged during the merge, once per adapted layer (main process): its exact update
    on_task_end          the task's update is merged into the base weights
    on_task_evaluated    every task seen so far is evaluated

`TaskSequence` (sequence.py) announces them inside `ContinualTrainer`; `JumpLoraCallback` (trainer_callback.py)
inside any Trainer. Listeners (the γ/τ schedule, ELLA, O-LoRA, the run directory, progress lines) only receive these
events: the order of the callback list does not matter, and no listener reaches into the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import TrainerCallback

from ._deprecation import moved


class ContinualCallback(TrainerCallback):
    """A `TrainerCallback` that also receives the task events. Override any of them; each gets the Trainer's
    `args, state, control` and keyword arguments: `task` (a `TaskSpan`), `model`, and per event:

    - `on_task_begin`: the adapters are fresh (ΔW = 0) and the optimizer state is empty (`optimizer`); with
      `resumed=True` instead, a restart continues the task from a checkpoint (its adapters and optimizer state
      restored), and `load_task_state` follows with what `task_state` saved there;
    - `on_task_step`: before the forward of each optimizer step, after the gate's γ/τ of that step are set
      (`step` is the step within the task);
    - `on_task_log`: `logs`, the dict about to be logged (add scalars to it; they reach `log_history` and every
      `report_to` backend);
    - `on_task_layer_merged` (main process only): `name` and `layer_update`, the exact `LayerUpdate` one adapted
      layer just received, one call per layer during the merge (the ledger streams them to disk);
    - `on_task_end`: `update`, the `MergedTaskUpdate` just merged into the base weights, and `record` (add what
      the report should say about the task with `record.note(task.index, key=value)`);
    - `on_task_evaluated`: `row` (the accuracies after this task) and `record` (the `ContinualRecord` so far).
    """

    def on_task_begin(self, args, state, control, **kwargs):
        pass

    def on_task_step(self, args, state, control, **kwargs):
        pass

    def on_task_log(self, args, state, control, **kwargs):
        pass

    def on_task_layer_merged(self, args, state, control, **kwargs):
        pass

    def task_state(self) -> dict | None:
        """JSON of what this listener must carry to continue the current task after a restart (saved with every
        Trainer checkpoint); None if nothing."""
        return None

    def load_task_state(self, state: dict, model=None) -> None:
        """Put back what `task_state` returned, after `on_task_begin(resumed=True)` of the resumed task."""

    def on_task_end(self, args, state, control, **kwargs):
        pass

    def on_task_evaluated(self, args, state, control, **kwargs):
        pass


def dispatch(callbacks: Sequence, event: str, args, state, control, **kwargs) -> None:
    """Call `event` on every ContinualCallback of `callbacks` (the Trainer's callback list)."""
    for callback in callbacks:
        if isinstance(callback, ContinualCallback):
            getattr(callback, event)(args, state, control, **kwargs)


# the 0.2 names of what moved in 0.3
__getattr__ = moved(
    __name__,
    {
        "JumpLoRATrainerCallback": ("trainer_callback", "JumpLoraCallback"),
        "attach_jumplora": ("trainer_callback", "attach_jumplora"),
        "finish_task": ("trainer_callback", "finish_task"),
        "check_launch": ("trainer_callback", "check_launch"),
        "tau_parameters": ("trainer_callback", "tau_parameters"),
        "separate_tau_group": ("trainer_callback", "separate_tau_group"),
    },
)

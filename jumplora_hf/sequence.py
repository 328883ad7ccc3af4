"""`TaskSequence`: runs a task sequence inside one `Trainer.train()`, announcing the task events to the listeners.

Task k owns the optimizer steps of its `TaskSpan` (steps.py). At a task's first step the adapters begin afresh
(lifecycle.begin_task); after its last one they are merged (lifecycle.end_task), every task seen so far is evaluated,
and the listeners record it (the run directory, the Hub pushes, progress lines). Trainer checkpoints get, beside
them, what identifies the run and the listeners' state inside the task (resume.py reads it back).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ._deprecation import moved
from .callback import ContinualCallback, dispatch
from .entries import is_main_process
from .files import write_json_atomic
from .layer import iter_jumplora_layers
from .lifecycle import begin_task, end_task
from .steps import TaskSpan, reset_optimizer_state
from .updates import LayerUpdate
from .zero import writing_adapters

CHECKPOINT_STATE_FILE = "jumplora_state.json"  # in each Trainer checkpoint folder, beside trainer_state.json


class TaskSequence(TrainerCallback):
    """Runs the tasks of `spans` inside one `Trainer.train()`: each begins at its first optimizer step and is
    finished once its last step is done and logged (at the next step's start, or at the end of training: the
    Trainer logs a step after `on_step_end`, so the logs of a task's last step still describe its adapters).

    Its inputs are its own: the spans, the seed, what to do once the engine exists (`start`: restore a resumed run's
    state) and at a task's start (`prepare`), how to evaluate (`evaluate(task) -> row`), the record it fills and the
    callbacks it announces the events to; for checkpoints, what identifies the run (`run`, written into every Trainer
    checkpoint with the listeners' `task_state()`), and, when the Trainer resumes inside a task, the listeners' state
    saved there (`resumed_listeners`).

    Resumed inside a task (the Trainer restored the adapters, optimizer, scheduler and RNG of a checkpoint), the task
    does not begin again: its listeners get `on_task_begin(resumed=True)` and then their saved `task_state`. With
    `osf` (method osf), the adapters are PEFT's OSF layers and its operations begin and end the tasks (osf.py).
    """

    def __init__(
        self,
        spans: Sequence[TaskSpan],
        seed: int,
        record,
        evaluate: Callable[[TaskSpan], list],
        callbacks: Callable[[], Sequence],
        accumulate_w_past: bool,
        prepare: Callable[[torch.nn.Module], None] | None = None,
        start: Callable[[torch.nn.Module], None] | None = None,
        run: dict | None = None,
        resumed_listeners: dict | None = None,
        osf=None,
    ):
        self.spans, self.seed, self.record = list(spans), seed, record
        self.osf = osf  # osf.OsfSequence for method osf: its task operations replace the LoRA adapters' ones
        self.evaluate, self.callbacks, self.prepare, self.start = evaluate, callbacks, prepare, start
        self.accumulate_w_past = accumulate_w_past
        self.run, self.resumed_listeners = run, resumed_listeners
        self.current: TaskSpan | None = None

    def _span_at(self, step: int, attribute: str) -> TaskSpan | None:
        return next((s for s in self.spans if getattr(s, attribute) == step), None)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.start is not None:  # the engine exists: under ZeRO-3 the weights are partitioned by now
            self.start(model)
        for _, layer in iter_jumplora_layers(model):  # γ and τ of the adapters a checkpoint may have restored
            for adapter in layer.lora_gate_state:
                layer.sync_gate_mirrors(adapter)
        if self.osf is not None:  # the frozen SVD tensors of a task the checkpoint is inside of or ends (unmerged)
            unfinished = next(
                (
                    s
                    for s in self.spans
                    if s.first_step < state.global_step <= s.end_step and not self.record.has_finished(s.index)
                ),
                None,
            )
            if unfinished is not None:
                self.osf.restore(model, unfinished.index)
        inside = next((s for s in self.spans if s.first_step < state.global_step < s.end_step), None)
        if inside is not None:
            self.current = inside
            callbacks = self.callbacks()
            dispatch(
                callbacks,
                "on_task_begin",
                args,
                state,
                control,
                task=inside,
                model=model,
                optimizer=optimizer,
                resumed=True,
            )
            saved = self.resumed_listeners or {}
            for callback in callbacks:
                if isinstance(callback, ContinualCallback) and type(callback).__name__ in saved:
                    callback.load_task_state(saved[type(callback).__name__], model=model)

    def on_save(self, args, state, control, **kwargs):
        """Next to the Trainer's checkpoint: what identifies the run and the listeners' state inside the task."""
        if not is_main_process():
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            return
        listeners = {}
        for callback in self.callbacks():
            if isinstance(callback, ContinualCallback) and callback.task_state() is not None:
                listeners[type(callback).__name__] = callback.task_state()
        write_json_atomic(
            os.path.join(folder, CHECKPOINT_STATE_FILE),
            {
                "format": 1,
                "global_step": state.global_step,
                "task": self.current.index if self.current is not None else None,
                "total_steps": self.spans[-1].end_step if self.spans else 0,
                "run": self.run,
                "listeners": listeners,
            },
        )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        ending = self._span_at(state.global_step, "end_step")
        if ending is not None and not self.record.has_finished(ending.index):
            self._end(args, state, control, ending, model)
        beginning = self._span_at(state.global_step, "first_step")
        if beginning is not None:
            self._begin(args, state, control, beginning, model, optimizer)
        if self.current is not None:
            step = state.global_step - self.current.first_step
            dispatch(self.callbacks(), "on_task_step", args, state, control, task=self.current, step=step, model=model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        ending = self._span_at(state.global_step, "end_step")
        if ending is not None and not self.record.has_finished(ending.index):
            self._end(args, state, control, ending, model)

    def _begin(self, args, state, control, task: TaskSpan, model, optimizer) -> None:
        self.current = task
        set_seed(self.seed + task.index)  # dropout etc. of a task independent of the tasks before it
        if self.prepare is not None:
            self.prepare(model)
        with writing_adapters(model):
            if self.osf is not None:
                self.osf.begin(model, task.index)
            else:
                begin_task(model, task.index, self.seed)
        reset_optimizer_state(optimizer)  # Adam moments and step count start afresh, as in a new optimizer
        dispatch(self.callbacks(), "on_task_begin", args, state, control, task=task, model=model, optimizer=optimizer)

    def _end(self, args, state, control, task: TaskSpan, model) -> None:
        callbacks = self.callbacks()

        def merged(name: str, layer_update: LayerUpdate) -> None:
            dispatch(
                callbacks,
                "on_task_layer_merged",
                args,
                state,
                control,
                task=task,
                name=name,
                layer_update=layer_update,
                record=self.record,
            )

        with writing_adapters(model):  # A, B and τ whole on every process; the base weights are written in place
            if self.osf is not None:
                update = self.osf.end(model, on_layer=merged, previous=self.record.updates)
            else:
                update = end_task(model, self.accumulate_w_past, on_layer=merged, previous=self.record.updates)
        self.record.add_task(task.name, update)
        if self.osf is not None:
            self.record.note(task.index, **self.osf.notes(model, task.index))
        dispatch(
            self.callbacks(),
            "on_task_end",
            args,
            state,
            control,
            task=task,
            update=update,
            record=self.record,
            model=model,
        )
        row = self.evaluate(task)
        self.record.add_row(task.index, row)
        dispatch(
            self.callbacks(),
            "on_task_evaluated",
            args,
            state,
            control,
            task=task,
            row=row,
            record=self.record,
            model=model,
        )
        self.current = None


# the 0.2 names of what moved in 0.3
__getattr__ = moved(
    __name__,
    {
        "TaskSpan": ("steps", "TaskSpan"),
        "plan_task_spans": ("steps", "plan_task_spans"),
        "TaskBatchSampler": ("steps", "TaskBatchSampler"),
        "task_restarting_schedule": ("steps", "task_restarting_schedule"),
        "reset_optimizer_state": ("steps", "reset_optimizer_state"),
    },
)

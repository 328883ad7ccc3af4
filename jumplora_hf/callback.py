"""JumpLoRA inside anyone's Trainer script (Trainer, Seq2SeqTrainer, trl's SFTTrainer): one task per `train()`.

    model = get_jumplora_model(model, JumpLoraConfig(...))      # or SFTTrainer(..., peft_config=JumpLoraConfig(...))
    trainer = Trainer(model=model, args=args, train_dataset=...)
    attach_jumplora(trainer)                                   # the callback, first in the callback list
    trainer.train()                                            # γ schedule, τ at S_start, jump/* in every log
    finish_task(trainer, merged_dir="out/merged")              # merge; the next train() builds a fresh optimizer

`JumpLoRATrainerCallback` drives the lifecycle of lifecycle.py for the task that one `train()` call trains; a
resumed `train(resume_from_checkpoint=...)` continues it exactly (γ and τ are in the adapter's state dict).
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import TrainerCallback

from .lifecycle import JumpLoRASchedule, MergedTaskUpdate, begin_task, dispatch, end_task
from .sequence import TaskSpan
from .thresholds import thresholds_are_tied, tie_thresholds
from .zero import writing_adapters


def check_launch(args) -> None:
    """Refuse several launched processes that the Trainer does not treat as distributed: each would train alone."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise RuntimeError(
            f"{launched} processes were launched but the Trainer is not distributed, so each would train alone; "
            "on a machine without GPUs pass use_cpu=True (and ddp_backend='gloo')"
        )


def tau_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for n, p in model.named_parameters() if "lora_log_tau" in n and p.requires_grad]
    return list({id(p): p for p in params}.values())


def _innermost(optimizer):
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def separate_tau_group(
    optimizer: torch.optim.Optimizer, taus: list[torch.nn.Parameter], lr: float | None = None
) -> None:
    """Take log τ out of the optimizer's weight-decayed groups (decay would pull log τ to 0, τ to 1).

    With `lr`, τ gets a group of its own at that learning rate (call it before the LR scheduler is built);
    without, τ joins a group that has no weight decay. Before the first step only (the optimizer has no state).
    """
    inner = _innermost(optimizer)
    ids = {id(p) for p in taus}
    if not ids:
        return
    for group in inner.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    free = [g for g in inner.param_groups if g.get("weight_decay", 0.0) == 0.0]
    if lr is None and free:
        free[0]["params"].extend(taus)
    else:
        inner.add_param_group({"params": list(taus), "weight_decay": 0.0, **({"lr": lr} if lr is not None else {})})


class JumpLoRATrainerCallback(TrainerCallback):
    """Drives JumpLoRA over the task one `trainer.train()` call trains (any HF Trainer).

    At the start of a fresh task (step 0) A is drawn from (args.seed, task_index) and B = 0, so the model does not
    depend on how the adapters were injected; a resumed run keeps the checkpoint's adapters. Before each step it sets
    γ, at S_start it initialises τ, and at each log it adds `jump/gamma`, `jump/tau_*` and `jump/sparsity` to the
    logs, to `log_history` and, when the callback runs first (`attach_jumplora`), to every `report_to` backend.
    It also ties shared thresholds for models that PEFT or trl built, takes log τ out of weight decay, and refuses
    multi-process launches that are not distributed and reused optimizers. `finish_task` ends the task.
    """

    def __init__(self, adapter_name: str = "default", task_index: int = 0, task_name: str | None = None):
        self.adapter_name = adapter_name
        self.task_index = task_index
        self.task_name = task_name
        self.task: TaskSpan | None = None
        self.schedule = JumpLoRASchedule(adapter_name)
        self.attached_first = False
        self._warned_reporting = False

    def _config(self, model):
        return getattr(model, "peft_config", {}).get(self.adapter_name)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        check_launch(args)
        if model is not None:
            tie_thresholds(model, self.adapter_name)  # before the optimizer exists

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        check_launch(args)
        config = self._config(model)
        if config is None:
            raise ValueError(f"the model has no adapter {self.adapter_name!r}: build it with get_jumplora_model first")
        if not thresholds_are_tied(model, self.adapter_name):
            raise RuntimeError(
                "the thresholds of a threshold group are not shared, and the optimizer already exists: build the "
                "model with jumplora_hf.get_jumplora_model, or pass the callback to the Trainer when it is created"
            )
        fresh = state.global_step == 0
        if fresh:
            if optimizer is not None and _innermost(optimizer).state:
                raise RuntimeError(
                    "this optimizer already holds state from an earlier train(): call jumplora_hf.finish_task(trainer) "
                    "at the end of each task; it merges the task and makes the next train() build a fresh optimizer"
                )
            with writing_adapters(model):
                begin_task(model, self.task_index, args.seed, self.adapter_name)
        self._exclude_tau_from_decay(args, model, optimizer)
        self.task = TaskSpan(self.task_index, 0, 0, state.max_steps, self.task_name or f"task{self.task_index}")
        dispatch([self.schedule], "on_task_begin", args, state, control, task=self.task, model=model)

    def _exclude_tau_from_decay(self, args, model, optimizer) -> None:
        if optimizer is None or not args.weight_decay:
            return
        taus = {id(p) for p in tau_parameters(model)}
        if all(
            g.get("weight_decay", 0.0) == 0.0
            for g in _innermost(optimizer).param_groups
            if taus & {id(p) for p in g["params"]}
        ):
            return  # attach_jumplora kept τ out of decay when the optimizer was built: a resumed state fits it
        if getattr(args, "deepspeed", None):
            raise ValueError(
                f"weight_decay={args.weight_decay} would also decay log τ, and under DeepSpeed the callback cannot take "
                "it out of the engine's parameter groups: set weight_decay=0, or use ContinualSeq2SeqTrainer, which "
                "builds the optimizer with τ in its own group"
            )
        if _innermost(optimizer).state:
            raise RuntimeError(
                "log τ sits in a weight-decayed parameter group of an optimizer that already holds state (a resumed "
                "run); moving it now would scramble that state. Attach the callback with "
                "jumplora_hf.attach_jumplora(trainer), which builds the optimizer with τ out of weight decay"
            )
        separate_tau_group(optimizer, tau_parameters(model))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.task is not None:
            step = state.global_step - self.task.first_step
            dispatch([self.schedule], "on_task_step", args, state, control, task=self.task, step=step, model=model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or self.task is None:
            return
        added = {}
        dispatch([self.schedule], "on_task_log", args, state, control, task=self.task, logs=added, model=model)
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)  # the Trainer appended the entry before calling on_log
        reporting = [r for r in (args.report_to or []) if r != "none"]
        if reporting and not self.attached_first and not self._warned_reporting:
            self._warned_reporting = True
            warnings.warn(
                f"jump/* reach log_history but not {reporting}: the Trainer calls those before a callback passed in "
                "`callbacks=`. Use jumplora_hf.attach_jumplora(trainer) instead, which puts this callback first",
                stacklevel=2,
            )


def attach_jumplora(trainer, callback: JumpLoRATrainerCallback | None = None) -> JumpLoRATrainerCallback:
    """Insert the JumpLoRA callback first in `trainer`'s callback list (its `jump/*` scalars then reach every
    `report_to` backend) and prepare the model: shared thresholds tied, the targets checked. Call it before
    `train()`; returns the callback."""
    from .model import check_target_modules_of_peft_model

    existing = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, JumpLoRATrainerCallback)]
    callback = callback or (existing[0] if existing else JumpLoRATrainerCallback())
    for cb in existing:
        trainer.callback_handler.remove_callback(cb)
    trainer.callback_handler.callbacks.insert(0, callback)
    callback.attached_first = True
    _keep_tau_out_of_weight_decay(trainer)
    check_launch(trainer.args)
    check_target_modules_of_peft_model(trainer.model, callback.adapter_name)
    tie_thresholds(trainer.model, callback.adapter_name)
    return callback


def _keep_tau_out_of_weight_decay(trainer) -> None:
    """Make the Trainer build its optimizer with log τ in the no-decay group (its public `get_decay_parameter_names`
    hook): a checkpoint's optimizer state then fits the optimizer a resumed run builds, with any optimizer and any
    weight_decay, and under DeepSpeed too. Weight decay would pull log τ to 0, i.e. τ to 1."""
    original = trainer.get_decay_parameter_names
    if getattr(original, "keeps_tau_undecayed", False):
        return

    def get_decay_parameter_names(model) -> list[str]:
        return [name for name in original(model) if "lora_log_tau" not in name]

    get_decay_parameter_names.keeps_tau_undecayed = True
    trainer.get_decay_parameter_names = get_decay_parameter_names


def finish_task(
    trainer, merged_dir: str | None = None, adapter_dir: str | None = None, accumulate_w_past: bool = False
) -> MergedTaskUpdate:
    """End the task a plain Trainer just trained, then prepare the next `train()`:

    1. `adapter_dir`: save the adapter in PEFT format first (after the merge B = 0 and it would be empty);
    2. merge: W ← W + β·ΔW_final in every adapted layer (gathered under ZeRO-3), the adapters' update removed;
    3. `merged_dir`: save the merged model as a plain transformers checkpoint (main process; ZeRO-3 gathered);
    4. drop the trainer's optimizer and LR scheduler, so the next `train()` builds fresh ones, and count the task.
    Every process must call it. Returns the merged update (supports per layer).
    """
    from .model import save_merged_model

    if adapter_dir is not None:
        trainer.save_model(adapter_dir)
    with writing_adapters(trainer.model):
        update = end_task(trainer.model, accumulate_w_past)
    if merged_dir is not None:
        save_merged_model(trainer, merged_dir)
    trainer.optimizer, trainer.lr_scheduler = None, None
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, JumpLoRATrainerCallback):
            callback.task_index += 1
            callback.task = None
    return update

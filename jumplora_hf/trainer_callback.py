"""JumpLoRA inside anyone's Trainer script (Trainer, Seq2SeqTrainer, trl's SFTTrainer): one task per `train()`.

    model = get_jumplora_model(model, jumplora_args.to_peft_config())   # or SFTTrainer(..., peft_config=...)
    trainer = Trainer(model=model, args=args, train_dataset=...)
    attach_jumplora(trainer, jumplora_args)                    # the callback, first in the callback list
    trainer.train()                                            # γ schedule, τ at S_start, ELLA, jump/* in every log
    finish_task(trainer, merged_dir="out/merged")              # merge; the next train() builds a fresh optimizer
    trainer.save_model()                                       # the script's own save: now the merged model

`JumpLoraCallback` drives the lifecycle of lifecycle.py for the task that one `train()` call trains; a resumed
`train(resume_from_checkpoint=...)` continues it exactly (γ and τ are in the adapter's state dict). Across script
runs (one task each), `finish_task` writes what the next task needs (the number of tasks done and, for ELLA, W_past)
into `jumplora_continual.safetensors` beside the merged model, and the next run, which loads that merged model,
picks it up.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import torch
from safetensors import safe_open
from transformers import TrainerCallback

from ._compat import gradient_accumulation_steps, loss_is_scaled_for_ga
from .callback import dispatch
from .ella import EllaRegularizer
from .entries import broadcast_from_main, gather_entries_to_main, is_main_process
from .files import SafetensorsWriter
from .layer import iter_jumplora_layers
from .lifecycle import begin_task, end_task
from .methods import get_method
from .schedule import JumpLoraSchedule
from .steps import TaskSpan
from .thresholds import thresholds_are_tied, tie_thresholds
from .updates import MergedTaskUpdate
from .zero import writing_adapters

logger = logging.getLogger(__name__)
CONTINUAL_STATE_FILE = "jumplora_continual.safetensors"  # beside a merged model: what the next task's run needs


def check_launch(args) -> None:
    """Refuse several launched processes that the Trainer does not treat as distributed (each would train alone), and
    a GPU launch config (accelerate's `use_cpu: false`) on a machine without a GPU (it would silently train on the
    CPU, in its bf16)."""
    if (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() == "false"
        and not getattr(args, "use_cpu", False)
        and not torch.cuda.is_available()
        and not (hasattr(torch, "xpu") and torch.xpu.is_available())
    ):
        raise RuntimeError(
            "launched with a GPU config (accelerate's use_cpu: false, e.g. accelerate_configs/single_gpu.yaml) on a "
            "machine without a GPU: launch with `accelerate launch --cpu ...`, or pass use_cpu=True (--use_cpu true)"
        )
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


class JumpLoraCallback(TrainerCallback):
    """Drives JumpLoRA over the task one `trainer.train()` call trains (any HF Trainer).

    At the start of a fresh task (step 0) A is drawn from (args.seed, task_index) and B = 0, so the model does not
    depend on how the adapters were injected; a resumed run keeps the checkpoint's adapters. Before each step it sets
    γ, at S_start it initialises τ, and at each log it adds `jump/gamma` (and, once τ is set, `jump/tau_*` and
    `jump/sparsity`) to the logs, to `log_history` and, when the callback runs first (`attach_jumplora`), to every
    `report_to` backend. With an ELLA method it adds the ELLA term to the loss (through `attach_jumplora`).

    `method` is a continual method of methods.py (default: the model's gate, jumplora_inclora or inclora); the ELLA
    options are ContinualConfig's. `previous`: the folder of the previous task's merged model, holding
    `jumplora_continual.safetensors` (default: the folder the model was loaded from, if it holds one): the task index
    and ELLA's W_past continue from there. `finish_task` ends the task.
    """

    def __init__(
        self,
        adapter_name: str = "default",
        task_index: int | None = None,
        task_name: str | None = None,
        method: str | None = None,
        ella_lambda=None,
        ella_delta_mode: str = "sparse",
        ella_target_ratio: float = 1.0,
        ella_auto_steps: int | None = None,
        previous: str | None = None,
    ):
        self.adapter_name = adapter_name
        self.task_index = task_index
        self.task_name = task_name
        self.method = get_method(method) if method is not None else None
        if self.method is not None and self.method.osf:
            raise NotImplementedError(
                f"method {method!r} (PEFT's OSF) re-decomposes every adapted weight at each task's start with fixed "
                "shapes for the whole sequence; train the sequence with jumplora_hf.ContinualTrainer (method='osf'), "
                "or in a plain Trainer script use inclora, ella, jumplora_inclora or jumplora_ella"
            )
        if self.method is not None and self.method.olora:
            raise NotImplementedError(
                f"method {method!r} keeps every earlier task's A; in a plain Trainer script use inclora, ella, "
                "jumplora_inclora or jumplora_ella, or train the sequence with jumplora_hf.ContinualTrainer"
            )
        self.ella = None
        if self.method is not None and self.method.ella:
            from .continual_config import _parse_lambdas

            lambdas = _parse_lambdas(ella_lambda)
            if not lambdas:
                raise ValueError(f"method {method!r} needs ella_lambda (one value, one per task, or 'auto')")
            self.ella = EllaRegularizer(lambdas, ella_delta_mode, ella_target_ratio, ella_auto_steps)
        self.previous = previous
        self.task: TaskSpan | None = None
        self.schedule = JumpLoraSchedule(adapter_name)
        self.listeners = [self.schedule] + ([self.ella] if self.ella is not None else [])
        self.attached_first = False
        self.finished = False  # a task was finished (merged) since the last train(): save_model saves it
        self._warned_reporting = False
        self._previous_state: dict | None = None

    @classmethod
    def from_arguments(cls, arguments, **kwargs) -> JumpLoraCallback:
        """The callback of a script's `JumpLoraArguments` (arguments.py)."""
        return cls(
            method=arguments.jumplora_method,
            ella_lambda=arguments.jumplora_ella_lambda,
            ella_delta_mode=arguments.jumplora_ella_delta_mode,
            ella_target_ratio=arguments.jumplora_ella_target_ratio,
            previous=arguments.jumplora_previous_task,
            **kwargs,
        )

    @property
    def uses_ella(self) -> bool:
        return self.ella is not None

    def _config(self, model):
        return getattr(model, "peft_config", {}).get(self.adapter_name)

    def _read_previous(self, model) -> None:
        """The previous task's state (main process reads, every process receives), once."""
        if self._previous_state is not None:
            return
        folder = self.previous
        if folder is None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            folder = getattr(getattr(base, "config", None), "_name_or_path", None)
        path = os.path.join(folder, CONTINUAL_STATE_FILE) if folder else None
        meta = None
        if is_main_process():
            if path and os.path.isfile(path):
                with safe_open(path, framework="pt") as f:
                    meta = json.loads(f.metadata()["jumplora"])
                meta["path"] = path
            elif self.previous is not None:
                meta = {"error": f"{self.previous} holds no {CONTINUAL_STATE_FILE} (finish_task writes it)"}
        from .entries import broadcast_json

        meta = broadcast_json(meta) or {}
        if "error" in meta:
            raise FileNotFoundError(meta["error"])
        self._previous_state = meta

    def on_init_end(self, args, state, control, model=None, **kwargs):
        check_launch(args)
        if model is not None:
            tie_thresholds(model, self.adapter_name)  # before the optimizer exists

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        check_launch(args)
        config = self._config(model)
        if config is None:
            raise ValueError(f"the model has no adapter {self.adapter_name!r}: build it with get_jumplora_model first")
        if self.method is not None and self.method.jump_gate != bool(getattr(config, "use_jumprelu", False)):
            raise ValueError(
                f"method {self.method.name!r} {'needs' if self.method.jump_gate else 'has no'} the JumpReLU gate, but "
                f"the model's adapter has use_jumprelu={getattr(config, 'use_jumprelu', None)}: build it with "
                "jumplora_args.to_peft_config() (the same --jumplora_method)"
            )
        if not thresholds_are_tied(model, self.adapter_name):
            raise RuntimeError(
                "the thresholds of a threshold group are not shared, and the optimizer already exists: build the "
                "model with jumplora_hf.get_jumplora_model, or pass the callback to the Trainer when it is created"
            )
        self._read_previous(model)
        if self.task_index is None:
            self.task_index = int(self._previous_state.get("tasks_done", 0))
        if self.uses_ella:
            self._restore_w_past(model)
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
        self.finished = False
        self.task = TaskSpan(self.task_index, 0, 0, state.max_steps, self.task_name or f"task{self.task_index}")
        dispatch(self.listeners, "on_task_begin", args, state, control, task=self.task, model=model, resumed=not fresh)

    def _restore_w_past(self, model) -> None:
        """W_past of the earlier tasks (from the previous task's file), if this process does not hold it yet."""
        layers = dict(iter_jumplora_layers(model))
        if any(layer.ella_w_past is not None for layer in layers.values()) or "path" not in self._previous_state:
            return
        path, keys = self._previous_state["path"], self._previous_state.get("w_past", {})
        reader = safe_open(path, framework="pt") if is_main_process() else None
        for name, layer in layers.items():
            key = f"w_past/{_module(name)}"
            if key not in keys:
                continue
            whole = broadcast_from_main(reader.get_tensor(key) if reader else None, keys[key], torch.float32)
            layer.restore_w_past(layer.entry_partition().local(whole))

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
                "it out of the engine's parameter groups: set weight_decay=0, or use ContinualTrainer, which "
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
            dispatch(self.listeners, "on_task_step", args, state, control, task=self.task, step=step, model=model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or self.task is None:
            return
        added = {}
        added["loss"] = logs["loss"]  # ELLA splits it into loss_ella and loss_ce
        dispatch(self.listeners, "on_task_log", args, state, control, task=self.task, logs=added, model=model)
        del added["loss"]
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


def attach_jumplora(trainer, arguments=None, callback: JumpLoraCallback | None = None) -> JumpLoraCallback:
    """Insert the JumpLoRA callback (from `arguments`, a `JumpLoraArguments`, or given) first in `trainer`'s callback
    list (its `jump/*` scalars then reach every `report_to` backend) and prepare the trainer: shared thresholds tied,
    the targets checked, log τ kept out of weight decay, the ELLA term added to the loss, and `save_model` after
    `finish_task` saving the merged model. Call it before `train()`; returns the callback."""
    from .adapters import check_target_modules_of_peft_model

    existing = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, JumpLoraCallback)]
    if callback is None:
        callback = JumpLoraCallback.from_arguments(arguments) if arguments is not None else None
    callback = callback or (existing[0] if existing else JumpLoraCallback())
    for cb in existing:
        trainer.callback_handler.remove_callback(cb)
    trainer.callback_handler.callbacks.insert(0, callback)
    callback.attached_first = True
    _keep_tau_out_of_weight_decay(trainer)
    _add_regularizers_to_the_loss(trainer, callback)
    _save_the_finished_task(trainer, callback)
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


def add_regularizer_terms(trainer, loss: torch.Tensor, regularizers, num_items_in_batch) -> torch.Tensor:
    """`loss` plus every regularizer's term for this micro-batch (terms recorded by the adapted layers' forward)."""
    model = trainer.model
    for regularizer in regularizers:
        term = regularizer.loss_term(
            model, loss, gradient_accumulation_steps(trainer), loss_is_scaled_for_ga(trainer, num_items_in_batch)
        )
        if term is not None:
            loss = loss + term
    return loss


def _add_regularizers_to_the_loss(trainer, callback: JumpLoraCallback) -> None:
    """Wrap the Trainer's public `compute_loss` hook: ELLA's term joins the loss of every training step."""
    if callback.ella is None or getattr(trainer.compute_loss, "adds_jumplora_terms", False):
        return
    callback.ella.reduce_mean = lambda t: trainer.accelerator.reduce(t.to(trainer.args.device), "mean").cpu()
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        result = original(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
        )
        if not model.training:
            return result
        loss = result[0] if return_outputs else result
        total = add_regularizer_terms(trainer, loss, [callback.ella], num_items_in_batch)
        return (total, *result[1:]) if return_outputs else total

    compute_loss.adds_jumplora_terms = True
    trainer.compute_loss = compute_loss


def _save_the_finished_task(trainer, callback: JumpLoraCallback) -> None:
    """Wrap the Trainer's public `save_model`: once `finish_task` merged the task, the scripts' usual
    `trainer.save_model()` would save an empty adapter (B = 0); it saves the merged model instead (what the next task
    loads), with the state the next task needs. Checkpoints during training are unchanged."""
    if getattr(trainer.save_model, "saves_the_merged_model", False):
        return
    original = trainer.save_model

    def save_model(output_dir: str | None = None, _internal_call: bool = False):
        if _internal_call or not callback.finished:
            return original(output_dir, _internal_call=_internal_call)
        folder = output_dir or trainer.args.output_dir
        save_finished_task(trainer, callback, folder)
        if is_main_process():
            logger.warning(
                "save_model after finish_task: saved the merged model (task %d done) to %s",
                callback.task_index,
                folder,
            )

    save_model.saves_the_merged_model = True
    trainer.save_model = save_model


def _module(layer_name: str) -> str:
    from .ledger import module_name

    return module_name(layer_name)


def save_finished_task(trainer, callback: JumpLoraCallback, folder: str) -> None:
    """The merged model (plain transformers) and `jumplora_continual.safetensors`: the tasks done and W_past, for the
    next task. Every process must call it."""
    from .adapters import save_merged_model

    save_merged_model(trainer, folder)
    layers = dict(iter_jumplora_layers(trainer.model))
    pasts = {name: layer for name, layer in layers.items() if layer.ella_w_past is not None}
    specs = [
        (f"w_past/{_module(n)}", torch.float32, (layer.out_features, layer.in_features)) for n, layer in pasts.items()
    ]
    meta = {
        "format": 1,
        "tasks_done": callback.task_index,
        "method": callback.method.name if callback.method else None,
        "ella_lambdas": {str(k): v for k, v in (callback.ella.task_lambdas if callback.ella else {}).items()},
        "w_past": {key: list(shape) for key, _, shape in specs},
    }
    writer = None
    if is_main_process():
        writer = SafetensorsWriter(os.path.join(folder, CONTINUAL_STATE_FILE), specs)
        writer.set_metadata({"jumplora": json.dumps(meta)})
    for name, layer in pasts.items():
        whole = gather_entries_to_main(layer.ella_w_past, layer.entry_partition())
        if writer is not None:
            writer.add(f"w_past/{_module(name)}", whole)
    if writer is not None:
        writer.close()


def finish_task(
    trainer, merged_dir: str | None = None, adapter_dir: str | None = None, accumulate_w_past: bool = False
) -> MergedTaskUpdate:
    """End the task a plain Trainer just trained, then prepare the next `train()`:

    1. `adapter_dir`: save the task's adapter in PEFT format first (after the merge B = 0 and it would be empty);
    2. merge: W ← W + β·ΔW_final in every adapted layer (each process its own entries under ZeRO-3), the adapters'
       update removed; with ELLA (or `accumulate_w_past`), W_past ← W_past + ΔW_final;
    3. `merged_dir`: save the merged model as a plain transformers checkpoint, with `jumplora_continual.safetensors`
       (the tasks done and W_past) that the next task's run picks up when it loads that model;
    4. drop the trainer's optimizer and LR scheduler, so the next `train()` builds fresh ones, and count the task.
    Afterwards `trainer.save_model(dir)` saves the merged model too. Every process must call it. Returns the merged
    update (supports per layer).
    """
    callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, JumpLoraCallback)]
    callback = callbacks[0] if callbacks else None
    if adapter_dir is not None:
        trainer.save_model(adapter_dir)
    w_past = accumulate_w_past or (callback is not None and callback.uses_ella)
    with writing_adapters(trainer.model):
        update = end_task(trainer.model, w_past)
    if callback is not None:
        dispatch(
            callback.listeners, "on_task_end", trainer.args, trainer.state, trainer.control,
            task=callback.task, update=update, model=trainer.model,
        )  # fmt: skip
        callback.task_index = (callback.task_index or 0) + 1
        callback.task = None
        callback.finished = True
    if merged_dir is not None:
        if callback is not None:
            save_finished_task(trainer, callback, merged_dir)
        else:
            from .adapters import save_merged_model

            save_merged_model(trainer, merged_dir)
    trainer.optimizer, trainer.lr_scheduler = None, None
    return update

"""`ContinualTrainer`: a whole task sequence with one Trainer, one optimizer and one engine (Algorithm 1).

The trainer finds the task boundaries (`TaskSequence`, lifecycle.py) and otherwise only overrides public Trainer
hooks: the per-task batches and LR schedule, the sequence's step count, the ELLA term of the loss, the optimizer's
τ group, the task fields of the logs, and generation for evaluation. What happens to the adapters at a boundary is
lifecycle.py's; what is written to the run dir is state.py's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from datasets import concatenate_datasets
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import Seq2SeqTrainer
from transformers.integrations import is_deepspeed_zero3_enabled

from ._compat import (
    generation_kwargs,
    gradient_accumulation_steps,
    loss_is_scaled_for_ga,
    prepare_inputs,
    start_training_at_step,
)
from ._deprecation import moved
from .adapters import get_jumplora_model, save_merged_model
from .callback import dispatch
from .card import model_source
from .config import JumpLoraConfig
from .continual_config import ContinualConfig
from .data import ContinualDataCollator, ContinualTask, EncodedTask, encode_task
from .ella import EllaRegularizer
from .methods import get_method
from .olora import OLoraRegularizer
from .osf import OsfSequence, allocate_osf, iter_adapted_layers, iter_osf_layers
from .record import ContinualRecord
from .resume import find_resume_point
from .run_directory import RunDirectory
from .schedule import JumpLoraSchedule
from .sequence import TaskSequence
from .state import load_run_state, restore_run_tensors
from .steps import TaskBatchSampler, TaskSpan, plan_task_spans, task_restarting_schedule
from .thresholds import tie_thresholds
from .trainer_callback import check_launch, separate_tau_group, tau_parameters
from .zero import register_adapted_weights_as_external

logger = logging.getLogger(__name__)


class ContinualTrainer(Seq2SeqTrainer):
    """Trains a sequence of tasks with one Trainer, one Accelerator and one set of adapters (Algorithm 1).

    `train_continual(tasks)` trains the unfinished tasks in one `train()` call. Per task: fresh adapters and an
    empty optimizer state, the γ/τ schedule, the (sparse) merge, then every task seen so far is evaluated by
    generation and the run dir gets the task's ledger file, the resume state and `continual_metrics.json`.
    `hub_api` (optional) replaces huggingface_hub's `HfApi` for `push_to_hub` (tests inject a recorder).
    """

    def __init__(
        self,
        model,
        args: ContinualConfig,
        processing_class,
        peft_config: JumpLoraConfig | None = None,
        hub_api=None,
        **kwargs,
    ):
        if not isinstance(args, ContinualConfig):
            raise TypeError("args must be a ContinualConfig")
        if processing_class is None:
            raise ValueError("pass the tokenizer as processing_class: tasks are tokenised and decoded with it")
        if kwargs.get("optimizers", (None, None)) != (None, None):
            raise ValueError("optimizers cannot be passed: every task starts a fresh optimizer state built from args")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        model = (
            self._wrap_with_osf(model, peft_config)
            if args.uses_osf
            else self._wrap_with_adapters(model, args, peft_config)
        )
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        kwargs.setdefault(
            "data_collator", ContinualDataCollator(processing_class.pad_token_id, self.is_encoder_decoder)
        )
        method = get_method(args.method)
        self.ella = None
        if method.ella:
            self.ella = EllaRegularizer(
                args.ella_lambda,
                args.ella_delta_mode,
                args.ella_target_ratio,
                args.ella_auto_steps,
                reduce_mean=lambda t: self.accelerator.reduce(t.to(self.args.device), "mean").cpu(),
            )
        self.olora = OLoraRegularizer(args.olora_lambda1, args.olora_lambda2) if method.olora else None
        # the listeners whose terms join the loss (`loss_term`), and the γ/τ schedule
        self.regularizers = [r for r in (self.ella, self.olora) if r is not None]
        listeners = ([JumpLoraSchedule()] if method.jump_gate else []) + self.regularizers
        kwargs["callbacks"] = [*listeners, *(kwargs.get("callbacks") or [])]
        self.hub_api = hub_api
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "ContinualTrainer does not support FSDP: launch with DDP (accelerate_configs/multi_gpu.yaml) "
                "or DeepSpeed ZeRO (accelerate_configs/zero2.yaml, zero3.yaml)"
            )
        if is_deepspeed_zero3_enabled():
            register_adapted_weights_as_external(self.model)
        check_launch(self.args)
        self.task_spans: list[TaskSpan] = []
        self._first_step = 0
        self.task_sequence: TaskSequence | None = None
        self.record: ContinualRecord | None = None
        self._osf_tasks: int | None = None  # method osf: the sequence length its fixed shapes were allocated for

    @staticmethod
    def _wrap_with_adapters(model, args: ContinualConfig, peft_config: JumpLoraConfig | None) -> PeftModel:
        gate = get_method(args.method).jump_gate
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError("model already has adapters; pass either a PeftModel or peft_config, not both")
            config = model.peft_config.get("default")
            if not isinstance(config, JumpLoraConfig) or config.use_jumprelu != gate:
                raise ValueError(
                    f"method {args.method!r} needs a JumpLoraConfig adapter named 'default' with use_jumprelu={gate}; "
                    "pass the base model and peft_config instead"
                )
            tie_thresholds(model)
            return model
        config = (peft_config if peft_config is not None else JumpLoraConfig()).with_gate(gate, args.method)
        return get_jumplora_model(model, config)

    @staticmethod
    def _wrap_with_osf(model, peft_config) -> PeftModel:
        """Method osf: PEFT's own OSF layers on the targets the other methods adapt (`peft_config`'s target_modules:
        a JumpLoraConfig's, whose other fields do not apply, or an OSFConfig's; default: PEFT's LoRA targets of the
        model type). Their shapes are set for the sequence by `train_continual` (osf.allocate_osf)."""
        from peft import OSFConfig, get_peft_model

        from .adapters import check_target_modules
        from .zero import gathered

        if isinstance(model, PeftModel):
            raise ValueError(
                "method 'osf' wraps the base model with PEFT's OSFConfig itself (its shapes are fixed for the "
                "sequence); pass the base model, and the targets as peft_config"
            )
        if isinstance(peft_config, JumpLoraConfig) and peft_config.use_jumprelu and not peft_config.gate_from_method:
            raise ValueError(
                "method 'osf' has no JumpReLU gate: JumpLoraConfig(use_jumprelu=True) conflicts with it; leave "
                "use_jumprelu unset (only the config's target_modules are used)"
            )
        if peft_config is not None and not isinstance(peft_config, (JumpLoraConfig, OSFConfig)):
            raise TypeError(
                f"method 'osf' takes its targets from a JumpLoraConfig or OSFConfig, not {type(peft_config)}"
            )
        targets = JumpLoraConfig(target_modules=getattr(peft_config, "target_modules", None))
        matched = check_target_modules(model, targets)
        targets = getattr(peft_config, "target_modules", None) or sorted({n.rsplit(".", 1)[-1] for n in matched})
        modules = dict(model.named_modules())
        # PEFT decomposes each weight when it wraps it: under ZeRO-3 a model built partitioned is gathered here (the
        # shapes are placeholders, replaced by allocate_osf; effective_rank 1 is valid for any weight)
        with gathered([modules[n].weight for n in matched]):
            with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                wrapped = get_peft_model(model, OSFConfig(target_modules=targets, effective_rank=1))
        sequence = OsfSequence(0.5, 1)
        for _, layer in iter_osf_layers(wrapped):
            sequence.clear(layer)  # exactly no update until a task begins
        return wrapped

    @property
    def task_index(self) -> int:
        """The index of the task being trained (or last trained)."""
        if self.task_sequence is not None and self.task_sequence.current is not None:
            return self.task_sequence.current.index
        return max(len(self.record.tasks) - 1, 0) if self.record else 0

    # ----------------------------------------------------------------- the task sequence
    def train_continual(
        self,
        tasks: Sequence[ContinualTask],
        single_task_accuracies: Sequence[float] | None = None,
        resume_from_checkpoint: bool | str | None = None,
    ) -> dict:
        """Run `tasks` in order; returns (and writes to `output_dir/continual_metrics.json`) the report.

        The tasks are trained in one `train()` call: task k owns a contiguous range of the sequence's optimizer steps
        (`sequence.plan_task_spans`), so one optimizer, one LR scheduler object and one engine (DDP or DeepSpeed)
        serve the whole sequence, and the Trainer's checkpoints are numbered over it. A run dir of this run is
        resumed (resume.py): from the latest Trainer checkpoint after its last finished task (None or True: found in
        `output_dir`; a path: that one; False: none), else from the first unfinished task's start. A run dir of a run
        with other settings is refused, naming them.
        """
        encoded = self._validate_and_encode(tasks, single_task_accuracies)
        names = [t.name for t in encoded]
        run = self.run_fingerprint(encoded)
        saved = load_run_state(self.args.output_dir, self.args.method, names, run)  # every process; the main one reads
        record = saved.record if saved else ContinualRecord(self.args.method, names, self.args.single_task_baselines)
        record.single_task_accuracies = list(single_task_accuracies) if single_task_accuracies is not None else None
        record.metric_names = [t.metric_name for t in encoded]
        self.record = record
        finished = len(record.tasks)
        # single-task baselines train every task from the base model: a resumed one restores no merged weights
        restore_weights = not self.args.single_task_baselines
        publisher = self._hub_publisher()
        if publisher is not None:
            publisher.retry_pending(finished)  # pushes a stopped run staged but did not upload, in task order
        spans = plan_task_spans(
            [len(t.train) for t in encoded],
            0,
            self.args.per_device_train_batch_size,
            self.args.world_size,
            self.args.gradient_accumulation_steps,
            self.args.num_train_epochs,
            self.args.max_steps,
            names=names,
        )
        osf = None
        if self.args.uses_osf:
            if self._osf_tasks not in (None, len(encoded)):
                raise ValueError(
                    f"this trainer's OSF shapes were fixed for {self._osf_tasks} tasks (the engine exists); train "
                    f"{len(encoded)} tasks with a new ContinualTrainer"
                )
            if self._osf_tasks is None:
                allocate_osf(self.model, self.args.osf_max_preserved_fraction, len(encoded))
                self._osf_tasks = len(encoded)
            osf = OsfSequence(self.args.osf_max_preserved_fraction, len(encoded), self.args.single_task_baselines)
        if finished == len(encoded):
            self._say_resumed(saved, spans, None)
            restore_run_tensors(self.model, saved, weights=restore_weights)
            if publisher is not None:
                publisher.wait()
            return record.report()
        boundary = spans[finished - 1].end_step if finished else 0
        point = find_resume_point(self.args.output_dir, resume_from_checkpoint, boundary, spans[-1].end_step, run)
        if saved or point.checkpoint:
            self._say_resumed(saved, spans, point)
        base_weights: dict[str, torch.Tensor] = {}

        def start(model) -> None:
            if saved:
                restore_run_tensors(model, saved, weights=restore_weights)
            if point.checkpoint is None and point.step > 0:
                start_training_at_step(self, point.step)  # the sampler leaves out the steps before it
            if self.args.single_task_baselines:  # this process's entries of the base weights
                base_weights.update({n: layer.merged_weight().clone() for n, layer in iter_adapted_layers(model)})

        def back_to_base(model) -> None:
            for name, layer in iter_adapted_layers(model):
                layer.restore_merged_weight(base_weights[name])
                layer.restore_w_past(None)
                layer.olora_past_A = None

        self.task_spans = spans
        self._first_step = 0 if point.checkpoint else point.step  # a checkpoint's steps are skipped by the Trainer
        self.train_dataset = concatenate_datasets([t.train for t in encoded])
        self.optimizer, self.lr_scheduler = None, None

        def evaluate_row(task: TaskSpan) -> list[float | None]:
            last = task.index == len(spans) - 1
            only_this = self.args.single_task_baselines or (self.args.eval_seen_tasks == "at_end" and not last)
            seen = [task.index] if only_this else range(task.index + 1)
            return [self.evaluate_generation(encoded[j]) if j in seen else None for j in range(task.index + 1)]

        self.task_sequence = TaskSequence(
            self.task_spans,
            self.args.seed,
            record,
            evaluate_row,
            lambda: self.callback_handler.callbacks,
            accumulate_w_past=self.args.uses_ella,
            prepare=back_to_base if self.args.single_task_baselines else None,
            start=start,
            run=run,
            resumed_listeners=point.listeners,
            osf=osf,
        )
        fingerprints = {t.name: {"data_fingerprint": run["fields"]["tasks"][t.name]["train"]} for t in encoded}
        run_dir = RunDirectory(
            self.args.output_dir,
            fingerprints,
            write_ledger=self.args.ledger and not self.args.single_task_baselines,
            ledger=saved.ledger if saved else (),
            run_config=self.run_config(),
            publisher=publisher,
            run=run,
        )
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, (TaskSequence, RunDirectory)):
                self.remove_callback(callback)
        # first in the list: a task has begun before any other callback's on_step_begin of its first step
        self.callback_handler.callbacks.insert(0, self.task_sequence)
        self.add_callback(run_dir)
        self.train(resume_from_checkpoint=point.checkpoint)
        if publisher is not None:
            publisher.wait()  # the uploads ran beside the training; failures are logged and stay staged
        return record.report()

    def _say_resumed(self, saved, spans: list[TaskSpan], point) -> None:
        """One line on the console (main process): what a restart continues, and from where."""
        if not self.is_world_process_zero():
            return
        done = len(saved.record.tasks) if saved else 0
        head = f"resuming {self.args.output_dir}: {done} of {len(spans)} task(s) finished"
        world = (saved.run or {}).get("world_size") if saved else None
        if world is not None and world != self.args.world_size:
            head += (
                f"; it ran with {world} process(es), this run has {self.args.world_size} (the same global batch: the "
                "result differs from an uninterrupted run by float rounding only)"
            )
        if point is None:
            logger.warning("%s: nothing left to train, the report is the finished run's", head)
            return
        task = next(s for s in spans if s.first_step <= point.step < s.end_step or s.end_step == point.step)
        if point.checkpoint is not None:
            where = (
                f"task {task.index + 1} ({task.name}) at its step {point.step - task.first_step} of {task.num_steps}"
            )
            logger.warning("%s; continuing %s from %s", head, where, point.checkpoint)
        else:
            logger.warning("%s; task %d (%s) starts from its first step", head, done + 1, spans[done].name)
        for note in point.notes:
            logger.warning("  %s", note)

    def _validate_and_encode(self, tasks, single_task_accuracies) -> list[EncodedTask]:
        return encode_tasks(tasks, self.processing_class, self.is_encoder_decoder, self.args, single_task_accuracies)

    def _hub_publisher(self):
        if not self.args.push_to_hub or self.args.single_task_baselines:
            return None
        from .hub import HubPublisher

        return HubPublisher.from_trainer(self)

    def run_fingerprint(self, encoded: Sequence[EncodedTask]) -> dict:
        """What determines the run's result (`fields`: the model, method and its options, the adapters, the
        optimisation, the steps, the global batch, the seed, each task's data), and the world size. A restart must
        match `fields` (state.run_differences); settings that change no result (eval batch, logging, saving) may differ."""
        args, config = self.args, self.model.peft_config["default"]
        base = self.model.get_base_model().config
        model_config = {k: v for k, v in base.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        training = {key: getattr(args, key, None) for key in RESULT_FIELDS}
        training["global_batch"] = (
            args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        )
        adapters = {key: getattr(config, key, None) for key in ADAPTER_FIELDS}
        adapters["target_modules"] = sorted(config.target_modules) if config.target_modules else None
        if args.uses_osf:  # only for osf: the fingerprints of the other methods' runs stay as they were
            adapters["osf_max_preserved_fraction"] = args.osf_max_preserved_fraction
            adapters["osf_num_tasks"] = len(encoded)  # the budget of every task depends on n
        fields = {
            "model": getattr(base, "_name_or_path", None),
            "model_config_sha256": hashlib.sha256(
                json.dumps(model_config, sort_keys=True, default=str).encode()
            ).hexdigest(),
            "training": training,
            "adapters": adapters,
            "tasks": {t.name: {"train": _fingerprint(t), "eval": _eval_fingerprint(t)} for t in encoded},
        }
        return {"fields": json.loads(json.dumps(fields, default=str)), "world_size": args.world_size}

    def run_config(self) -> dict:
        """What the run dir's run_config.json (and the model card) say about the run."""
        args, config = self.args, self.model.peft_config["default"]
        base = getattr(self.model.get_base_model().config, "_name_or_path", None)
        training = {
            k: getattr(args, k)
            for k in (
                "method",
                "learning_rate",
                "lr_scheduler_type",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "num_train_epochs",
                "max_steps",
                "seed",
                "max_source_length",
                "ella_lambda",
                "ella_delta_mode",
                "tau_lr_multiplier",
            )
        }
        training["world_size"] = args.world_size
        if args.uses_osf:
            training["osf_max_preserved_fraction"] = args.osf_max_preserved_fraction
            adapters = {
                "peft_type": "OSF",
                "target_modules": sorted(config.target_modules),
                "osf_max_preserved_fraction": args.osf_max_preserved_fraction,
            }
        else:
            adapters = self._lora_run_config(config)
        from . import __version__

        return {
            "base_model": base,
            # a local folder is no Hub id: the card names it but leaves it out of the metadata the Hub validates
            "base_model_is_local": bool(base) and os.path.isdir(base),
            "base_model_source": model_source(base),
            "is_encoder_decoder": bool(getattr(self.model.get_base_model().config, "is_encoder_decoder", False)),
            "package_version": __version__,
            "training": training,
            "adapters": adapters,
        }

    @staticmethod
    def _lora_run_config(config) -> dict:
        return {
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "target_modules": sorted(config.target_modules),
            "threshold_mode": config.threshold_mode,
            "s_start": config.s_start,
            "s_final": config.s_final,
            "jump_bandwidth": config.jump_bandwidth,
        }

    def push_to_hub(
        self,
        commit_message: str | None = None,
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> str | None:
        """Publish the run (merged model, card, metrics, plots, ledger) in one commit; see jumplora_hf.hub. Every
        process must call it (the merged model is gathered under ZeRO-3). Returns the commit id (main process)."""
        from .hub import HubPublisher

        publisher = HubPublisher.from_trainer(self)
        if token is not None:
            publisher.token = token
        return publisher.push_final(self.continual_report())

    def evaluate_generation(self, task: EncodedTask) -> float:
        """The task's metric (exact match by default) on greedy generations for its eval prompts."""
        output = self.predict(task.prompts, metric_key_prefix=f"eval_{task.name}", max_new_tokens=task.max_new_tokens)
        # Seq2SeqTrainer.predict gathers without dropping the samples that accelerate repeats (from the start
        # of the dataset) to even out the last batch across ranks: the first len(prompts) rows are the prompts.
        predictions = output.predictions[: len(task.answers)]
        tokens = np.where(predictions < 0, self.processing_class.pad_token_id, predictions)
        return task.evaluate(self.processing_class.batch_decode(tokens, skip_special_tokens=True))

    def continual_report(self) -> dict:
        return self.record.report() if self.record else {}

    def save_merged_model(self, output_dir: str) -> None:
        """The base model with every finished task merged in, as a plain transformers checkpoint (+ tokenizer);
        see `model.save_merged_model`. Call it on every process."""
        save_merged_model(self, output_dir)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo through the run's publisher (its client is `hub_api`, or huggingface_hub's HfApi)."""
        if not self.is_world_process_zero():
            return
        from .hub import HubPublisher

        self.hub_model_id = HubPublisher.from_trainer(self).create_repo()
        self.push_in_progress = None

    # ----------------------------------------------------------------- Trainer hooks
    def get_train_dataloader(self) -> DataLoader:
        if not self.task_spans:
            return super().get_train_dataloader()
        sampler = TaskBatchSampler(
            self.task_spans,
            self.args.per_device_train_batch_size,
            self.args.world_size,
            self.args.gradient_accumulation_steps,
            self.args.seed,
            start_step=self._first_step,
        )
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)  # deals the batches out to the processes in turn

    def set_initial_training_values(self, args, dataloader):
        """The run's step count is the task spans' total (`max_steps` and `num_train_epochs` are per task)."""
        values = list(super().set_initial_training_values(args, dataloader))
        if self.task_spans:
            steps = self.task_spans[-1].end_step
            values[0], values[1], values[6] = 1, steps, steps  # epochs, update steps per epoch, max steps
            values[3] = steps * values[4]  # training samples = steps × total batch size
        return tuple(values)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with log τ in its own group: lr × tau_lr_multiplier, no weight decay."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            separate_tau_group(
                optimizer, tau_parameters(model or self.model), self.args.learning_rate * self.args.tau_lr_multiplier
            )
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.task_spans:
            self.lr_scheduler = task_restarting_schedule(
                self.optimizer if optimizer is None else optimizer,
                self.task_spans,
                self.args.lr_scheduler_type,
                self.args.get_warmup_steps,
                self.args.lr_scheduler_kwargs,
            )
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
        )
        if not self.regularizers or not model.training:
            return result
        loss = result[0] if return_outputs else result
        total = loss
        for regularizer in self.regularizers:
            term = regularizer.loss_term(
                self.model, loss, gradient_accumulation_steps(self), loss_is_scaled_for_ga(self, num_items_in_batch)
            )
            total = total if term is None else total + term
        return (total, result[1]) if return_outputs else total

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        task = self.task_sequence.current if self.task_sequence is not None else None
        if "loss" not in logs or task is None:
            return super().log(logs, *args, **kwargs)
        step = self.state.global_step - task.first_step
        logs["task"], logs["task_step"] = task.index, step
        dispatch(
            self.callback_handler.callbacks,
            "on_task_log",
            self.args,
            self.state,
            self.control,
            task=task,
            logs=logs,
            model=self.model,
        )
        run_epoch = self.state.epoch  # the logged epoch is the task's own (each task is its own run of epochs)
        self.state.epoch = round(step / max(task.steps_per_epoch, 1), 4)
        try:
            super().log(logs, *args, **kwargs)
        finally:
            self.state.epoch = run_epoch

    def get_decay_parameter_names(self, model) -> list[str]:
        # weight decay would pull log τ towards 0, i.e. τ towards 1, whatever the task needs
        return [name for name in super().get_decay_parameter_names(model) if "lora_log_tau" not in name]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if "labels" in inputs or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        inputs = prepare_inputs(self, inputs)
        kwargs = {**generation_kwargs(self), **gen_kwargs}
        kwargs.pop("max_length", None)
        kwargs.update(
            do_sample=False,
            num_beams=1,
            pad_token_id=self.processing_class.pad_token_id,
            eos_token_id=self.processing_class.eos_token_id,
            synced_gpus=is_deepspeed_zero3_enabled(),
        )
        with torch.no_grad():
            generated = self.model.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs
            )
        if not self.is_encoder_decoder:
            generated = generated[:, inputs["input_ids"].shape[1] :]  # the continuation after the prompt
        return None, generated, None


def encode_tasks(
    tasks: Sequence[ContinualTask],
    tokenizer,
    is_encoder_decoder: bool,
    args: ContinualConfig,
    single_task_accuracies: Sequence[float] | None = None,
) -> list[EncodedTask]:
    """Check a task list against `args` and tokenise it: every error a run would meet in its data is raised here,
    before any training (the recipes call it before the Trainer exists)."""
    if not tasks:
        raise ValueError("tasks is empty; pass at least one ContinualTask")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    lambdas = args.ella_lambda
    if args.uses_ella and lambdas != "auto" and len(lambdas) not in (1, len(tasks)):
        raise ValueError(
            f"ella_lambda has {len(lambdas)} values for {len(tasks)} tasks; give one value or one per task"
        )
    if single_task_accuracies is not None and len(single_task_accuracies) != len(tasks):
        raise ValueError(f"{len(single_task_accuracies)} single-task accuracies for {len(tasks)} tasks")
    return [
        encode_task(t, tokenizer, is_encoder_decoder, args.max_source_length, args.max_target_length) for t in tasks
    ]


# the training arguments that change a run's result (the rest, such as eval batch size or logging, may differ)
RESULT_FIELDS = (
    "method",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "weight_decay",
    "optim",
    "optim_args",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "seed",
    "data_seed",
    "max_source_length",
    "max_target_length",
    "ella_lambda",
    "ella_delta_mode",
    "ella_target_ratio",
    "ella_auto_steps",
    "tau_lr_multiplier",
    "olora_lambda1",
    "olora_lambda2",
    "bf16",
    "fp16",
    "single_task_baselines",
    "label_smoothing_factor",
)
ADAPTER_FIELDS = (
    "r",
    "lora_alpha",
    "threshold_mode",
    "s_start",
    "s_final",
    "jump_bandwidth",
    "jump_fused",
    "use_jumprelu",
)


def _eval_fingerprint(task: EncodedTask) -> str:
    """SHA-256 of a task's tokenised evaluation prompts and answers."""
    digest = hashlib.sha256()
    for row, answer in zip(task.prompts, task.answers):
        digest.update(json.dumps([row["input_ids"], answer]).encode())
    return digest.hexdigest()


def _fingerprint(task: EncodedTask) -> str:
    """SHA-256 of a task's tokenised training examples: identifies the data a ledger entry was trained on."""
    digest = hashlib.sha256()
    for row in task.train:
        digest.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return digest.hexdigest()


# the 0.2 names of what moved in 0.3
__getattr__ = moved(__name__, {"ContinualSeq2SeqTrainer": ("continual_trainer", "ContinualTrainer")})

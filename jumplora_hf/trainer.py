"""`ContinualSeq2SeqConfig` + `ContinualSeq2SeqTrainer`: a whole task sequence with one Trainer."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import DistributedType
from peft import PeftModel
from datasets import concatenate_datasets
from torch.utils.data import DataLoader
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from . import metrics
from .callback import JumpLoRATrainerCallback
from .config import JumpLoraConfig
from .data import ContinualDataCollator, ContinualTask, EncodedTask, encode_task, exact_match_accuracy
from .ella import ELLA_DELTA_MODES, pop_ella_penalty, record_ella_terms
from .lifecycle import MergedTaskUpdate, begin_task, end_task, merged_state, restore_merged_state
from .model import get_jumplora_model
from .sequence import TaskBatchSampler, TaskSpan, plan_task_spans, reset_optimizer_state, task_restarting_schedule
from .thresholds import threshold_statistics
from .zero import gathered_adapters, register_adapted_weights_as_external, writing_adapters

logger = logging.getLogger(__name__)

# method -> (JumpReLU gate on the adapters, ELLA regulariser)
METHODS = {
    "inclora": (False, False),
    "ella": (False, True),
    "jumplora_inclora": (True, False),
    "jumplora_ella": (True, True),
}
METRICS_FILE = "continual_metrics.json"
SEQUENCE_STATE_FILE = "continual_state.pt"  # what a restart with the same output_dir continues from


@dataclass
class ContinualSeq2SeqConfig(Seq2SeqTrainingArguments):
    """Training arguments of a continual run; the usual `Seq2SeqTrainingArguments` apply to every task."""

    method: str = field(
        default="jumplora_inclora",
        metadata={"help": f"Continual-learning method, one of {sorted(METHODS)}.", "choices": sorted(METHODS)},
    )
    ella_lambda: list[float] | None = field(
        default=None,
        metadata={
            "help": (
                "λ of the ELLA term for the ella methods: one value for every task or one per task (the paper "
                "uses 0 then 3e4 on Standard CL, 5e5 on Long Sequence; its Appendix Table 7)."
            )
        },
    )
    ella_delta_mode: str = field(
        default="sparse",
        metadata={
            "help": "ΔW_x in the ELLA term for jumplora_ella: 'sparse' (ΔW_jump) or 'interpolated' (ΔW_interp).",
            "choices": list(ELLA_DELTA_MODES),
        },
    )
    max_source_length: int = field(default=512, metadata={"help": "Prompt length in tokens; only the input text is truncated."})
    max_target_length: int | None = field(
        default=None,
        metadata={"help": "Answer length in tokens with EOS (the generation budget); default: the longest option + 1."},
    )
    single_task_baselines: bool = field(
        default=False,
        metadata={
            "help": (
                "Train every task alone from the base model (the merged weights are reset before each task) and "
                "evaluate it on itself: the single-task accuracies a0 that forward transfer (FWT) compares with."
            )
        },
    )
    predict_with_generate: bool = field(default=True, metadata={"help": "Evaluation generates answers (required)."})
    save_strategy: str = field(default="no", metadata={"help": "Mid-task checkpoints; the task sequence writes its own metrics."})

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {sorted(METHODS)}")
        if self.ella_delta_mode not in ELLA_DELTA_MODES:
            raise ValueError(f"unknown ella_delta_mode {self.ella_delta_mode!r}; use one of {ELLA_DELTA_MODES}")
        if self.uses_ella and not self.ella_lambda:
            raise ValueError(
                f"method {self.method!r} needs ella_lambda (one value or one per task), e.g. 3e4 as in the paper's "
                "Standard CL runs"
            )
        if self.ella_lambda and any(v < 0 for v in self.ella_lambda):
            raise ValueError(f"ella_lambda must be non-negative, got {self.ella_lambda}")
        if not self.predict_with_generate:
            raise ValueError("predict_with_generate must stay True: tasks are evaluated by generation + exact match")

    @property
    def uses_jumprelu(self) -> bool:
        return METHODS[self.method][0]

    @property
    def uses_ella(self) -> bool:
        return METHODS[self.method][1]

    def lambda_for_task(self, task_index: int) -> float:
        if not self.uses_ella:
            return 0.0
        return self.ella_lambda[0] if len(self.ella_lambda) == 1 else self.ella_lambda[task_index]


class ContinualSeq2SeqTrainer(Seq2SeqTrainer):
    """Trains a sequence of tasks with one Trainer, one Accelerator and one set of adapters (Algorithm 1).

    Per task: the adapters are re-initialised in place and a fresh optimizer and LR schedule are built;
    `train()` runs the task with `JumpLoRATrainerCallback` driving γ and τ; the (sparse) update is
    merged into the base weights (and W_past for ELLA); every task seen so far is evaluated by
    generation + exact match, and `continual_metrics.json` is rewritten in `output_dir`.
    """

    def __init__(self, model, args: ContinualSeq2SeqConfig, processing_class, peft_config: JumpLoraConfig | None = None, **kwargs):
        if not isinstance(args, ContinualSeq2SeqConfig):
            raise TypeError("args must be a ContinualSeq2SeqConfig")
        if processing_class is None:
            raise ValueError("pass the tokenizer as processing_class: tasks are tokenised and decoded with it")
        if kwargs.get("optimizers", (None, None)) != (None, None):
            raise ValueError("optimizers cannot be passed: every task starts a fresh optimizer built from args")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        model = self._wrap_with_adapters(model, args, peft_config)
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        kwargs.setdefault("data_collator", ContinualDataCollator(processing_class.pad_token_id, self.is_encoder_decoder))
        self._jump_callback = JumpLoRATrainerCallback()
        kwargs["callbacks"] = [_TaskBoundaryCallback(self), self._jump_callback, *(kwargs.get("callbacks") or [])]
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "ContinualSeq2SeqTrainer does not support FSDP: launch with DDP (accelerate_configs/multi_gpu.yaml) "
                "or DeepSpeed ZeRO (accelerate_configs/zero2.yaml, zero3.yaml)"
            )
        if is_deepspeed_zero3_enabled():
            register_adapted_weights_as_external(self.model)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.distributed_type == DistributedType.NO:
            raise RuntimeError(
                f"{launched} processes were launched but the Trainer is not distributed, so each would train alone; "
                "on a machine without GPUs pass use_cpu=True (and ddp_backend='gloo')"
            )
        self.task_index = 0
        self.task_spans: list[TaskSpan] = []
        self.task_names: list[str] = []
        self.accuracy_matrix: list[list[float | None]] = []
        self.task_updates: list[MergedTaskUpdate] = []
        self._ella_sum = torch.zeros(())
        self._ella_logged_step = 0

    @staticmethod
    def _wrap_with_adapters(model, args: ContinualSeq2SeqConfig, peft_config: JumpLoraConfig | None) -> PeftModel:
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError("model already has adapters; pass either a PeftModel or peft_config, not both")
            config = model.peft_config.get("default")
            if not isinstance(config, JumpLoraConfig) or config.use_jumprelu != args.uses_jumprelu:
                raise ValueError(
                    f"method {args.method!r} needs a JumpLoraConfig adapter named 'default' with "
                    f"use_jumprelu={args.uses_jumprelu}; pass the base model and peft_config instead"
                )
            return model
        peft_config = peft_config if peft_config is not None else JumpLoraConfig()
        if peft_config.use_jumprelu != args.uses_jumprelu:
            # The method decides whether the gate is on, so one JumpLoraConfig serves all four methods.
            peft_config = dataclasses.replace(peft_config, use_jumprelu=args.uses_jumprelu)
        return get_jumplora_model(model, peft_config)

    # ----------------------------------------------------------------- the task sequence
    def train_continual(self, tasks: Sequence[ContinualTask], single_task_accuracies: Sequence[float] | None = None) -> dict:
        """Run `tasks` in order; returns (and writes to `output_dir/continual_metrics.json`) the report.

        The unfinished tasks are trained in one `train()` call: task k owns a contiguous range of optimizer
        steps (`sequence.plan_task_spans`), so one optimizer, one LR scheduler object and one engine (DDP or
        DeepSpeed) serve the whole sequence. At a task's first step its adapters are re-initialised and the
        optimizer state emptied; after its last step it is merged and every task so far is evaluated.
        """
        encoded = self._validate_and_encode(tasks, single_task_accuracies)
        self.single_task_accuracies = list(single_task_accuracies) if single_task_accuracies is not None else None
        self._base_state = self._merged_state() if self.args.single_task_baselines else None
        finished = self._resume([t.name for t in encoded])
        remaining = encoded[finished:]
        if not remaining:
            return self.continual_report()
        self._encoded_tasks = encoded
        self.task_spans = plan_task_spans(
            [len(t.train) for t in remaining], finished, self.args.per_device_train_batch_size, self.args.world_size,
            self.args.gradient_accumulation_steps, self.args.num_train_epochs, self.args.max_steps,
        )
        self.train_dataset = concatenate_datasets([t.train for t in remaining])
        self.optimizer, self.lr_scheduler = None, None
        max_steps_per_task = self.args.max_steps
        self.args.max_steps = self.task_spans[-1].end_step  # the Trainer's run: every remaining task
        try:
            self.train()
        finally:
            self.args.max_steps = max_steps_per_task
        return self.continual_report()

    def _begin_task(self, span: TaskSpan) -> None:
        index = span.index
        self.task_index = index
        set_seed(self.args.seed + index)  # dropout etc. of a task independent of the tasks before it
        with writing_adapters(self.model, include_base=self._base_state is not None):
            if self._base_state is not None:
                restore_merged_state(self.model, self._base_state)
            begin_task(self.model, index, self.args.seed)
        reset_optimizer_state(self.optimizer)  # Adam moments and step count start afresh, as in a new optimizer
        self._ella_sum, self._ella_logged_step = torch.zeros(()), self.state.global_step
        ella_on = self.args.lambda_for_task(index) > 0
        record_ella_terms(self.model, self.args.ella_delta_mode if ella_on else None)
        self._jump_callback.start_task(span.first_step, span.num_steps)

    def _end_task(self, span: TaskSpan) -> None:
        index, encoded = span.index, self._encoded_tasks
        record_ella_terms(self.model, None)
        with writing_adapters(self.model, include_base=True):
            self.task_updates.append(end_task(self.model, accumulate_w_past=self.args.uses_ella))
        self.task_names.append(encoded[index].name)
        seen = [index] if self.args.single_task_baselines else range(index + 1)
        row = [self.evaluate_generation(encoded[j]) if j in seen else None for j in range(index + 1)]
        self.accuracy_matrix.append(row + [None] * (len(encoded) - index - 1))
        self._write_report(self.continual_report())
        self._save_sequence_state()
        logger.info("task %d/%d (%s) done: accuracies %s", index + 1, len(encoded), encoded[index].name, row)

    def _resume(self, names: list[str]) -> int:
        """Continue a run from output_dir: restore its finished tasks and return how many there were."""
        path = os.path.join(self.args.output_dir, SEQUENCE_STATE_FILE)
        if not os.path.exists(path):
            return 0
        state = torch.load(path, map_location="cpu", weights_only=False)  # written by _save_sequence_state
        done = state["tasks"]
        if state["method"] != self.args.method or done != names[: len(done)]:
            raise ValueError(
                f"{path} holds a {state['method']} run of tasks {done}, which does not start this run "
                f"({self.args.method}: {names}); choose another output_dir, or remove that file to start over"
            )
        restore_merged_state(self.model, state["merged"])
        self.task_names = list(done)
        self.accuracy_matrix = [row[: len(names)] + [None] * (len(names) - len(row)) for row in state["accuracy_matrix"]]
        self.task_updates = [MergedTaskUpdate(supports, numels) for supports, numels in state["updates"]]
        logger.info("resuming %s after %d finished task(s): %s", self.args.output_dir, len(done), done)
        return len(done)

    def _merged_state(self) -> dict:
        with gathered_adapters(self.model, include_base=True):
            return merged_state(self.model)

    def _save_sequence_state(self) -> None:
        merged = self._merged_state()  # every rank takes part in the ZeRO-3 gather
        if not self.is_world_process_zero():
            return
        state = {
            "method": self.args.method,
            "tasks": self.task_names,
            "accuracy_matrix": self.accuracy_matrix,
            "updates": [(u.supports, u.numels) for u in self.task_updates],
            "merged": merged,
        }
        path = os.path.join(self.args.output_dir, SEQUENCE_STATE_FILE)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def _validate_and_encode(self, tasks, single_task_accuracies) -> list[EncodedTask]:
        if not tasks:
            raise ValueError("tasks is empty; pass at least one ContinualTask")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        lambdas = self.args.ella_lambda
        if self.args.uses_ella and len(lambdas) not in (1, len(tasks)):
            raise ValueError(f"ella_lambda has {len(lambdas)} values for {len(tasks)} tasks; give one value or one per task")
        if single_task_accuracies is not None and len(single_task_accuracies) != len(tasks):
            raise ValueError(f"{len(single_task_accuracies)} single-task accuracies for {len(tasks)} tasks")
        return [
            encode_task(t, self.processing_class, self.is_encoder_decoder, self.args.max_source_length, self.args.max_target_length)
            for t in tasks
        ]

    def evaluate_generation(self, task: EncodedTask) -> float:
        """Exact-match accuracy of greedy generation on the task's eval prompts."""
        output = self.predict(task.prompts, metric_key_prefix=f"eval_{task.name}", max_new_tokens=task.max_new_tokens)
        # Seq2SeqTrainer.predict gathers without dropping the samples that accelerate repeats (from the start
        # of the dataset) to even out the last batch across ranks: the first len(prompts) rows are the prompts.
        predictions = output.predictions[: len(task.answers)]
        tokens = np.where(predictions < 0, self.processing_class.pad_token_id, predictions)
        texts = self.processing_class.batch_decode(tokens, skip_special_tokens=True)
        return exact_match_accuracy(texts, task.answers)

    def save_merged_model(self, output_dir: str) -> None:
        """The base model with every finished task merged in, as a plain transformers checkpoint (+ tokenizer).

        Under ZeRO-3 the weights are gathered as a 16-bit state dict, which needs
        `zero3_save_16bit_model: true` (accelerate config) / `stage3_gather_16bit_weights_on_model_save`.
        Call it on every process.
        """
        wrapped = self.model_wrapped if self.is_deepspeed_enabled and self.model_wrapped is not self.model else self.model
        state = self.accelerator.get_state_dict(wrapped)
        if not self.is_world_process_zero():
            return
        base_state = {}
        for key, value in state.items():
            if ".lora_" in key:
                continue  # the adapters are empty (B = 0) after a task's merge
            key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            base_state[key] = value
        self.model.get_base_model().save_pretrained(output_dir, state_dict=base_state)
        self.processing_class.save_pretrained(output_dir)

    def continual_report(self) -> dict:
        if self.args.single_task_baselines:
            return {
                "method": self.args.method,
                "tasks": self.task_names,
                "single_task_baselines": True,
                "single_task_accuracies": [row[i] for i, row in enumerate(self.accuracy_matrix)],
                "per_task": [{"name": n, "sparsity": {"mean": float(np.mean(list(u.sparsity().values())))}} for n, u in zip(self.task_names, self.task_updates)],
            }
        acc = self.accuracy_matrix
        per_task = []
        for index, (name, update) in enumerate(zip(self.task_names, self.task_updates)):
            sparsity = update.sparsity()
            overlap = metrics.mean_jaccard_with_previous(update.supports, [u.supports for u in self.task_updates[:index]])
            partial = [row[: index + 1] for row in acc[: index + 1]]
            per_task.append(
                {
                    "name": name,
                    "overall_accuracy": metrics.overall_accuracy(partial),
                    "backward_transfer": metrics.backward_transfer(partial),
                    "sparsity": {"mean": float(np.mean(list(sparsity.values()))), "per_layer": sparsity},
                    "jaccard_with_previous": (
                        {"mean": float(np.mean(list(overlap.values()))), "per_layer": overlap} if overlap else None
                    ),
                }
            )
        fwt = None
        if self.single_task_accuracies is not None:
            fwt = metrics.forward_transfer(acc, self.single_task_accuracies)
        return {
            "method": self.args.method,
            "tasks": self.task_names,
            "accuracy_matrix": acc,
            "overall_accuracy": metrics.overall_accuracy(acc),
            "backward_transfer": metrics.backward_transfer(acc),
            "forward_transfer": fwt,
            "single_task_accuracies": self.single_task_accuracies,
            "per_task": per_task,
        }

    def _write_report(self, report: dict) -> None:
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, METRICS_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)  # a crash mid-write never loses the previous report

    # ----------------------------------------------------------------- Trainer hooks
    def get_train_dataloader(self) -> DataLoader:
        if not self.task_spans:
            return super().get_train_dataloader()
        sampler = TaskBatchSampler(
            self.task_spans, self.args.per_device_train_batch_size, self.args.world_size,
            self.args.gradient_accumulation_steps, self.args.seed,
        )
        loader = DataLoader(
            self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)  # deals the batches out to the processes in turn

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.task_spans:
            self.lr_scheduler = task_restarting_schedule(
                self.optimizer if optimizer is None else optimizer, self.task_spans, self.args.lr_scheduler_type,
                self.args.get_warmup_steps, self.args.lr_scheduler_kwargs,
            )
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs)
        lam = self.args.lambda_for_task(self.task_index)
        if lam == 0.0 or not model.training:
            return result
        penalty = pop_ella_penalty(self.model)  # recorded by the adapted layers during this forward
        if penalty is None:
            return result
        # The Trainer divides a per-micro-batch loss by the accumulation steps, but not a loss already
        # normalised over the whole accumulated batch: count the penalty once per optimizer step either way.
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:
            scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        term = lam * penalty / (self.current_gradient_accumulation_steps if scaled_for_ga else 1)
        self._ella_sum = self._ella_sum.to(term.device) + term.detach() * (1 if scaled_for_ga else 1 / self.current_gradient_accumulation_steps)
        if return_outputs:
            loss, outputs = result
            return loss + term, outputs
        return result + term

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs["task"] = self.task_index
            steps = self.state.global_step - self._ella_logged_step
            if self.args.uses_ella and steps > 0:
                ella = self._ella_sum.item() / steps
                logs["loss_ella"], logs["loss_ce"] = ella, logs["loss"] - ella
                self._ella_sum, self._ella_logged_step = torch.zeros(()), self.state.global_step
            with gathered_adapters(self.model):
                logs.update(threshold_statistics(self.model))
        super().log(logs, *args, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        # weight decay would pull log τ towards 0, i.e. τ towards 1, whatever the task needs
        return [name for name in super().get_decay_parameter_names(model) if "lora_log_tau" not in name]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if "labels" in inputs or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        inputs = self._prepare_inputs(inputs)
        generation_kwargs = {**getattr(self, "_gen_kwargs", {}), **gen_kwargs}
        generation_kwargs.pop("max_length", None)
        generation_kwargs.update(
            do_sample=False,
            num_beams=1,
            pad_token_id=self.processing_class.pad_token_id,
            eos_token_id=self.processing_class.eos_token_id,
            synced_gpus=is_deepspeed_zero3_enabled(),
        )
        with torch.no_grad():
            generated = self.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **generation_kwargs)
        if not self.is_encoder_decoder:
            generated = generated[:, inputs["input_ids"].shape[1] :]  # the continuation after the prompt
        return None, generated, None


class _TaskBoundaryCallback(TrainerCallback):
    """Starts each task at its first optimizer step; finishes it once its last step is done and logged.

    A task is finished at the next step's start (or at the end of training) rather than in
    `on_step_end`, because the Trainer logs a step after `on_step_end`: the logs of a task's last step
    then still describe its adapters, not the merged model.
    """

    def __init__(self, trainer: ContinualSeq2SeqTrainer):
        self.trainer = trainer

    def _finish_task_ending_at(self, step: int) -> None:
        span = next((s for s in self.trainer.task_spans if s.end_step == step), None)
        if span is not None and len(self.trainer.task_names) == span.index:  # not finished yet
            self.trainer._end_task(span)

    def on_step_begin(self, args, state, control, **kwargs):
        self._finish_task_ending_at(state.global_step)
        span = next((s for s in self.trainer.task_spans if s.first_step == state.global_step), None)
        if span is not None:
            self.trainer._begin_task(span)

    def on_train_end(self, args, state, control, **kwargs):
        self._finish_task_ending_at(state.global_step)

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
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from . import metrics
from .callback import JumpLoRATrainerCallback
from .config import JumpLoraConfig
from .data import ContinualDataCollator, ContinualTask, EncodedTask, encode_task, exact_match_accuracy
from .ella import ELLA_DELTA_MODES, pop_ella_penalty, record_ella_terms
from .lifecycle import MergedTaskUpdate, begin_task, end_task, merged_state, restore_merged_state
from .model import get_jumplora_model
from .thresholds import threshold_statistics

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
        kwargs["callbacks"] = [JumpLoRATrainerCallback(), *(kwargs.get("callbacks") or [])]
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # Trainer.train() builds a new engine per call, and parameter writes outside the optimizer (τ at
            # S_start, the re-initialised adapters) would be overwritten by its fp32 master copies.
            raise NotImplementedError(
                "ContinualSeq2SeqTrainer does not support DeepSpeed or FSDP yet: a task sequence needs one engine "
                "across tasks; launch with DDP instead (accelerate_configs/multi_gpu.yaml)"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.distributed_type == DistributedType.NO:
            raise RuntimeError(
                f"{launched} processes were launched but the Trainer is not distributed, so each would train alone; "
                "on a machine without GPUs pass use_cpu=True (and ddp_backend='gloo')"
            )
        self.task_index = 0
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
        """Run `tasks` in order; returns (and writes to `output_dir/continual_metrics.json`) the report."""
        encoded = self._validate_and_encode(tasks, single_task_accuracies)
        self.single_task_accuracies = list(single_task_accuracies) if single_task_accuracies is not None else None
        finished = self._resume([t.name for t in encoded])
        report = self.continual_report() if finished else {}
        for index, task in enumerate(encoded[finished:], start=finished):
            self.task_index = index
            set_seed(self.args.seed + index)  # each task's data order independent of the tasks before it
            begin_task(self.model, index, self.args.seed)
            self.train_dataset = task.train
            self.optimizer, self.lr_scheduler = None, None  # a fresh AdamW state and LR schedule per task
            self._ella_sum, self._ella_logged_step = torch.zeros(()), 0
            ella_on = self.args.lambda_for_task(index) > 0
            record_ella_terms(self.model, self.args.ella_delta_mode if ella_on else None)
            self.train()
            record_ella_terms(self.model, None)
            self.task_updates.append(end_task(self.model, accumulate_w_past=self.args.uses_ella))
            self.task_names.append(task.name)
            row = [self.evaluate_generation(encoded[j]) for j in range(index + 1)]
            self.accuracy_matrix.append(row + [None] * (len(encoded) - index - 1))
            report = self.continual_report()
            self._write_report(report)
            self._save_sequence_state()
            logger.info("task %d/%d (%s) done: accuracies %s", index + 1, len(encoded), task.name, row)
        return report

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

    def _save_sequence_state(self) -> None:
        if not self.is_world_process_zero():
            return
        state = {
            "method": self.args.method,
            "tasks": self.task_names,
            "accuracy_matrix": self.accuracy_matrix,
            "updates": [(u.supports, u.numels) for u in self.task_updates],
            "merged": merged_state(self.model),
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

    def continual_report(self) -> dict:
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

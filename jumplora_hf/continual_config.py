"""`ContinualConfig`: the training arguments of a continual run (trl's `x_config.py` beside `x_trainer.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments

from ._deprecation import moved
from .ella import ELLA_DELTA_MODES
from .methods import METHODS, get_method

EVAL_SEEN_TASKS = ("after_every_task", "at_end")


@dataclass
class ContinualConfig(Seq2SeqTrainingArguments):
    """Training arguments of a continual run; the usual `Seq2SeqTrainingArguments` apply to every task.

    `max_steps` and `num_train_epochs` are per task. The Hub flags of the Trainer publish the run: `push_to_hub`
    with `hub_strategy="end"` pushes once at the end, any other strategy after every task (with a tag per task).
    """

    method: str = field(
        default="jumplora_inclora",
        metadata={"help": f"Continual-learning method, one of {sorted(METHODS)}.", "choices": sorted(METHODS)},
    )
    ella_lambda: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "λ of the ELLA term for the ella methods: one value for every task, one per task (the paper uses 0 then "
                "3e4 on Standard CL, 5e5 on Long Sequence; its Appendix Table 7), or 'auto': each task's λ from the "
                "ratio of the ELLA term to the cross-entropy over its first steps (see ella_target_ratio)."
            )
        },
    )
    ella_target_ratio: float = field(
        default=1.0,
        metadata={"help": "With ella_lambda='auto': the ELLA term's target size relative to the cross-entropy."},
    )
    ella_auto_steps: int | None = field(
        default=None,
        metadata={
            "help": "With ella_lambda='auto': the steps λ is measured over (default: the steps before S_start, at least 2)."
        },
    )
    ella_delta_mode: str = field(
        default="sparse",
        metadata={
            "help": "ΔW_x in the ELLA term for jumplora_ella: 'sparse' (ΔW_jump) or 'interpolated' (ΔW_interp).",
            "choices": list(ELLA_DELTA_MODES),
        },
    )
    tau_lr_multiplier: float = field(
        default=1.0,
        metadata={
            "help": (
                "Learning rate of log τ relative to learning_rate (its own optimizer parameter group, never weight "
                "decayed). 1 is the paper's; larger values let τ follow the growth of ΔW within short tasks."
            )
        },
    )
    olora_lambda1: float = field(
        default=0.5,
        metadata={
            "help": "O-LoRA methods: weight of the orthogonality loss Σ|A_past·A_tᵀ| (O-LoRA's scripts: 0.5 on Standard CL)."
        },
    )
    olora_lambda2: float = field(
        default=0.0,
        metadata={"help": "O-LoRA methods: weight of the L2 term ‖A_t‖₂ + ‖B_t‖₂ (O-LoRA's scripts: 0)."},
    )
    osf_max_preserved_fraction: float = field(
        default=0.5,
        metadata={
            "help": (
                "Method osf: f, the fraction of min(d_out, d_in) preserved by the last task; task t of n (1-based) "
                "preserves the top ⌊f·min(d_out, d_in)·t/n⌋ singular directions of the current weight (PEFT's "
                "progressive budget) and trains in their orthogonal complement. 0 < f < 1."
            )
        },
    )
    max_source_length: int = field(
        default=512, metadata={"help": "Prompt length in tokens; only the input text is truncated."}
    )
    max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "Answer length in tokens with EOS (the generation budget); default: the longest option + 1."
        },
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
    eval_seen_tasks: str = field(
        default="after_every_task",
        metadata={
            "help": (
                "Which tasks are evaluated when a task ends. 'after_every_task': every task seen so far, the whole "
                "accuracy matrix (T(T+1)/2 evaluations). 'at_end': the task just trained (a[i][i]), and after the last "
                "task every task (2T−1 evaluations): all that OA, BWT and FWT use; the rows in between hold the "
                "diagonal only."
            ),
            "choices": list(EVAL_SEEN_TASKS),
        },
    )
    ledger: bool = field(
        default=True,
        metadata={"help": "Write each task's exact update to <output_dir>/ledger/ (python -m jumplora_hf.ledger)."},
    )
    hub_push_ledger: bool = field(default=True, metadata={"help": "With push_to_hub: upload the ledger too."})
    hub_strategy: str = field(
        default="end",
        metadata={
            "help": (
                "With push_to_hub: 'end' pushes the finished run once (trainer.push_to_hub(); the recipes call it), any "
                "other strategy pushes after every task and tags the commit after-task-NN-<name>."
            ),
            "choices": ["end", "every_save", "checkpoint", "all_checkpoints"],
        },
    )
    predict_with_generate: bool = field(default=True, metadata={"help": "Evaluation generates answers (required)."})
    save_strategy: str = field(
        default="steps",
        metadata={
            "help": (
                "Trainer checkpoints every save_steps optimizer steps of the sequence, which a restart continues from "
                "(at most save_steps steps redone); 'no': a restart starts the first unfinished task again."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        method = get_method(self.method)
        if self.ella_delta_mode not in ELLA_DELTA_MODES:
            raise ValueError(f"unknown ella_delta_mode {self.ella_delta_mode!r}; use one of {ELLA_DELTA_MODES}")
        self.ella_lambda = _parse_lambdas(self.ella_lambda)
        if method.ella and not self.ella_lambda:
            raise ValueError(
                f"method {self.method!r} needs ella_lambda (one value, one per task, or 'auto'), e.g. 3e4 as in the "
                "paper's Standard CL runs"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) and gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) must be ≥ 1"
            )
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0 (or max_steps > 0), got {self.num_train_epochs}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"weight_decay ({self.weight_decay}) and warmup_steps ({self.warmup_steps}) must be ≥ 0")
        if not self.tau_lr_multiplier > 0:
            raise ValueError(f"tau_lr_multiplier must be > 0, got {self.tau_lr_multiplier}")
        if self.olora_lambda1 < 0 or self.olora_lambda2 < 0:
            raise ValueError(
                f"olora_lambda1 and olora_lambda2 must be ≥ 0, got {self.olora_lambda1}, {self.olora_lambda2}"
            )
        if not 0 < self.osf_max_preserved_fraction < 1:
            raise ValueError(
                f"osf_max_preserved_fraction must be in (0, 1), got {self.osf_max_preserved_fraction} (the last task "
                "preserves that fraction of each weight's rank and trains in the rest)"
            )
        if not self.ella_target_ratio > 0:
            raise ValueError(f"ella_target_ratio must be > 0, got {self.ella_target_ratio}")
        if self.eval_seen_tasks not in EVAL_SEEN_TASKS:
            raise ValueError(f"unknown eval_seen_tasks {self.eval_seen_tasks!r}; use one of {EVAL_SEEN_TASKS}")
        if not self.predict_with_generate:
            raise ValueError("predict_with_generate must stay True: tasks are evaluated by generation")

    @property
    def uses_jumprelu(self) -> bool:
        return get_method(self.method).jump_gate

    @property
    def uses_ella(self) -> bool:
        return get_method(self.method).ella

    @property
    def uses_olora(self) -> bool:
        return get_method(self.method).olora

    @property
    def uses_osf(self) -> bool:
        return get_method(self.method).osf

    @property
    def auto_ella_lambda(self) -> bool:
        return self.ella_lambda == "auto"


def _parse_lambdas(value) -> list[float] | str | None:
    """None, "auto", or a list of non-negative floats, from a number, a string, or a list of either."""
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1 and str(values[0]).strip().lower() == "auto":
        return "auto"
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"ella_lambda must be numbers or 'auto', got {value!r}") from None
    if any(v < 0 for v in floats):
        raise ValueError(f"ella_lambda must be non-negative, got {floats}")
    return floats


# the 0.2 names of what moved in 0.3
__getattr__ = moved(__name__, {"ContinualSeq2SeqConfig": ("continual_config", "ContinualConfig")})

"""The benchmark recipes' arguments and run: `recipes/sc.py` (Standard CL) and `recipes/ls.py` (Long Sequence)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, HfArgumentParser, TrainerCallback

from .cl_benchmark import load_cl_benchmark
from .config import THRESHOLD_MODES, JumpLoraConfig
from .reports import write_run_reports
from .trainer import METRICS_FILE, ContinualSeq2SeqConfig, ContinualSeq2SeqTrainer

# The paper's Appendix Table 7: λ per task for the ELLA methods (the same for ELLA and JumpLoRA + ELLA).
PAPER_ELLA_LAMBDAS = {
    "order1": [0.0] + [3e4] * 3,
    "order2": [0.0] + [3e4] * 3,
    "order3": [0.0] + [3e4] * 3,
    "order4": [0.0] + [5e5] * 13 + [5e7],
    "order5": [0.0] + [5e6] * 11 + [5e7] * 3,
    "order6": [0.0] + [5e5] * 14,
}

AUTO_OUTPUT_DIR = "<auto>"  # becomes runs/<order>/<method>/seed<seed>: one folder per run, which a restart continues


@dataclass
class RecipeArguments:
    """What to train on, and the adapters (the training itself is configured by ContinualSeq2SeqConfig)."""

    model_name_or_path: str = field(default="google-t5/t5-large", metadata={"help": "Hub id or local folder of the base model."})
    data_dir: str = field(
        default=os.path.join("..", "shared", "cl_benchmark"),
        metadata={"help": "Folder in the standard layout <task>/{train,dev,test,labels}.json (+ instructions.json, orders.json)."},
    )
    order: str = field(default="order1", metadata={"help": "An order of orders.json (order1-order6) or comma-separated task names."})
    eval_split: str = field(default="dev", metadata={"help": "'dev' to tune, 'test' to report.", "choices": ["dev", "test"]})
    max_train_examples: int | None = field(default=None, metadata={"help": "Subsample each task's training split (small runs)."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Subsample each task's evaluation split (small runs)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA α (β = α/r)."})
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"], metadata={"help": "Modules to adapt (q, v in the paper)."})
    threshold_mode: str = field(default="global", metadata={"help": "τ sharing.", "choices": list(THRESHOLD_MODES)})
    s_start: float = field(default=0.2, metadata={"help": "S_start as a fraction of each task's steps."})
    s_final: float = field(default=0.8, metadata={"help": "S_final as a fraction of each task's steps."})
    jump_bandwidth: float = field(default=0.001, metadata={"help": "ε of the τ pseudo-derivative."})
    save_merged: bool = field(
        default=True,
        metadata={"help": "Save the final merged model to <output_dir>/merged (a plain transformers checkpoint)."},
    )
    single_task_dir: str = field(
        default=AUTO_OUTPUT_DIR,
        metadata={
            "help": (
                "Run dir of a --single_task_baselines run of the same tasks, whose accuracies a0 give FWT; default: "
                "runs/<order>/single_task/seed<seed> when it has finished every task. 'none' to skip FWT."
            )
        },
    )


# The paper's training setup (§4.4); every value can be overridden. Its "WarmupLR" warmup length is not stated:
# pass --warmup_steps to add one.
PAPER_TRAINING_DEFAULTS = dict(
    learning_rate=1e-3,
    lr_scheduler_type="constant_with_warmup",
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    num_train_epochs=1,
    max_source_length=512,
    max_target_length=8,
    seed=42,
    logging_steps=10,
    report_to="none",
)



def _defaults(order: str) -> dict:
    return {**PAPER_TRAINING_DEFAULTS, "order": order, "output_dir": AUTO_OUTPUT_DIR, "ella_lambda": PAPER_ELLA_LAMBDAS.get(order)}


def parse_recipe_args(argv: list[str], default_order: str) -> tuple[RecipeArguments, ContinualSeq2SeqConfig]:
    """Flags, or one YAML/JSON file of them; the paper's values (λ of the chosen order included) fill the rest."""
    parser = HfArgumentParser((RecipeArguments, ContinualSeq2SeqConfig))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        with open(argv[0], encoding="utf-8") as f:
            given = yaml.safe_load(f) or {}  # JSON is YAML
        recipe, training = parser.parse_dict({**_defaults(given.get("order", default_order)), **given})
    else:
        order_parser = HfArgumentParser(RecipeArguments)
        order_parser.set_defaults(order=default_order)
        without_help = [a for a in argv if a not in ("-h", "--help")]  # the full parser prints the help
        recipe, _ = order_parser.parse_args_into_dataclasses(without_help, return_remaining_strings=True)
        parser.set_defaults(**_defaults(recipe.order))
        recipe, training = parser.parse_args_into_dataclasses(argv)
    if training.output_dir == AUTO_OUTPUT_DIR:
        training.output_dir = default_run_dir(recipe, training, "single_task" if training.single_task_baselines else training.method)
    return recipe, training


def default_run_dir(recipe: RecipeArguments, training: ContinualSeq2SeqConfig, name: str) -> str:
    return os.path.join("runs", recipe.order.replace(",", "-"), name, f"seed{training.seed}")


def read_single_task_accuracies(run_dir: str | None, task_names: list[str], explicit: bool) -> list[float] | None:
    """a0 of a finished --single_task_baselines run of the same tasks; None when there is none to use."""
    path = os.path.join(run_dir, METRICS_FILE) if run_dir and run_dir.lower() != "none" else None
    if path is None or not os.path.exists(path):
        if explicit and path is not None:
            raise FileNotFoundError(f"--single_task_dir {run_dir!r} has no {METRICS_FILE}; run the recipe there with --single_task_baselines true")
        return None
    with open(path, encoding="utf-8") as f:
        baseline = json.load(f)
    if not baseline.get("single_task_baselines") or baseline["tasks"] != task_names:
        if explicit:
            raise ValueError(f"{path} is not a finished --single_task_baselines run of {task_names}")
        return None
    return baseline["single_task_accuracies"]


def _load_model(path: str):
    try:
        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        return auto.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:  # not found, offline, or not a valid Hub id
        raise SystemExit(
            f"could not load model {path!r} ({error.__class__.__name__}: {str(error).splitlines()[0]}).\n"
            "Offline? Pass --model_name_or_path a local folder, or run the offline demo: make demo "
            "(it converts SmolLM2-135M-Instruct into models/SmolLM2-135M-Instruct, which you can pass here)"
        ) from None


class LogHistoryFile(TrainerCallback):
    """Appends every training log, with its optimizer step, to <output_dir>/log_history.jsonl (main process only).

    A restarted run appends again from the start of its first unfinished task: for a step logged twice, the
    last line is the one of the run that finished it.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "log_history.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def run(recipe: RecipeArguments, training: ContinualSeq2SeqConfig) -> dict:
    tasks = load_cl_benchmark(
        recipe.data_dir, recipe.order, recipe.eval_split, recipe.max_train_examples, recipe.max_eval_examples, training.seed
    )
    adapters = JumpLoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, target_modules=recipe.target_modules,
        threshold_mode=recipe.threshold_mode, s_start=recipe.s_start, s_final=recipe.s_final,
        jump_bandwidth=recipe.jump_bandwidth,
    )
    a0 = None
    if not training.single_task_baselines:
        explicit = recipe.single_task_dir != AUTO_OUTPUT_DIR
        run_dir = recipe.single_task_dir if explicit else default_run_dir(recipe, training, "single_task")
        a0 = read_single_task_accuracies(run_dir, [t.name for t in tasks], explicit)
    model, tokenizer = _load_model(recipe.model_name_or_path)
    trainer = ContinualSeq2SeqTrainer(model, training, tokenizer, peft_config=adapters, callbacks=[LogHistoryFile()])
    report = trainer.train_continual(tasks, single_task_accuracies=a0)
    if not training.single_task_baselines:
        if recipe.save_merged:
            trainer.save_merged_model(os.path.join(training.output_dir, "merged"))
        if trainer.is_world_process_zero():
            write_run_reports(training.output_dir, report)  # matrix CSV/JSON, per-task CSV, plots
    return report


def main(default_order: str, argv: list[str] | None = None) -> dict:
    recipe, training = parse_recipe_args(sys.argv[1:] if argv is None else argv, default_order)
    return run(recipe, training)

"""The benchmark recipes' run: `recipes/sc.py` (Standard CL) and `recipes/ls.py` (Long Sequence).

The command line is parsed first (`recipe_args`, without torch); then, before the Trainer exists or anything is
written, the data, the adapters, the model, the targets and the tasks are checked. A user error at any of these
steps prints one message and a short usage line and exits with status 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from .recipe_args import AUTO, RecipeArguments, RecipeError, check_data, parse_light, resolve_data_dir, short_usage

# The paper's Appendix Table 7: λ per task for the ELLA methods (the same for ELLA and JumpLoRA + ELLA).
PAPER_ELLA_LAMBDAS = {
    "order1": [0.0] + [3e4] * 3,
    "order2": [0.0] + [3e4] * 3,
    "order3": [0.0] + [3e4] * 3,
    "order4": [0.0] + [5e5] * 13 + [5e7],
    "order5": [0.0] + [5e6] * 11 + [5e7] * 3,
    "order6": [0.0] + [5e5] * 14,
}
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
    disable_tqdm=True,  # one line per task on the console (and every log in log_history.jsonl)
)
METRICS_FILE = "continual_metrics.json"
SMALL_MODEL = os.path.join("models", "SmolLM2-135M-Instruct")  # what `make demo` converts
SMALL_TRAINING = dict(
    max_steps=2,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    max_source_length=128,
    logging_steps=1,
    eval_seen_tasks="at_end",  # 2T−1 evaluations instead of T(T+1)/2: the 15 tasks of orders 4-6 in minutes
)


@contextlib.contextmanager
def user_errors(output_dir: str | None = None):
    """Our checks' ValueError / FileNotFoundError as a RecipeError; an output dir this step created is removed
    again when it is still empty."""
    existed = output_dir is not None and os.path.exists(output_dir)
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as error:
        if output_dir is not None and not existed and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise RecipeError(str(error)) from None


def _training_defaults(order: str) -> dict:
    return {**PAPER_TRAINING_DEFAULTS, "output_dir": AUTO, "ella_lambda": PAPER_ELLA_LAMBDAS.get(order)}


def parse_recipe_args(argv: list[str], default_order: str, prog: str = "recipe", description: str = ""):
    """(recipe, adapters, training) from flags or one YAML/JSON file; the paper's values fill the rest."""
    recipe, adapters, rest, help_all = parse_light(argv, prog, description, default_order)
    from transformers import HfArgumentParser  # the heavy imports start here, after the light flags are parsed

    from ..continual_config import ContinualConfig

    parser = HfArgumentParser(ContinualConfig)
    parser.error = lambda message: (_ for _ in ()).throw(RecipeError(message))  # no 250-line usage dump
    if help_all:
        from .recipe_args import light_parser

        light_parser(prog, description, default_order).print_help()
        print("\ntraining (ContinualConfig):")
        parser.print_help()
        sys.exit(0)
    defaults = _training_defaults(recipe.order)
    if adapters.jumplora_method is not None:
        raise RecipeError(
            f"--jumplora_method is for Trainer scripts (JumpLoraArguments); the recipes take --method (here: "
            f"--method {adapters.jumplora_method})"
        )
    if recipe.small:
        _make_small(recipe, adapters, defaults)
    with user_errors():
        if isinstance(rest, dict):
            (training,) = parser.parse_dict({**defaults, **rest})
        else:
            parser.set_defaults(**defaults)
            (training,) = parser.parse_args_into_dataclasses(rest)
    recipe.data_dir = resolve_data_dir(recipe.data_dir)
    check_data(recipe.data_dir, recipe.order)
    if training.output_dir == AUTO:
        training.output_dir = default_run_dir(
            recipe, training, "single_task" if training.single_task_baselines else training.method
        )
    return recipe, adapters, training


def _make_small(recipe: RecipeArguments, adapters, defaults: dict) -> None:
    """--small: the offline model and a few steps per task, where the flags left the paper's values."""
    from .recipe_args import RECIPE_ADAPTER_DEFAULTS

    if recipe.model_name_or_path == RecipeArguments.model_name_or_path:
        if not os.path.isdir(SMALL_MODEL):
            raise RecipeError(
                f"--small uses the offline model in {SMALL_MODEL}, which is not there yet: run `make demo` once (it "
                "converts it, about 30 s), or pass --model_name_or_path"
            )
        recipe.model_name_or_path = SMALL_MODEL
    if adapters.jumplora_target_modules == RECIPE_ADAPTER_DEFAULTS["jumplora_target_modules"]:
        adapters.jumplora_target_modules = ["q_proj", "v_proj"]
    recipe.max_train_examples = recipe.max_train_examples or 16
    recipe.max_eval_examples = recipe.max_eval_examples or 16
    defaults.update(SMALL_TRAINING)


def default_run_dir(recipe: RecipeArguments, training, name: str) -> str:
    root = os.path.join("runs", "small") if recipe.small else "runs"
    return os.path.join(root, recipe.order.replace(",", "-"), name, f"seed{training.seed}")


def read_single_task_accuracies(run_dir: str | None, task_names: list[str], explicit: bool) -> list[float] | None:
    """a0 of a finished --single_task_baselines run of the same tasks; None when there is none to use."""
    path = os.path.join(run_dir, METRICS_FILE) if run_dir and run_dir.lower() != "none" else None
    if path is None or not os.path.exists(path):
        if explicit and path is not None:
            raise FileNotFoundError(
                f"--single_task_dir {run_dir!r} has no {METRICS_FILE}; run the recipe there with --single_task_baselines true"
            )
        return None
    with open(path, encoding="utf-8") as f:
        baseline = json.load(f)
    if not baseline.get("single_task_baselines") or baseline["tasks"] != task_names:
        if explicit:
            raise ValueError(f"{path} is not a finished --single_task_baselines run of {task_names}")
        return None
    return baseline["single_task_accuracies"]


def _load_model(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a log file gets the run's lines, not the loader's progress bars

    from ..adapters import check_model_path

    try:
        check_model_path(path)
    except FileNotFoundError as error:
        raise RecipeError(str(error)) from None
    try:
        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        return auto.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:  # not found, offline, or not a valid Hub id
        raise RecipeError(
            f"could not load model {path!r} ({error.__class__.__name__}: {str(error).splitlines()[0]}). "
            "Offline? Pass --model_name_or_path a local folder, or run the offline demo: make demo "
            "(it converts SmolLM2-135M-Instruct into models/SmolLM2-135M-Instruct, which you can pass here)"
        ) from None


def log_history_file():
    """A callback appending every training log, with its optimizer step, to <output_dir>/log_history.jsonl (main
    process only). A restarted run appends again from the start of its first unfinished task: for a step logged
    twice, the last line is the one of the run that finished it."""
    from transformers import TrainerCallback

    class LogHistoryFile(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                os.makedirs(args.output_dir, exist_ok=True)
                with open(os.path.join(args.output_dir, "log_history.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return LogHistoryFile()


def run(recipe: RecipeArguments, adapters, training) -> dict:
    from transformers import PrinterCallback

    from .. import ContinualTrainer
    from ..adapters import check_target_modules
    from ..continual_trainer import encode_tasks
    from ..methods import display_name
    from .cl_benchmark import load_cl_benchmark
    from .console import TaskProgress
    from .reports import write_run_reports

    with user_errors():
        tasks = load_cl_benchmark(
            recipe.data_dir,
            recipe.order,
            recipe.eval_split,
            recipe.max_train_examples,
            recipe.max_eval_examples,
            training.seed,
        )
        peft_config = adapters.to_peft_config().with_gate(training.uses_jumprelu, training.method)
        a0 = None
        if not training.single_task_baselines:
            explicit = recipe.single_task_dir != AUTO
            run_dir = recipe.single_task_dir if explicit else default_run_dir(recipe, training, "single_task")
            a0 = read_single_task_accuracies(run_dir, [t.name for t in tasks], explicit)
    model, tokenizer = _load_model(recipe.model_name_or_path)
    with user_errors(training.output_dir):
        try:
            check_target_modules(model, peft_config)
        except ValueError as error:  # the message says which names exist; here they are set with a flag
            suggestion = getattr(error, "suggestion", None)
            hint = f" With the recipes: --jumplora_target_modules {' '.join(suggestion)}" if suggestion else ""
            raise ValueError(f"{error}.{hint}") from None
        encode_tasks(tasks, tokenizer, bool(model.config.is_encoder_decoder), training, a0)
        progress = TaskProgress(len(tasks), display_name(training.method))
        trainer = ContinualTrainer(
            model, training, tokenizer, peft_config=peft_config, callbacks=[log_history_file(), progress]
        )
        trainer.remove_callback(PrinterCallback)  # a line per task instead of every log (log_history.jsonl has them)
    # --resume_from_checkpoint PATH continues from that checkpoint; without it the run dir's latest one is used
    report = trainer.train_continual(
        tasks, single_task_accuracies=a0, resume_from_checkpoint=training.resume_from_checkpoint
    )
    if not training.single_task_baselines:
        if recipe.save_merged:
            trainer.save_merged_model(os.path.join(training.output_dir, "merged"))
        if trainer.is_world_process_zero():
            write_run_reports(training.output_dir, report)  # matrix CSV/JSON, per-task CSV, plots
        if training.push_to_hub and str(getattr(training.hub_strategy, "value", training.hub_strategy)) == "end":
            trainer.push_to_hub()  # every process: the merged model is gathered under ZeRO-3
    if trainer.is_world_process_zero():
        _summary(report, training, recipe)
    return report


def _summary(report: dict, training, recipe: RecipeArguments) -> None:
    """The end of a run on the console: the matrix, OA / BWT / FWT, the updates, and where everything went."""
    from .console import print_report

    out = training.output_dir
    if report.get("single_task_baselines"):
        print("\nsingle-task accuracies (a0): " + "  ".join(f"{a:.3f}" for a in report["single_task_accuracies"]))
    else:
        print_report(report)
        fwt = report.get("forward_transfer")
        print(f"FWT {fwt:+.3f}" if fwt is not None else "FWT: no single-task baselines (--single_task_baselines true)")
    print(
        f"\nwritten to {out}/: continual_metrics.json, accuracy_matrix.csv/.json, per_task.csv, the plots, ledger/, "
    )
    print("  log_history.jsonl, the resume state" + (", merged/ (the merged model)" if recipe.save_merged else ""))


def main(default_order: str, argv: list[str] | None = None, prog: str | None = None, description: str = "") -> dict:
    prog = prog or os.path.basename(sys.argv[0])
    try:
        return run(*parse_recipe_args(sys.argv[1:] if argv is None else argv, default_order, prog, description))
    except RecipeError as error:
        print(f"error: {error}\n{short_usage(prog)}", file=sys.stderr)
        sys.exit(2)

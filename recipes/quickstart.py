"""Offline quickstart: a continual sequence of generated tasks on a tiny T5 built from a config.

Runs in 30-60 s on 2 CPU cores, needs no download, and prints the accuracy matrix, OA, BWT and
the sparsity / overlap of the merged updates.

    python recipes/quickstart.py
    python recipes/quickstart.py --method inclora --tasks 4
    accelerate launch recipes/quickstart.py --method jumplora_ella --ella_lambda 0 1e3
    accelerate launch --multi_gpu --num_processes 2 recipes/quickstart.py   # 2 processes, also on CPU (gloo)
"""

from __future__ import annotations

import os
import platform

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning
if platform.machine().lower() in ("x86_64", "amd64") and "ATEN_CPU_CAPABILITY" not in os.environ:
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"  # one set of CPU kernels on every x86-64 CPU: see demo.py
    os.environ.setdefault("MKL_CBWR", "AVX2")

import argparse
import sys

import torch
from transformers import ByT5Tokenizer, PrinterCallback, T5Config, T5ForConditionalGeneration, set_seed

from jumplora_hf import ContinualConfig, ContinualTrainer, JumpLoraConfig
from jumplora_hf.bench.console import TaskProgress, print_report
from jumplora_hf.bench.synthetic import keyword_task_stream
from jumplora_hf.methods import METHODS, display_name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="jumplora_inclora", choices=sorted(METHODS))
    parser.add_argument("--tasks", type=int, default=3, help="number of generated tasks")
    parser.add_argument("--train_examples", type=int, default=1600, help="training examples per task")
    parser.add_argument("--eval_examples", type=int, default=64, help="evaluation examples per task")
    parser.add_argument(
        "--ella_lambda", type=float, nargs="+", default=[0.0, 1e3], help="λ: one value or one per task"
    )
    parser.add_argument("--output_dir", default=None, help="default: runs/quickstart/<method>; a rerun continues it")
    parser.add_argument("--d_model", type=int, default=32, help="width of the tiny T5")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.output_dir = args.output_dir or os.path.join("runs", "quickstart", args.method)
    set_seed(args.seed)
    # an untied output head: a tied one would be changed by every merge into the embeddings
    model = T5ForConditionalGeneration(
        T5Config(
            vocab_size=384,
            d_model=args.d_model,
            d_ff=2 * args.d_model,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            d_kv=args.d_model // 2,
            dropout_rate=0.0,
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    lambdas = (
        args.ella_lambda
        if len(args.ella_lambda) in (1, args.tasks)
        else [args.ella_lambda[0]] + [args.ella_lambda[-1]] * (args.tasks - 1)
    )
    config = ContinualConfig(
        output_dir=args.output_dir,
        method=args.method,
        ella_lambda=lambdas if METHODS[args.method].ella else None,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        per_device_train_batch_size=max(1, 8 // int(os.environ.get("WORLD_SIZE", "1"))),  # a global batch of 8
        per_device_eval_batch_size=64,
        num_train_epochs=1,
        logging_steps=50,
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        disable_tqdm=True,
    )
    adapters = JumpLoraConfig(r=8, lora_alpha=16, target_modules=["q", "k", "v", "o", "wi", "wo"])
    progress = TaskProgress(args.tasks, display_name(args.method))
    trainer = ContinualTrainer(model, config, ByT5Tokenizer(), peft_config=adapters, callbacks=[progress])
    trainer.remove_callback(PrinterCallback)  # one line per task instead of every log
    try:
        report = trainer.train_continual(
            keyword_task_stream(args.tasks, args.train_examples, args.eval_examples, filler=(0, 0))
        )
    except ValueError as error:  # a run dir of another run: refused before anything is written
        if trainer.is_world_process_zero():
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    if not trainer.is_world_process_zero():
        return report
    print_report(report)
    print(f"metrics: {args.output_dir}/continual_metrics.json")
    return report


if __name__ == "__main__":
    main()

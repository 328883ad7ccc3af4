"""The demo's ledgers, measured: their size next to the merged checkpoint's, and every task's accuracy after
reverting task k from the final model (the base + the ledger of the other tasks), for each method.

    python benchmarks/ledger_revert.py runs/demo                # after make demo (the stream of seed 42)
    python benchmarks/ledger_revert.py runs/demo --seed 42 --out docs/results/demo_ledger.md
"""

from __future__ import annotations

import os
import platform

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning
if platform.machine().lower() in ("x86_64", "amd64") and "ATEN_CPU_CAPABILITY" not in os.environ:
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"  # the demo's CPU kernels (see recipes/demo.py): its answers, exactly
    os.environ.setdefault("MKL_CBWR", "AVX2")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the demo's output root (runs/demo): one run dir per method")
    parser.add_argument("--model_dir", default=os.path.join("models", "SmolLM2-135M-Instruct"))
    parser.add_argument("--seed", type=int, default=42, help="the demo's seed (its stream)")
    parser.add_argument("--train_examples", type=int, default=192)
    parser.add_argument("--eval_examples", type=int, default=32)
    parser.add_argument("--max_source_length", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jumplora_hf.bench.generation import evaluate_tasks
    from jumplora_hf.bench.synthetic import standard_like_stream
    from jumplora_hf.data import encode_task
    from jumplora_hf.ledger import TaskLedger
    from jumplora_hf.methods import display_name

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tasks = standard_like_stream(4, args.train_examples, args.eval_examples, seed=args.seed)
    encoded = [encode_task(t, tokenizer, False, args.max_source_length) for t in tasks]
    checkpoint = _size(os.path.join(args.model_dir, "model.safetensors"))
    lines = ["| method | ledger (4 tasks) | merged checkpoint | ledger / checkpoint |", "|---|---|---|---|"]
    revert_lines = [
        "| method | reverted task | " + " | ".join(t.name for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    results = {}
    for method in sorted(os.listdir(args.root)):
        run_dir = os.path.join(args.root, method)
        if not os.path.isdir(os.path.join(run_dir, "ledger")):
            continue
        ledger = TaskLedger(run_dir)
        size = _size(os.path.join(run_dir, "ledger"))
        lines.append(
            f"| {display_name(method)} | {size / 2**20:.1f} MiB | {checkpoint / 2**20:.0f} MiB (float32) | {size / checkpoint:.3f} |"
        )
        names = [e.name for e in ledger.entries()]
        with torch.no_grad():
            final = evaluate_tasks(ledger.compose(copy.deepcopy(base)), tokenizer, encoded)
            rows = {"none": final}
            for name in names:
                rows[name] = evaluate_tasks(
                    ledger.compose(copy.deepcopy(base), [n for n in names if n != name]), tokenizer, encoded
                )
        for name, row in rows.items():
            cells = [f"**{100 * a:.1f}**" if t.name == name else f"{100 * a:.1f}" for t, a in zip(tasks, row)]
            revert_lines.append(
                f"| {display_name(method)} | {'– (the final model)' if name == 'none' else name} | "
                + " | ".join(cells)
                + " |"
            )
        results[method] = {"ledger_bytes": size, "checkpoint_bytes": checkpoint, "accuracy_after_revert": rows}
    text = (
        "\n".join(
            lines
            + [
                "",
                *revert_lines,
                "",
                "Accuracy (%) on each task (32 evaluation examples each); bold: the reverted task.",
            ]
        )
        + "\n"
    )
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)
    return text


if __name__ == "__main__":
    main()

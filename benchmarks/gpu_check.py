"""The prepared GPU check (benchmarks/gpu_check.sh runs it): one report with

1. `benchmarks/step_time.py` on the T5-large shape in bf16 at batch 32 × 512: PEFT LoRA, the JumpLoRA reference
   path and the fused layer, step time and peak memory, and their ratios;
2. a 3-task tiny sequence (tests/distributed_run.py, JumpLoRA + IncLoRA, per-block τ) in float32 on the CPU as the
   reference, then on the device under accelerate bf16 (accelerate_configs/single_gpu.yaml), DeepSpeed ZeRO-2 and
   ZeRO-3 (zero2.yaml, zero3.yaml, one process): wall time, the surviving count at every S_start against #A + #B,
   the merged weights against the base + the ledger's float32 updates rounded once (bit-exact), and against the
   float32 CPU run (max |Δ|: bf16 training drifts from it).

    bash benchmarks/gpu_check.sh                         # on a GPU machine, under 8 minutes on one H200
    python benchmarks/gpu_check.py --device cpu --tiny   # the same steps on CPU with tiny shapes (CI-sized)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "distributed_run.py")
CONFIGS = os.path.join(ROOT, "accelerate_configs")
SEQUENCES = [  # (row label, accelerate config file or None for a plain process, mixed precision)
    ("fp32, CPU (reference)", None, "no"),
    ("accelerate bf16", "single_gpu.yaml", "bf16"),
    ("DeepSpeed ZeRO-2 bf16", "zero2.yaml", "bf16"),
    ("DeepSpeed ZeRO-3 bf16", "zero3.yaml", "bf16"),
]


def step_time_command(device: str, tiny: bool) -> list[str]:
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "step_time.py"),
        "--dtype",
        "bfloat16",
        "--device",
        device,
        "--no-rss",
    ]
    if tiny:
        return command + [
            "--model",
            "t5-base",
            "--layers",
            "1",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--target-len",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
        ]
    return command + ["--model", "t5-large", "--batch", "32", "--seq-len", "512", "--steps", "10", "--warmup", "3"]


def sequence_command(config: str | None, precision: str, out: str, port: int) -> list[str]:
    runner = [RUNNER, out, "--method", "jumplora_inclora"]
    if config is None:
        return [sys.executable, *runner]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(CONFIGS, config),
        "--num_processes",
        "1",
        "--mixed_precision",
        precision,
        "--main_process_port",
        str(port),
        *runner,
    ]


def check_sequence(out: str, reference: dict | None) -> dict:
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny import tiny_t5

    from jumplora_hf.ledger import TaskLedger

    result = json.load(open(os.path.join(out, "result.json")))
    weights = load_file(os.path.join(out, "weights.safetensors"))
    dtype = next(iter(weights.values())).dtype
    rebuilt = dict(TaskLedger(out).compose(tiny_t5(tie_word_embeddings=False).to(dtype)).named_parameters())
    exact = all(torch.equal(w, rebuilt[n.removeprefix("base_model.model.") + ".weight"]) for n, w in weights.items())
    counts = result["survivors_at_s_start"]
    row = {
        "dtype": str(dtype).removeprefix("torch."),
        "count_ok": all(s == b for s, b in counts) and len(counts) > 0,
        "count_worst": max((abs(s - b) / b for s, b in counts), default=0.0),
        "merge_rounds_once": exact,
        "sparsity": [round(t["sparsity"]["mean"], 3) for t in result["report"]["per_task"]],
    }
    if reference is not None:
        row["vs_fp32"] = max(float((w.float() - reference[n].float()).abs().max()) for n, w in weights.items())
    return row, weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny step-time shapes (the CPU path, for CI)")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    started = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    print(f"## JumpLoRA GPU check ({args.device}{', tiny' if args.tiny else ''})\n", flush=True)

    done = subprocess.run(step_time_command(args.device, args.tiny), cwd=ROOT, env=env, capture_output=True, text=True)
    print("### Step time and memory (benchmarks/step_time.py)\n")
    print(done.stdout.strip() if done.returncode == 0 else f"step_time.py failed:\n{done.stderr[-3000:]}")
    failures = int(done.returncode != 0)

    root = args.out or tempfile.mkdtemp(prefix="jumplora_gpu_check_")
    print("\n### A 3-task tiny sequence in each precision\n")
    print(
        "| run | weights | wall time s | count at S_start = #A + #B | merged = base + ledger, rounded once | max abs diff vs fp32 CPU | sparsity per task |"
    )
    print("|---|---|---|---|---|---|---|")
    reference = None
    for index, (label, config, precision) in enumerate(SEQUENCES):
        out = os.path.join(root, f"run{index}")
        run_env = {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
        if config is None:
            run_env["CUDA_VISIBLE_DEVICES"] = ""  # the float32 reference on the CPU
        tic = time.time()
        done = subprocess.run(
            sequence_command(config, precision, out, 29700 + index),
            cwd=ROOT,
            env=run_env,
            capture_output=True,
            text=True,
        )
        wall = time.time() - tic
        if done.returncode != 0:
            failures += 1
            print(
                f"| {label} | – | {wall:.0f} | failed: {done.stderr.strip().splitlines()[-1][:120] if done.stderr.strip() else done.returncode} | | | |"
            )
            continue
        row, weights = check_sequence(out, reference)
        if reference is None:
            reference = weights
        count = "yes" if row["count_ok"] else f"no (worst {100 * row['count_worst']:.2f}%)"
        failures += int(not row["count_ok"] or not row["merge_rounds_once"])
        print(
            f"| {label} | {row['dtype']} | {wall:.0f} | {count} | {'yes' if row['merge_rounds_once'] else 'no'} | "
            f"{row.get('vs_fp32', 0.0):.2e} | {row['sparsity']} |",
            flush=True,
        )
    print(f"\ntotal {time.time() - started:.0f} s; {failures} failed check(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-process memory of JumpLoRA's own state under DeepSpeed ZeRO-3, for Llama-3.1-8B- and 70B-shaped models.

    python benchmarks/entry_memory.py                       # the table (models on the meta device: nothing allocated)
    python benchmarks/entry_memory.py --measure             # + measured: 1, 2 and 4 gloo processes on a tiny T5
    python benchmarks/entry_memory.py --tasks 4 --ranks 1 8 16 64

What JumpLoRA keeps beside the model, per process, after `--tasks` finished tasks (bf16 base weights, as on an H200):
- device, steady: the float32 merged copy of every adapted weight (bf16 weights are re-cast from it after each merge)
  and, for the ELLA methods, W_past; both hold only the process's ZeRO-3 partition of each weight;
- device, task-end peak: the steady state + every adapter (A, B, τ) gathered whole (bf16) + the workspace of merging
  the largest layer (its whole ΔW_final in float32, two boolean masks, the support of the process's entries);
- host: one support bit per entry of the process's partition per finished task (for the overlap of later tasks).

Every number comes from the package's own code on a model built on the meta device: the partition is
`entries.partition_for_rank` (DeepSpeed's rule), the state is what `JumpLoraLinear.allocate_entry_state` allocates,
the workspace what `merge_workspace_nbytes` runs (`final_delta` on meta tensors), the supports `metrics.pack_support`.
"before" is the same run with the code before the state was partitioned: everything whole on every process, and the
merge gathering every adapted base weight at once.

`--measure` launches `tests/distributed_run.py` (ZeRO-3, bf16, jumplora_ella, 2 tasks) with 1, 2 and 4 processes over
gloo on a tiny T5 (d_model 35: with 4 processes the partitions need padding), where every process counts the bytes its layers
and its record actually hold, and prints them beside the 1-process figure divided by N.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3
MODELS = {  # Llama-3.1 shapes (config.json of meta-llama/Llama-3.1-8B and -70B)
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}
TARGETS = {"q/v": ["q_proj", "v_proj"], "all-linear": "all-linear"}
METHODS = ("jumplora_inclora", "jumplora_ella")


def meta_model(name: str, targets):
    from transformers import LlamaConfig, LlamaForCausalLM

    from jumplora_hf import JumpLoraConfig, get_jumplora_model

    config = LlamaConfig(**MODELS[name], num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    adapters = JumpLoraConfig(r=8, lora_alpha=32, target_modules=targets, use_jumprelu=True)
    return get_jumplora_model(model, adapters).to(torch.bfloat16)  # the bf16 engine's cast, adapters included


def per_rank_bytes(model, ranks: int, method: str, tasks: int, support_cache: dict) -> dict:
    """Process 0's bytes (the largest partition) with `ranks` processes, from the package's allocation code."""
    from jumplora_hf.entries import partition_for_rank
    from jumplora_hf.layer import iter_jumplora_layers
    from jumplora_hf.metrics import pack_support

    steady = workspace = support = adapters = whole_weights = 0
    for _, layer in iter_jumplora_layers(model):
        layer.merged_weight_fp32, layer.ella_w_past, layer.jump_partition = None, None, None
        partition = partition_for_rank((layer.out_features, layer.in_features), 0, ranks)
        layer.allocate_entry_state(partition, w_past=method.endswith("ella"))
        steady += layer.entry_state_nbytes()
        workspace = max(workspace, layer.merge_workspace_nbytes("default"))
        local = partition.end - partition.start
        if local not in support_cache:
            support_cache[local] = pack_support(np.zeros(local, dtype=bool)).nbytes
        support += tasks * support_cache[local]
        adapters += sum(p.numel() * p.element_size() for n, p in layer.named_parameters() if "lora_" in n)
        whole_weights += layer.get_base_layer().weight.numel() * layer.get_base_layer().weight.element_size()
        layer.merged_weight_fp32, layer.ella_w_past, layer.jump_partition = None, None, None
    return {
        "steady": steady,
        "peak": steady + adapters + workspace,
        "host": support,
        "largest_layer_fp32": workspace,
        "whole_weights": whole_weights,
        "adapters": adapters,
    }


def table(ranks_list, tasks: int) -> list[dict]:
    rows, cache = [], {}
    for model_name in MODELS:
        for target_name, targets in TARGETS.items():
            model = meta_model(model_name, targets)
            for method in METHODS:
                before = per_rank_bytes(model, 1, method, tasks, cache)
                before_peak = before["steady"] + before["whole_weights"] + before["adapters"]
                for ranks in ranks_list:
                    now = per_rank_bytes(model, ranks, method, tasks, cache)
                    rows.append(
                        {
                            "model": model_name,
                            "targets": target_name,
                            "method": method,
                            "ranks": ranks,
                            "before_steady": before["steady"],
                            "before_peak": before_peak,
                            "before_host": before["host"],
                            **now,
                            "target": before_peak / ranks + now["largest_layer_fp32"],
                        }
                    )
    return rows


def print_table(rows, tasks: int) -> None:
    print(f"Per-process GiB of JumpLoRA's own state after {tasks} tasks, bf16 base weights, r 8 (ZeRO-3, process 0)\n")
    print(
        "| model | targets | method | processes | device steady | device peak (task end) | host (supports) | "
        "before: steady / peak / host | before peak / N + one layer |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "✓" if r["peak"] <= r["target"] else "✗"
        print(
            f"| {r['model']} | {r['targets']} | {r['method']} | {r['ranks']} | {r['steady'] / GIB:.2f} | "
            f"{r['peak'] / GIB:.2f} | {r['host'] / GIB:.2f} | {r['before_steady'] / GIB:.1f} / "
            f"{r['before_peak'] / GIB:.1f} / {r['before_host'] / GIB:.1f} | {r['target'] / GIB:.2f} {ok} |"
        )


# ----------------------------------------------------------------------------- measured, gloo processes
def measure(processes_list, out_root: str) -> list[dict]:
    runner = os.path.join(ROOT, "tests", "distributed_run.py")
    config = os.path.join(ROOT, "accelerate_configs", "zero3.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for processes in processes_list:
        out = os.path.join(out_root, f"n{processes}")
        port = 29400 + processes
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            config,
            "--num_processes",
            str(processes),
            "--mixed_precision",
            "bf16",
            "--main_process_port",
            str(port),
            runner,
            out,
            "--method",
            "jumplora_ella",
            "--tasks",
            "2",
            "--d_model",
            "35",
            "--memory_report",
        ]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise RuntimeError(f"{processes} processes failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        for rank in range(processes):
            with open(os.path.join(out, f"memory-rank{rank}.json"), encoding="utf-8") as f:
                results.append({"processes": processes, "rank": rank, **json.load(f)})
    return results


def print_measured(results) -> None:
    single = next(r for r in results if r["processes"] == 1)
    print(
        "\nMeasured (tiny T5, d_model 35, q/v, jumplora_ella, 2 tasks, ZeRO-3 bf16, gloo): bytes each process holds\n"
    )
    print("| processes | rank | device state | host supports | merge workspace | 1-process state / N |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['processes']} | {r['rank']} | {r['state_bytes']} | {r['support_bytes']} | {r['workspace_bytes']} | "
            f"{single['state_bytes'] / r['processes']:.0f} |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--tasks", type=int, default=15, help="finished tasks (supports kept; 15: Long Sequence)")
    parser.add_argument("--measure", action="store_true", help="also measure 1, 2 and 4 gloo processes")
    parser.add_argument("--measure_only", action="store_true", help="only the measured part (tests)")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args(argv)
    out = {}
    if not args.measure_only:
        rows = table(args.ranks, args.tasks)
        print_table(rows, args.tasks)
        out["table"] = rows
    if args.measure or args.measure_only:
        with tempfile.TemporaryDirectory(prefix="jumplora_memory_") as tmp:
            results = measure([1, 2, 4], tmp)
        print_measured(results)
        out["measured"] = results
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

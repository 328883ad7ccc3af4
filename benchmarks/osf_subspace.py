"""How much of each OSF task's update leaves the complement of the subspace PEFT's OSF preserves, measured after the
fact from finished runs' ledgers (amendment 3 of the comparison's protocol, docs/RESULTS.md).

PEFT's OSF projects the *gradients* of U_low and V_low out of the top-k_t singular directions of the weight; AdamW
divides each entry of the step by its own second moment, so an update can leave that complement. For task t of a
run: W_{t-1} = W_0 + Σ_{s<t} ΔW_s (the ledger's updates, float32), its top-k_t singular vectors U_h, V_h (k_t per
layer from the run's `continual_metrics.json`), and the leak of ΔW_t

    max(‖U_hᵀ ΔW_t‖_F, ‖ΔW_t V_h‖_F) / ‖ΔW_t‖_F

as `tests/test_osf.py` measures it inside a run (0 for an update in the complement; SGD's updates give ~1e-4; an
update in random directions about √(k_t / min(d_out, d_in))).

    # docs/results/comparison/osf_subspace.md, from a worker's run dirs (the ledgers are not kept in the repo):
    cd runs/forgetting/test/order1 && PYTHONPATH=$REPO python $REPO/benchmarks/osf_subspace.py \
        --model $REPO/models/SmolLM2-135M-Instruct --runs osf/seed4[3-6] --out $REPO/docs/results/comparison

Writes `osf_subspace.json` (every layer) and `osf_subspace.md` (per run and task: mean and max over layers) to
--out. Task 1 has no earlier update but its own preserved subspace (of W_0), so it is measured too.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

from jumplora_hf.ledger import TaskLedger, load_model, module_name  # noqa: E402


def subspace_leak(weight: torch.Tensor, delta: torch.Tensor, k: int) -> float:
    """max(‖U_hᵀΔW‖, ‖ΔW V_h‖) / ‖ΔW‖ for the top-k singular vectors of `weight` (0 when k is 0)."""
    norm = float(delta.norm())
    if k == 0 or norm == 0.0:
        return 0.0
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    delta = delta.double()
    return max(float((u[:, :k].T @ delta).norm()), float((delta @ vh[:k].T).norm())) / norm


def run_leaks(run_dir: str, base_model: torch.nn.Module) -> list[dict[str, float]]:
    """Per task of the OSF run in `run_dir`, in training order: {module name: leak}."""
    with open(os.path.join(run_dir, "continual_metrics.json")) as f:
        report = json.load(f)
    if report.get("method") != "osf":
        raise ValueError(f"{run_dir} is a {report.get('method')!r} run: only method 'osf' preserves a subspace")
    entries = TaskLedger(run_dir).entries()
    if len(entries) != len(report["per_task"]):
        raise ValueError(
            f"{run_dir}: the ledger holds {len(entries)} tasks and the report {len(report['per_task'])}; "
            "measure finished runs only"
        )
    weights: dict[str, torch.Tensor] = {}
    leaks = []
    for entry, task in zip(entries, report["per_task"]):
        ranks = {module_name(name): k for name, k in task["osf_preserved_rank"].items()}
        per_layer = {}
        for module, update in entry.layers().items():
            if module not in weights:
                weights[module] = base_model.get_submodule(module).weight.detach().float().clone()
            delta = update.dense()
            per_layer[module] = subspace_leak(weights[module], delta, ranks[module])
            weights[module] += delta
        leaks.append(per_layer)
    return leaks


def markdown(results: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "# OSF: the share of each update outside the preserved subspace's complement",
        "",
        "`benchmarks/osf_subspace.py`: max(‖U_hᵀΔW_t‖, ‖ΔW_t V_h‖) / ‖ΔW_t‖ per adapted layer, U_h / V_h the top-k_t "
        "singular vectors of the weight task t started from (rebuilt from the run's ledger), k_t the run's preserved "
        "rank; 0 when the update stays in the complement PEFT projects the gradients onto, about "
        "√(k_t / min(d_out, d_in)) for an update blind to the subspace (random directions).",
        "",
        "| run | task | layers | mean | median | max |",
        "|---|---|---|---|---|---|",
    ]
    for run, tasks in results.items():
        for index, per_layer in enumerate(tasks, 1):
            values = list(per_layer.values())
            lines.append(
                f"| {run} | {index} | {len(values)} | {statistics.fmean(values):.3f} | "
                f"{statistics.median(values):.3f} | {max(values):.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the base model the runs started from (a local folder)")
    parser.add_argument("--runs", nargs="+", required=True, help="finished OSF run dirs (with their ledger/)")
    parser.add_argument("--out", required=True, help="folder for osf_subspace.json and osf_subspace.md")
    args = parser.parse_args(argv)
    missing = [run for run in args.runs if not os.path.isfile(os.path.join(run, "continual_metrics.json"))]
    if missing:
        parser.error(f"not a finished run dir (no continual_metrics.json): {missing}")
    base = load_model(args.model)
    results = {os.path.normpath(run): run_leaks(run, base) for run in args.runs}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "osf_subspace.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(results)
    with open(os.path.join(args.out, "osf_subspace.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

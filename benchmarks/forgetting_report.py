"""The report of the pre-registered forgetting experiment (docs/RESULTS.md): tables, paired differences with 95%
confidence intervals over seeds, per-seed signs, sparsity and overlap per task, the dev study, and a plot of τ and
of the gate's density over each task from the runs' log_history.jsonl.

    python benchmarks/forgetting_report.py --root runs/forgetting --out docs/results/forgetting
    python benchmarks/forgetting_report.py --root /work/exp/runs/forgetting --dev_root /work/exp2/runs/forgetting --out docs/results/forgetting

Unfinished runs are listed and left out (the tables say n per cell).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402

from jumplora_hf import metrics  # noqa: E402
from jumplora_hf.methods import display_name  # noqa: E402

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
PAIRS = (("jumplora_inclora", "inclora"), ("jumplora_ella", "ella"))


def load_runs(root: str, prefix: str) -> dict[tuple[str, str, int], dict]:
    """{(order, method, seed): report} of the finished runs under root/<prefix>/<order>/<method>/seed<seed>."""
    runs = {}
    for path in glob.glob(os.path.join(root, prefix, "*", "*", "seed*", "continual_metrics.json")):
        seed_dir = os.path.dirname(path)
        method_dir, seed = os.path.split(seed_dir)
        order_dir, method = os.path.split(method_dir)
        report = json.load(open(path))
        done = report.get("single_task_baselines") and len(report.get("single_task_accuracies") or []) == 4
        if not report.get("single_task_baselines"):
            done = (
                bool(report["accuracy_matrix"])
                and all(v is not None for v in report["accuracy_matrix"][-1])
                and len(report["tasks"]) == 4
            )
        if done:
            report["_dir"] = seed_dir
            report["_root"] = root  # the run's path under it is kept when it is published
            report["_machine"] = machine(seed_dir)
            runs[os.path.basename(order_dir), method, int(seed.removeprefix("seed"))] = report
    return runs


def machine(run_dir: str) -> str:
    """ "GPU" or "CPU": where the run's last start trained it (run_info.json; runs before the GPU pool: the CPU)."""
    path = os.path.join(run_dir, "run_info.json")
    if not os.path.exists(path):
        return "CPU"
    starts = json.load(open(path)).get("starts") or [{}]
    return "GPU" if "GPU" in starts[-1].get("machine", "") or "H200" in starts[-1].get("machine", "") else "CPU"


VARIANT_LABELS = {"taulr10": "τ lr ×10", "taulr100": "τ lr ×100", "auto": "auto-λ"}


def name(method: str) -> str:
    """The display name of a method, or of a variant `method@variant` (a test run of an option chosen on dev)."""
    base, _, variant = method.partition("@")
    return display_name(base) + (f" ({VARIANT_LABELS.get(variant, variant)})" if variant else "")


def comparisons(methods: set[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs present in `methods`: JumpLoRA + X − X, and each variant against its default."""
    pairs = [(m, b) for m, b in PAIRS if m in methods and b in methods]
    for method in sorted(m for m in methods if "@" in m):
        base, _, variant = method.partition("@")
        pairs += [(method, base)] if base in methods else []
        for jump, plain in PAIRS:
            if base == jump and plain in methods:
                pairs.append((method, plain))
            if base == jump and f"{plain}@{variant}" in methods:
                pairs.append((method, f"{plain}@{variant}"))
    return pairs


def summary(report: dict, a0: list[float] | None) -> dict:
    acc = report["accuracy_matrix"]
    return {
        "OA": metrics.overall_accuracy(acc),
        "BWT": metrics.backward_transfer(acc),
        "FWT": metrics.forward_transfer(acc, a0) if a0 else None,
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% t confidence interval (in percentage points)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return 100 * mean, math.nan, math.nan
    half = T_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return 100 * mean, 100 * (mean - half), 100 * (mean + half)


def tables(runs: dict, title: str) -> list[str]:
    lines = [
        f"#### {title}",
        "",
        "| order | method | seeds | OA | BWT | FWT | sparsity of the last update |",
        "|---|---|---|---|---|---|---|",
    ]
    a0 = {(o, s): r["single_task_accuracies"] for (o, m, s), r in runs.items() if m == "single_task"}
    keys = sorted({(o, m) for o, m, _ in runs if m != "single_task"}, key=lambda k: (k[0], name(k[1])))
    for order, method in keys:
        seeds = sorted(s for o, m, s in runs if (o, m) == (order, method))
        rows = [summary(runs[order, method, s], a0.get((order, s))) for s in seeds]
        sparsity = [runs[order, method, s]["per_task"][-1]["sparsity"]["mean"] for s in seeds]
        fwt = [r["FWT"] for r in rows if r["FWT"] is not None]
        lines.append(
            f"| {order} | {name(method)} | {', '.join(map(str, seeds))} | {mean_std([r['OA'] for r in rows])} | "
            f"{mean_std([r['BWT'] for r in rows])} | {mean_std(fwt)}{'' if len(fwt) in (0, len(rows)) else f' (n={len(fwt)})'} | {mean_std(sparsity)} |"
        )
    lines += ["", "Mean ± sample std (ddof=1) over seeds, in %.", ""]
    lines += [
        "#### JumpLoRA minus its base method, paired by seed (percentage points)",
        "",
        "| order | comparison | seeds | ΔOA (95% CI) | ΔBWT (95% CI) | sign of ΔBWT per seed |",
        "|---|---|---|---|---|---|",
    ]
    for order in sorted({o for o, _ in keys}):
        for method, base in comparisons({m for o, m in keys if o == order}):
            seeds = sorted(s for o, m, s in runs if (o, m) == (order, method) and (order, base, s) in runs)
            if not seeds:
                continue
            d_oa = [
                summary(runs[order, method, s], None)["OA"] - summary(runs[order, base, s], None)["OA"] for s in seeds
            ]
            d_bwt = [
                summary(runs[order, method, s], None)["BWT"] - summary(runs[order, base, s], None)["BWT"]
                for s in seeds
            ]
            fmt = lambda m, lo, hi: f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" if not math.isnan(lo) else f"{m:+.1f}"
            signs = " ".join(f"{s}:{'+' if d > 0 else '−' if d < 0 else '0'}" for s, d in zip(seeds, d_bwt))
            lines.append(
                f"| {order} | {name(method)} − {name(base)} | {', '.join(map(str, seeds))} | "
                f"{fmt(*ci(d_oa))} | {fmt(*ci(d_bwt))} | {signs} |"
            )
    lines += ["", "95% CI: Student's t with n − 1 degrees of freedom over the per-seed differences.", ""]
    lines += [
        "#### Per seed (%)",
        "",
        "| order | method | seed | OA | BWT | FWT | trained on |",
        "|---|---|---|---|---|---|---|",
    ]
    for order, method in keys:
        for s in sorted(s for o, m, s in runs if (o, m) == (order, method)):
            row = summary(runs[order, method, s], a0.get((order, s)))
            fwt = "–" if row["FWT"] is None else f"{100 * row['FWT']:.1f}"
            lines.append(
                f"| {order} | {name(method)} | {s} | {100 * row['OA']:.1f} | {100 * row['BWT']:.1f} | {fwt} | "
                f"{runs[order, method, s]['_machine']} |"
            )
    return lines + [""]


def matrices(runs: dict) -> list[str]:
    lines = []
    for order, method in sorted({(o, m) for o, m, _ in runs if m != "single_task"}):
        seeds = sorted(s for o, m, s in runs if (o, m) == (order, method))
        reports = [runs[order, method, s] for s in seeds]
        tasks = reports[0]["tasks"]
        lines += [
            f"**{order} · {name(method)}** (mean of seeds {', '.join(map(str, seeds))})",
            "",
            "| after \\ on | " + " | ".join(tasks) + " |",
            "|---" * (len(tasks) + 1) + "|",
        ]
        for i, task_name in enumerate(tasks):
            cells = [
                statistics.fmean(r["accuracy_matrix"][i][j] for r in reports)
                if j <= i and all(r["accuracy_matrix"][i][j] is not None for r in reports)
                else None
                for j in range(len(tasks))
            ]
            lines.append(f"| {task_name} | " + " | ".join("" if c is None else f"{100 * c:.1f}" for c in cells) + " |")
        sparsity = [statistics.fmean(r["per_task"][i]["sparsity"]["mean"] for r in reports) for i in range(len(tasks))]
        overlap = [
            statistics.fmean(r["per_task"][i]["jaccard_with_previous"]["mean"] for r in reports)
            for i in range(1, len(tasks))
        ]
        lines += [
            "",
            "Sparsity of each task's merged update (%): "
            + ", ".join(f"{100 * v:.1f}" for v in sparsity)
            + ". Mean Jaccard with the earlier tasks: "
            + ", ".join(f"{v:.3f}" for v in overlap)
            + ".",
            "",
        ]
    return lines


def dev_tables(runs: dict) -> list[str]:
    if not runs:
        return ["No finished runs yet.", ""]
    lines = [
        "| variant | method | seeds | dev OA | dev BWT | sparsity of the last update | λ per task (tasks 2-4) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, method in sorted({(o, m) for o, m, _ in runs}):
        seeds = sorted(s for o, m, s in runs if (o, m) == (variant, method))
        rows = [summary(runs[variant, method, s], None) for s in seeds]
        lambdas = [[t.get("ella_lambda") for t in runs[variant, method, s]["per_task"][1:]] for s in seeds]
        lam = (
            "; ".join(", ".join("–" if v is None else f"{v:.3g}" for v in row) for row in lambdas)
            if any(any(v is not None for v in row) for row in lambdas)
            else "–"
        )
        sparsity = [runs[variant, method, s]["per_task"][-1]["sparsity"]["mean"] for s in seeds]
        lines.append(
            f"| {variant} | {name(method)} | {', '.join(map(str, seeds))} | {mean_std([r['OA'] for r in rows])} | "
            f"{mean_std([r['BWT'] for r in rows])} | {mean_std(sparsity)} | {lam} |"
        )
    return lines + [""]


def plot_tau_and_density(run_dirs: dict[str, str], path: str, title: str) -> str | None:
    """τ (top) and the gate's density 1 − sparsity of ΔW_jump (bottom) over each task's steps, one line per run."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(11, 6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4, sharey="row", squeeze=False)
    for label, run_dir in run_dirs.items():
        logs = {}
        for line in open(os.path.join(run_dir, "log_history.jsonl")):
            entry = json.loads(line)
            if "loss" in entry and "jump/tau_mean" in entry:
                logs[entry["step"]] = entry  # a resumed task logs again: the last line of a step wins
        by_task: dict[int, list[dict]] = {}
        for step in sorted(logs):
            by_task.setdefault(logs[step]["task"], []).append(logs[step])
        for task, entries in sorted(by_task.items()):
            first = (
                entries[0]["step"] - entries[0].get("task_step", 2)
                if "task_step" in entries[0]
                else entries[0]["step"] - 2
            )
            steps = [e["step"] - first for e in entries]
            ready = [(s, e) for s, e in zip(steps, entries) if e["jump/tau_mean"] > 1e-30]
            axes[0, task].plot([s for s, _ in ready], [e["jump/tau_mean"] for _, e in ready], marker=".", label=label)
            dense = [(s, 1 - e["jump/sparsity"]) for s, e in zip(steps, entries) if "jump/sparsity" in e]
            axes[1, task].plot([s for s, _ in dense], [100 * d for _, d in dense], marker=".", label=label)
    names = ["dbpedia", "amazon", "yahoo", "agnews"]
    for task in range(4):
        axes[0, task].set_title(f"task {task + 1}: {names[task]}")
        axes[1, task].set_xlabel("step within the task")
    axes[0, 0].set_ylabel("τ (log scale)")
    axes[0, 0].set_yscale("log")  # sharey: every τ panel
    axes[1, 0].set_ylabel("gate density (%)\n(entries of ΔW_jump ≠ 0)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def publish(reports: list[dict], out: str) -> None:
    """Copy each run's reports (not its state or ledger) into out/<its path under root>.

    Copied back into a worker's runs/forgetting, a finished run counts as finished there: that is how the experiment
    goes on in a later session on a machine that kept only the repository.
    """
    for report in reports:
        source = report["_dir"]
        dest = os.path.join(out, os.path.relpath(source, report["_root"]))
        if os.path.realpath(dest) == os.path.realpath(source):
            continue
        os.makedirs(dest, exist_ok=True)
        for filename in os.listdir(source):
            if filename.endswith((".json", ".csv", ".png", ".jsonl", ".log")) and not filename.startswith(
                "continual_state"
            ):
                shutil.copy2(os.path.join(source, filename), dest)
    # the copies are the only record that outlives the machine: say so if git would not keep them
    ignored = subprocess.run(["git", "check-ignore", "-q", out], capture_output=True)
    if ignored.returncode == 0:
        print(
            f"WARNING: git ignores {out}; `git add -f` it or fix .gitignore, else the runs are lost with the machine"
        )


def replica_table(test: dict, replica: dict) -> list[str]:
    """The same run trained on the CPU and again on the GPU (either way round): how much the machine alone moves OA
    and BWT."""
    pairs = []
    for key in sorted(k for k in replica if k in test and replica[k]["_machine"] != test[k]["_machine"]):
        both = {test[key]["_machine"]: test[key], replica[key]["_machine"]: replica[key]}
        pairs.append((key, summary(both["CPU"], None), summary(both["GPU"], None)))
    if not pairs:
        return ["No replicated run has finished.", ""]
    lines = [
        "| order | method | seed | OA CPU | OA GPU | BWT CPU | BWT GPU | GPU − CPU OA | GPU − CPU BWT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (order, method, seed), cpu, gpu in pairs:
        lines.append(
            f"| {order} | {name(method)} | {seed} | {100 * cpu['OA']:.1f} | {100 * gpu['OA']:.1f} | "
            f"{100 * cpu['BWT']:.1f} | {100 * gpu['BWT']:.1f} | {100 * (gpu['OA'] - cpu['OA']):+.1f} | "
            f"{100 * (gpu['BWT'] - cpu['BWT']):+.1f} |"
        )
    d_oa = [abs(gpu["OA"] - cpu["OA"]) for _, cpu, gpu in pairs]
    d_bwt = [abs(gpu["BWT"] - cpu["BWT"]) for _, cpu, gpu in pairs]
    lines += [
        "",
        f"Mean |ΔOA| {100 * statistics.fmean(d_oa):.1f}, mean |ΔBWT| {100 * statistics.fmean(d_bwt):.1f} points "
        f"over {len(pairs)} run(s): the same code, flags, data and seed (CPU: one thread; GPU: H200, float32).",
        "",
    ]
    return lines


def load_variants(root: str) -> dict:
    """The test runs of the variants chosen on dev, keyed (order, "method@variant", seed)."""
    runs = {}
    for folder in sorted(glob.glob(os.path.join(root, "variant_*"))):
        variant = os.path.basename(folder).removeprefix("variant_")
        for (o, m, s), r in load_runs(root, os.path.basename(folder)).items():
            runs[o, f"{m}@{variant}", s] = r
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.join("runs", "forgetting"))
    parser.add_argument("--dev_root", default=None, help="where the dev study ran (default: --root)")
    parser.add_argument("--out", default=None, help="copy the reports and write report.md and the plots here")
    args = parser.parse_args(argv)
    dev_root = args.dev_root or args.root
    test = load_runs(args.root, "test")
    variants = load_variants(dev_root)
    replica = load_runs(args.root, os.path.join("replica", "test"))
    grid = {
        k: v
        for p in ("dev_lambda3e4", "dev_lambda3e5", "dev_lambda3e6")
        for k, v in {(p.removeprefix("dev_"), m, s): r for (o, m, s), r in load_runs(args.root, p).items()}.items()
    }
    dev = {}
    for prefix in ("dev_taulr1", "dev_taulr10", "dev_taulr100", "dev_auto", "dev_gridlambda"):
        for (o, m, s), r in load_runs(dev_root, prefix).items():
            dev[prefix.removeprefix("dev_"), m, s] = r
    lines = (
        ["### Test split", ""]
        + tables(test, "OA, BWT, FWT")
        + ["### Accuracy matrices (test, mean over seeds)", ""]
        + matrices(test)
    )
    lines += ["### λ grid (dev, ELLA, seed 42)", ""] + dev_tables(grid)
    lines += ["### Dev study: τ's learning-rate multiplier and auto-λ (dev, order 1)", ""] + dev_tables(dev)
    if variants:
        needed = {"single_task"}
        for _, method, _ in variants:
            base = method.partition("@")[0]
            needed |= {base} | {plain for jump, plain in PAIRS if jump == base}
        bases = {k: r for k, r in test.items() if k[1] in needed}
        lines += ["### Variants chosen on dev, test split (labelled; not the protocol's default)", ""]
        lines += tables({**bases, **variants}, "OA, BWT, FWT of the variants and their baselines")
    lines += ["### The machine's effect: runs trained again on the other machine", ""] + replica_table(test, replica)
    for machine in ("CPU", "GPU"):
        if not any(r["_machine"] == machine for r in replica.values()):
            continue
        alone = {k: r for k, r in test.items() if r["_machine"] == machine}
        alone |= {k: r for k, r in replica.items() if r["_machine"] == machine}
        lines += [f"### Secondary: the {machine} runs alone (a replica in place of a run of the other machine)", ""]
        lines += tables(alone, f"OA, BWT, FWT ({machine} runs only)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(text + "\n")
        reports = [*test.values(), *grid.values(), *dev.values(), *variants.values(), *replica.values()]
        publish(reports, os.path.join(args.out, "runs"))
        jump = {
            f"seed {s} ({r['_machine']})": r["_dir"]
            for (o, m, s), r in sorted(test.items())
            if o == "order1" and m == "jumplora_inclora"
        }
        if jump:
            title = "JumpLoRA + IncLoRA, order 1: τ and the gate's density over each task (test runs)"
            plot_tau_and_density(jump, os.path.join(args.out, "tau_and_density_order1.png"), title)
        tau_lr = {
            f"τ lr ×{v.removeprefix('taulr')}, seed {s}": r["_dir"]
            for (v, m, s), r in sorted(dev.items())
            if v.startswith("taulr")
        }
        if tau_lr:
            title = "JumpLoRA + IncLoRA, order 1, dev: τ and the gate's density for τ's learning-rate multipliers"
            plot_tau_and_density(tau_lr, os.path.join(args.out, "tau_and_density_dev_taulr.png"), title)


if __name__ == "__main__":
    main()

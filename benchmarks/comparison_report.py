"""The report of the pre-registered comparison (docs/RESULTS.md, "Against O-LoRA and PEFT's OSF"): Standard CL order 1
with all seven methods, the protocol's paired differences with 95% intervals, the Long Sequence pair (order 4), and
the methods' cost from `benchmarks/method_cost.py --json`, and each run with the commits and machines it ran on.

    # from the finished runs' reports kept in the repo (what docs/results/comparison/report.md is made from):
    python benchmarks/comparison_report.py --root docs/results/comparison/runs \
        --cost docs/results/comparison/method_cost.json --out docs/results/comparison
    # from a worker's run dirs (also lists the runs still going):
    python benchmarks/comparison_report.py --root runs/forgetting --out /tmp/comparison

Reads the runs of `benchmarks/forgetting.py work --plan comparison` (root/test/<order>/<method>/seed<seed>); a run
counts when every task of its order has been evaluated. Unfinished runs are left out and listed; every cell says its
seeds. FWT uses the a0 of root/test/<order>/single_task/seed<seed> where that run has finished.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402

from forgetting_report import ci, mean_std, summary  # noqa: E402

from jumplora_hf.methods import display_name  # noqa: E402

SC_METHODS = ("inclora", "ella", "olora", "osf", "jumplora_inclora", "jumplora_ella", "jumplora_olora")
# the protocol's paired comparisons (method − baseline), then the two of the forgetting experiment, for reference
SC_PAIRS = (
    ("jumplora_olora", "olora"),
    ("jumplora_inclora", "olora"),
    ("jumplora_ella", "olora"),
    ("jumplora_ella", "osf"),
    ("osf", "inclora"),
    ("jumplora_inclora", "inclora"),
    ("jumplora_ella", "ella"),
)
LS_PAIR = ("jumplora_inclora", "inclora")


def load(root: str, order: str) -> tuple[dict[tuple[str, int], dict], list[str]]:
    """{(method, seed): report} of the finished runs of `order`, and the run dirs that have not finished."""
    runs, unfinished = {}, []
    for seed_dir in sorted(glob.glob(os.path.join(root, "test", order, "*", "seed*"))):
        method, seed = seed_dir.split(os.sep)[-2], int(os.path.basename(seed_dir).removeprefix("seed"))
        path = os.path.join(seed_dir, "continual_metrics.json")
        report = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else None
        if report is None:
            unfinished.append(seed_dir)
        elif report.get("single_task_baselines"):
            a0 = report.get("single_task_accuracies") or []
            if len(a0) == len(report["tasks"]) and None not in a0:
                runs[method, seed] = report
            else:
                unfinished.append(seed_dir)
        elif report["accuracy_matrix"] and len(report["accuracy_matrix"]) == len(report["tasks"]):
            if None not in report["accuracy_matrix"][-1]:
                runs[method, seed] = report
            else:
                unfinished.append(seed_dir)
        else:
            unfinished.append(seed_dir)
    return runs, unfinished


def _sparse_stats(report: dict) -> tuple[float, float | None]:
    """Mean sparsity over the tasks' merged updates, and the mean Jaccard of each with the earlier ones."""
    per_task = report["per_task"]
    sparsity = statistics.fmean(t["sparsity"]["mean"] for t in per_task)
    jaccard = [t["jaccard_with_previous"]["mean"] for t in per_task[1:] if t.get("jaccard_with_previous")]
    return sparsity, statistics.fmean(jaccard) if jaccard else None


def _fmt_ci(values: list[float]) -> str:
    mean, low, high = ci(values)
    return f"{mean:+.1f}" if math.isnan(low) else f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def method_table(runs: dict, methods: tuple[str, ...], a0: dict[int, list[float]]) -> list[str]:
    lines = [
        "| method | seeds | OA | BWT | FWT | sparsity | Jaccard with earlier tasks |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        seeds = sorted(s for m, s in runs if m == method)
        if not seeds:
            lines.append(f"| {display_name(method)} | – | – | – | – | – | – |")
            continue
        rows = [summary(runs[method, s], a0.get(s)) for s in seeds]
        fwt = [r["FWT"] for r in rows if r["FWT"] is not None]
        stats = [_sparse_stats(runs[method, s]) for s in seeds]
        jaccard = [j for _, j in stats if j is not None]
        fwt_cell = mean_std(fwt) + ("" if len(fwt) in (0, len(rows)) else f" (n={len(fwt)})")
        lines.append(
            f"| {display_name(method)} | {', '.join(map(str, seeds))} | {mean_std([r['OA'] for r in rows])} | "
            f"{mean_std([r['BWT'] for r in rows])} | {fwt_cell} | {mean_std([s for s, _ in stats])} | "
            f"{(f'{statistics.fmean(jaccard):.3f}' if jaccard else '–')} |"
        )
    return lines + [
        "",
        "Mean ± sample std (ddof=1) over seeds, in %; sparsity: the share of exact zeros of the merged "
        "updates, mean over tasks (dense methods: about 0).",
        "",
    ]


def pair_table(runs: dict, pairs) -> list[str]:
    lines = [
        "| comparison | seeds | ΔOA (95% CI) | ΔBWT (95% CI) | sign of ΔBWT per seed |",
        "|---|---|---|---|---|",
    ]
    for method, base in pairs:
        seeds = sorted(s for m, s in runs if m == method and (base, s) in runs)
        if not seeds:
            lines.append(f"| {display_name(method)} − {display_name(base)} | – | – | – | – |")
            continue
        d_oa = [summary(runs[method, s], None)["OA"] - summary(runs[base, s], None)["OA"] for s in seeds]
        d_bwt = [summary(runs[method, s], None)["BWT"] - summary(runs[base, s], None)["BWT"] for s in seeds]
        signs = " ".join(f"{s}:{'+' if d > 0 else '−' if d < 0 else '0'}" for s, d in zip(seeds, d_bwt))
        lines.append(
            f"| {display_name(method)} − {display_name(base)} | {', '.join(map(str, seeds))} | {_fmt_ci(d_oa)} | "
            f"{_fmt_ci(d_bwt)} | {signs} |"
        )
    return lines + [
        "",
        "Percentage points; 95% CI: Student's t, n − 1 degrees of freedom, over the per-seed differences.",
        "",
    ]


def _starts(root: str, order: str, method: str, seed: int) -> list[dict]:
    path = os.path.join(root, "test", order, method, f"seed{seed}", "run_info.json")
    return json.load(open(path, encoding="utf-8")).get("starts", []) if os.path.exists(path) else []


def runs_table(root: str, order: str, runs: dict, methods: tuple[str, ...]) -> list[str]:
    """Each finished run with the commits and machines it ran on: one JumpLoRA run's result moves with the machine's
    rounding (RESULTS, "The same run on three machines"), so every number here says where it came from."""
    lines = [
        "| method | seed | OA | BWT | commits | machine (numerics fingerprint) | started |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, seed), report in sorted(
        ((key, report) for key, report in runs.items() if key[0] in methods),
        key=lambda item: (methods.index(item[0][0]), item[0][1]),
    ):
        row = summary(report, None)
        lines.append(
            f"| {display_name(method)} | {seed} | {100 * row['OA']:.1f} | {100 * row['BWT']:.1f} | "
            f"{_provenance(root, order, method, seed)} |"
        )
    return lines + ["", MACHINE_NOTE, ""]


def a0_table(root: str, order: str, runs: dict) -> list[str]:
    """The single-task runs FWT uses: each task's accuracy when trained alone from the base model, and provenance."""
    seeds = sorted(seed for method, seed in runs if method == "single_task")
    if not seeds:
        return []
    lines = [
        "| seed | a0 per task (%) | commits | machine (numerics fingerprint) | started |",
        "|---|---|---|---|---|",
    ]
    for seed in seeds:
        a0 = " ".join(f"{100 * a:.1f}" for a in runs["single_task", seed]["single_task_accuracies"])
        lines.append(f"| {seed} | {a0} | {_provenance(root, order, 'single_task', seed)} |")
    return lines + ["", MACHINE_NOTE, ""]


MACHINE_NOTE = (
    "Machine: `forgetting.py`'s hash of one forward and backward pass at the runs' shapes, recorded at each start "
    "from 2026-12-06 on; a run that restarted lists every commit and machine it ran on."
)


def _provenance(root: str, order: str, method: str, seed: int) -> str:
    """'commits | machines | started' of one run, from its run_info.json."""
    starts = _starts(root, order, method, seed)
    commits = ", ".join(dict.fromkeys(s["commit"][:7] for s in starts if s.get("commit"))) or "–"
    machines = ", ".join(dict.fromkeys(s.get("numerics") or "not recorded" for s in starts)) or "–"
    started = starts[0]["time"][:16] if starts and starts[0].get("time") else "–"
    return f"{commits} | {machines} | {started}"


def cost_table(path: str) -> list[str]:
    cost = json.load(open(path, encoding="utf-8"))
    first = cost["methods"][0]["runs"][0]
    options = cost["options"]
    model = options["model"] or f"the SmolLM2-135M shape ({options.get('layers', 30)} layers), random weights"
    lines = [
        f"`benchmarks/method_cost.py` ({first['device']}, {first['threads']} thread(s), {model}, "
        f"batch {options['batch']} × "
        f"{options['seq_len']} tokens, {options['steps']} steps per task, {options['rounds']} rounds, all methods in "
        "one run):",
        "",
        "| method | trainable parameters (task 2) | step (s) | × IncLoRA | task switch (s) | peak memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in cost["methods"]:
        peak = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {display_name(row['method'])} | {row['trainable']:,} | {row['step_s']:.2f} | {row['step_ratio']:.2f} "
            f"| {row['switch_s']:.2f} | {peak} |"
        )
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.join("runs", "forgetting"))
    parser.add_argument("--cost", default=None, help="the --json of benchmarks/method_cost.py")
    parser.add_argument("--out", default=os.path.join("docs", "results", "comparison"))
    options = parser.parse_args(argv)
    if not os.path.isdir(options.root):
        parser.error(f"no such folder: {options.root!r} (the runs of benchmarks/forgetting.py work --plan comparison)")
    if options.cost and not os.path.exists(options.cost):
        parser.error(f"no such file: {options.cost!r} (write it with benchmarks/method_cost.py --json)")

    sc, sc_unfinished = load(options.root, "order1")
    ls, ls_unfinished = load(options.root, "order4")
    a0 = {s: r["single_task_accuracies"] for (m, s), r in sc.items() if m == "single_task"}
    lines = ["# Against O-LoRA and PEFT's OSF: the report", ""]
    lines += ["## Standard CL, order 1 (test)", ""] + method_table(sc, SC_METHODS, a0)
    lines += ["### Paired by seed", ""] + pair_table(sc, SC_PAIRS)
    lines += ["## Long Sequence, order 4 (test)", ""] + method_table(ls, LS_PAIR[::-1], {})
    lines += pair_table(ls, [LS_PAIR])
    if options.cost:
        lines += ["## Cost per method", ""] + cost_table(options.cost)
    lines += ["## The runs", "", "### Standard CL, order 1", ""] + runs_table(options.root, "order1", sc, SC_METHODS)
    a0_rows = a0_table(options.root, "order1", sc)
    if a0_rows:
        lines += ["### Standard CL, order 1: the single-task runs (a0, for FWT)", ""] + a0_rows
    lines += ["### Long Sequence, order 4", ""] + runs_table(options.root, "order4", ls, LS_PAIR[::-1])
    unfinished = sc_unfinished + ls_unfinished
    if unfinished:
        lines += ["## Not finished (left out)", ""] + [f"- `{os.path.relpath(d, options.root)}`" for d in unfinished]
    os.makedirs(options.out, exist_ok=True)
    path = os.path.join(options.out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()

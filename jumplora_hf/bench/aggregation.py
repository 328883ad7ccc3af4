"""Mean ± std over seeds of continual runs: methods × task orders, the shape of the paper's Tables 1-2.

`aggregate_runs` groups run directories by (task order, method); `format_table` prints the groups as markdown
or CSV. Every number is recomputed from each run's accuracy matrix (`reports.run_summary`).
"""

from __future__ import annotations

import os
import re
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..methods import METHODS, display_name
from ..state import METRICS_FILE
from .reports import csv_text, format_number, is_finished, load_report, run_summary

METHOD_ORDER = tuple(METHODS)  # the registry's order: IncLoRA, ELLA, JumpLoRA + IncLoRA, JumpLoRA + ELLA
# OA (%) of the paper's Table 1 (mean over seeds 42-44), for `format_table(..., paper=PAPER_OA)`.
PAPER_OA = {
    "inclora": {"order1": 59.25, "order2": 58.69, "order3": 69.86, "order4": 56.83, "order5": 56.40, "order6": 54.32},
    "ella": {"order1": 78.09, "order2": 78.37, "order3": 78.23, "order4": 72.64, "order5": 67.91, "order6": 74.15},
    "jumplora_inclora": {
        "order1": 70.76,
        "order2": 69.26,
        "order3": 74.78,
        "order4": 65.35,
        "order5": 61.84,
        "order6": 64.06,
    },
    "jumplora_ella": {
        "order1": 78.84,
        "order2": 79.05,
        "order3": 78.67,
        "order4": 73.60,
        "order5": 68.76,
        "order6": 75.81,
    },
}

_SEED_DIR = re.compile(r"seed\d+")


@dataclass
class Stat:
    mean: float
    std: float | None  # sample standard deviation (ddof=1); None for a single value
    n: int


@dataclass
class GroupResult:
    """The runs (seeds) of one method on one task order."""

    order: str
    method: str
    run_dirs: list[str]
    tasks: list[str]
    overall_accuracy: Stat
    backward_transfer: Stat | None
    forward_transfer: Stat | None
    sparsity: Stat | None  # mean over adapted layers of the last task's merged update
    notes: list[str] = field(default_factory=list)
    finished_by_seed: dict[str, dict] = field(default_factory=dict)  # seed dir name -> run_summary of a finished run

    @property
    def n(self) -> int:
        return len(self.run_dirs)


def _stat(values: Iterable[float | None]) -> Stat | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def run_label(run_dir: str, method: str) -> str:
    """The task order of a run, from the layout `runs/<order>/<method>/seed<seed>` (or `runs/<label>/<method>`)."""
    parent, base = os.path.split(os.path.normpath(os.path.abspath(run_dir)))
    if _SEED_DIR.fullmatch(base):
        return os.path.basename(os.path.dirname(parent))
    if base == method:
        return os.path.basename(parent)
    raise ValueError(
        f"cannot tell the task order of {run_dir}: it is not laid out as runs/<order>/<method>/seed<seed>; "
        f"pass labels={{{run_dir!r}: '<order>'}} (--label {run_dir}=<order>)"
    )


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _method_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def aggregate_runs(
    run_dirs: Iterable[str], labels: Mapping[str, str] | None = None, allow_partial: bool = False
) -> list[GroupResult]:
    """Group runs by (task order, method) and give mean ± sample std (ddof=1) over each group's runs.

    The order label comes from `labels` (run dir → label) or else from the run dir layout (`run_label`). A group
    whose runs were trained on different task lists, or that holds an unfinished run, is refused unless
    `allow_partial`, which reports it anyway with a note; run dirs without a report are then skipped.

    Single-task baseline runs (`--single_task_baselines`, `runs/<order>/single_task/seed<seed>`) among `run_dirs`
    are not rows: they give FWT to the runs of the same order and seed directory whose report has no a0.
    """
    labels = {os.path.normpath(k): v for k, v in (labels or {}).items()}
    groups: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    baselines: dict[tuple[str, str], dict] = {}
    seen = set()
    for run_dir in run_dirs:
        if os.path.realpath(run_dir) in seen:  # overlapping shell globs
            continue
        seen.add(os.path.realpath(run_dir))
        if not os.path.exists(os.path.join(run_dir, METRICS_FILE)):
            if not allow_partial:
                raise ValueError(
                    f"{run_dir} has no {METRICS_FILE}: it has not finished a task. Leave it out, or pass "
                    "allow_partial=True (--allow-partial) to skip it"
                )
            warnings.warn(f"{run_dir} has no {METRICS_FILE}; left out")
            continue
        report = load_report(run_dir)
        baseline = bool(report.get("single_task_baselines"))
        order = labels.get(os.path.normpath(run_dir)) or run_label(
            run_dir, "single_task" if baseline else report["method"]
        )
        if baseline:
            baselines[order, _seed_name(run_dir)] = report
        else:
            groups.setdefault((order, report["method"]), []).append((run_dir, report))
    if not groups:
        raise ValueError(f"no continual run to aggregate: pass run directories that hold a {METRICS_FILE}")
    keys = sorted(groups, key=lambda key: (_natural_key(key[0]), _method_key(key[1])))
    return [_summarize_group(order, method, groups[order, method], allow_partial, baselines) for order, method in keys]


def _seed_name(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(run_dir)))


def _single_task_accuracies(run_dir: str, report: Mapping, order: str, baselines: Mapping) -> list[float] | None:
    if report.get("single_task_accuracies"):
        return report["single_task_accuracies"]
    baseline = baselines.get((order, _seed_name(run_dir)))
    tasks = list(report["tasks"])
    if baseline is None or list(baseline["tasks"][: len(tasks)]) != tasks:
        return None
    return baseline["single_task_accuracies"]


def _summarize_group(
    order: str, method: str, runs: list[tuple[str, dict]], allow_partial: bool, baselines: Mapping
) -> GroupResult:
    where = f"{order} / {method}"
    notes = []
    unfinished = [(d, r) for d, r in runs if not is_finished(r)]
    if unfinished:
        listed = ", ".join(f"{d} ({len(r['tasks'])}/{len(r['accuracy_matrix'][0])} tasks)" for d, r in unfinished)
        if not allow_partial:
            raise ValueError(
                f"{where}: unfinished run(s) {listed}. Resume them (rerun the same command), leave them out, or "
                "pass allow_partial=True (--allow-partial) to report them with a note"
            )
        notes.append(f"{len(unfinished)} of {len(runs)} runs unfinished: {listed}")
    task_lists = {tuple(r["tasks"]) for _, r in runs}
    longest = max(task_lists, key=len)
    # An unfinished run holds a prefix of its sequence; the sequence length is the width of the accuracy matrix.
    differ = (
        len({tuple(r["tasks"]) for _, r in runs if is_finished(r)}) > 1
        or len({len(r["accuracy_matrix"][0]) for _, r in runs}) > 1
        or any(longest[: len(tasks)] != tasks for tasks in task_lists)
    )
    if differ:
        listed = "; ".join(f"{d}: {r['tasks']}" for d, r in runs)
        if not allow_partial:
            raise ValueError(
                f"{where}: the runs were trained on different task lists ({listed}). Aggregate one task order per "
                "group: give them different labels (labels= / --label DIR=ORDER), or pass allow_partial=True "
                "(--allow-partial) to report them together with a note"
            )
        notes.append(f"the runs were trained on different task lists ({listed})")
    summaries = [run_summary(r, _single_task_accuracies(d, r, order, baselines)) for d, r in runs]
    return GroupResult(
        order=order,
        method=method,
        run_dirs=[d for d, _ in runs],
        tasks=list(longest),
        overall_accuracy=_stat(s["overall_accuracy"] for s in summaries),
        backward_transfer=_stat(s["backward_transfer"] for s in summaries),
        forward_transfer=_stat(s["forward_transfer"] for s in summaries),
        sparsity=_stat(r["per_task"][-1]["sparsity"]["mean"] if r.get("per_task") else None for _, r in runs),
        notes=notes,
        finished_by_seed={_seed_name(d): s for (d, r), s in zip(runs, summaries) if is_finished(r)},
    )


# ----------------------------------------------------------------------------- JumpLoRA against its base method
JUMPLORA_PAIRS = (("jumplora_inclora", "inclora"), ("jumplora_ella", "ella"))


@dataclass
class PairedDifference:
    """method − baseline on one order, paired by seed: with few seeds, the seed-to-seed spread of either method
    alone is larger than the effect, while both methods of one seed share the data subsample and the first task."""

    order: str
    method: str
    baseline: str
    seeds: list[str]
    overall_accuracy: Stat
    backward_transfer: Stat | None


def paired_differences(
    table: Sequence[GroupResult], pairs: Sequence[tuple[str, str]] = JUMPLORA_PAIRS
) -> list[PairedDifference]:
    """For each (method, baseline) of `pairs` present on an order: mean ± std over the seeds (run dir names
    `seed<N>`) that both finished, of the per-seed differences in OA and BWT."""
    cells = {(g.order, g.method): g for g in table}
    differences = []
    for order in sorted({g.order for g in table}, key=_natural_key):
        for method, baseline in pairs:
            if (order, method) not in cells or (order, baseline) not in cells:
                continue
            ours, theirs = cells[order, method].finished_by_seed, cells[order, baseline].finished_by_seed
            seeds = sorted(set(ours) & set(theirs), key=_natural_key)
            if not seeds:
                continue

            def difference(key: str) -> Stat | None:
                return _stat(
                    None if ours[s][key] is None or theirs[s][key] is None else ours[s][key] - theirs[s][key]
                    for s in seeds
                )

            differences.append(
                PairedDifference(
                    order, method, baseline, seeds, difference("overall_accuracy"), difference("backward_transfer")
                )
            )
    return differences


def format_paired_differences(differences: Sequence[PairedDifference]) -> str:
    """A markdown table of `paired_differences`, in percentage points; empty when there is nothing to pair."""
    if not differences:
        return ""
    lines = [
        "### JumpLoRA minus its base method, paired by seed (percentage points)",
        "",
        "| Order | Comparison | Seeds | ΔOA | ΔBWT |",
        "|:--|:--|:--|--:|--:|",
    ]
    for d in differences:
        seeds = ", ".join(s.removeprefix("seed") for s in d.seeds)
        comparison = f"{display_name(d.method)} − {display_name(d.baseline)}"
        lines.append(
            f"| {d.order} | {comparison} | {seeds} | {_cell(d.overall_accuracy, len(d.seeds))} | {_cell(d.backward_transfer, len(d.seeds))} |"
        )
    return "\n".join(lines) + "\n\nMean ± sample standard deviation (ddof=1) of the per-seed differences.\n"


# ----------------------------------------------------------------------------- tables
_TABLE_METRICS = (
    ("overall_accuracy", "oa", "Overall accuracy (OA, %)"),
    ("backward_transfer", "bwt", "Backward transfer (BWT, %)"),
    ("forward_transfer", "fwt", "Forward transfer (FWT, %)"),
    ("sparsity", "sparsity", "Sparsity of the last task's merged update (%, mean over adapted layers)"),
)


def _pct(value: float) -> str:
    text = f"{100 * value:.1f}"
    return "0.0" if text == "-0.0" else text


def _cell(stat: Stat | None, common_n: int | None) -> str:
    if stat is None:
        return "–"
    text = _pct(stat.mean) if stat.std is None else f"{_pct(stat.mean)} ± {_pct(stat.std)}"
    return text if stat.n == common_n else f"{text} (n={stat.n})"


def format_table(
    table: Sequence[GroupResult], fmt: str = "markdown", paper: Mapping[str, Mapping[str, float]] | None = None
) -> str:
    """Markdown: one table per metric (OA, BWT, and FWT / sparsity when present), methods as rows and task orders
    as columns, cells "mean ± std" in percent with one decimal. `paper` ({method: {order: OA %}}, e.g.
    `PAPER_OA`) adds a "(paper)" column after each order it covers in the OA table.

    csv: one line per (order, method) with n, the means and stds in percent, the paper's OA and the notes.
    """
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"fmt must be 'markdown' or 'csv', got {fmt!r}")
    paper = paper or {}
    if fmt == "csv":
        header = ["order", "method", "n"] + [
            f"{short}_{part}" for _, short, _ in _TABLE_METRICS for part in ("mean", "std")
        ]
        lines = [header + ["paper_oa", "notes"]]
        for group in sorted(table, key=lambda g: (_method_key(g.method), _natural_key(g.order))):
            values = []
            for attr, _, _ in _TABLE_METRICS:
                stat = getattr(group, attr)
                values += (
                    ["", ""]
                    if stat is None
                    else [format_number(100 * stat.mean), format_number(None if stat.std is None else 100 * stat.std)]
                )
            lines.append(
                [
                    group.order,
                    group.method,
                    group.n,
                    *values,
                    format_number(paper.get(group.method, {}).get(group.order)),
                    "; ".join(group.notes),
                ]
            )
        return csv_text(lines)

    orders = sorted({g.order for g in table}, key=_natural_key)
    methods = sorted({g.method for g in table}, key=_method_key)
    cells = {(g.order, g.method): g for g in table}
    counts = {g.n for g in table}
    common_n = next(iter(counts)) if len(counts) == 1 else None
    sections = []
    for attr, _, title in _TABLE_METRICS:
        if all(getattr(g, attr) is None for g in table):
            continue
        columns = [(order, False) for order in orders]
        if attr == "overall_accuracy":
            columns = [
                c
                for order in orders
                for c in [(order, False)] + ([(order, True)] if any(order in p for p in paper.values()) else [])
            ]
        lines = [
            "| Method | "
            + " | ".join(f"{order} (paper)" if is_paper else order for order, is_paper in columns)
            + " |",
            "|:--|" + "--:|" * len(columns),
        ]
        for method in methods:
            row = []
            for order, is_paper in columns:
                if is_paper:
                    value = paper.get(method, {}).get(order)
                    row.append("–" if value is None else f"{value:.2f}")
                else:
                    group = cells.get((order, method))
                    row.append("" if group is None else _cell(getattr(group, attr), common_n))
            lines.append(f"| {display_name(method)} | " + " | ".join(row) + " |")
        sections.append(f"### {title}\n\n" + "\n".join(lines))
    footer = "Mean ± sample standard deviation (ddof=1) over the runs (seeds) of each cell, in percent; "
    footer += "n runs per cell as shown." if common_n is None else f"n = {common_n} run(s) per cell unless shown."
    footer += " A value without ± is a single run; – is not available; an empty cell has no run."
    notes = [f"- {g.order} / {display_name(g.method)}: {note}" for g in table for note in g.notes]
    if notes:
        footer += "\n\nNotes:\n" + "\n".join(notes)
    return "\n\n".join(sections + [footer]) + "\n"

"""Reports of continual runs: per-run tables and plots, and a mean ± std table over seeds.

A run directory holds `continual_metrics.json`, which `ContinualSeq2SeqTrainer` rewrites after every task.
`write_run_reports` turns it into CSV/JSON tables and the plots of the paper's Fig. 2-4; `aggregate_runs` and
`format_table` give the shape of its Tables 1-2: methods as rows, task orders as columns, mean ± std over seeds.
OA, BWT and FWT are always recomputed from the accuracy matrix by `jumplora_hf.metrics`. matplotlib is imported
only inside the plotting functions, so the rest of the package does not need it.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import math
import os
import re
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import metrics

logger = logging.getLogger(__name__)

METRICS_FILE = "continual_metrics.json"  # the file ContinualSeq2SeqTrainer writes (trainer.METRICS_FILE)
METHOD_ORDER = ("inclora", "ella", "jumplora_inclora", "jumplora_ella")
METHOD_NAMES = {"inclora": "IncLoRA", "ella": "ELLA", "jumplora_inclora": "JumpLoRA + IncLoRA", "jumplora_ella": "JumpLoRA + ELLA"}

# OA (%) of the paper's Table 1 (mean over seeds 42-44), for `format_table(..., paper=PAPER_OA)`.
PAPER_OA = {
    "inclora": {"order1": 59.25, "order2": 58.69, "order3": 69.86, "order4": 56.83, "order5": 56.40, "order6": 54.32},
    "ella": {"order1": 78.09, "order2": 78.37, "order3": 78.23, "order4": 72.64, "order5": 67.91, "order6": 74.15},
    "jumplora_inclora": {"order1": 70.76, "order2": 69.26, "order3": 74.78, "order4": 65.35, "order5": 61.84, "order6": 64.06},
    "jumplora_ella": {"order1": 78.84, "order2": 79.05, "order3": 78.67, "order4": 73.60, "order5": 68.76, "order6": 75.81},
}

_SEED_DIR = re.compile(r"seed\d+")
_LAYER_DEPTH = re.compile(r"(?:^|\.)(?:(encoder|decoder)\.)?(?:block|layers)\.(\d+)\.")
_CROSS_ATTENTION = ("EncDecAttention", "encoder_attn", "crossattention")
_MAX_MODULE_LINES = 4


# ----------------------------------------------------------------------------- one run
def load_report(run_dir: str) -> dict:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a run directory, or its first task has not finished")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_finished(report: Mapping) -> bool:
    """Whether every task of the sequence is trained (the trainer pads rows to the whole sequence with None)."""
    acc = report["accuracy_matrix"]
    return bool(acc) and len(acc) == len(acc[-1]) and all(value is not None for value in acc[-1])


def trained_matrix(report: Mapping) -> list[list[float | None]]:
    """The accuracy matrix cut to the tasks trained so far: a square `len(tasks)` × `len(tasks)` matrix."""
    n = len(report["tasks"])
    return [list(row[:n]) for row in report["accuracy_matrix"][:n]]


def run_summary(report: Mapping, single_task: Sequence[float] | None = None) -> dict:
    """OA, BWT and FWT of a run; FWT needs single-task accuracies, from `single_task` or else from the report."""
    acc = report["accuracy_matrix"]
    single = single_task if single_task is not None else report.get("single_task_accuracies")
    return {
        "overall_accuracy": metrics.overall_accuracy(acc),
        "backward_transfer": metrics.backward_transfer(acc),
        "forward_transfer": metrics.forward_transfer(acc, single) if single else report.get("forward_transfer"),
    }


def per_task_rows(report: Mapping) -> list[dict]:
    """One row per trained task: OA and BWT after it, and the mean sparsity / Jaccard overlap of its merged update."""
    acc = trained_matrix(report)
    per_task = report.get("per_task") or []
    rows = []
    for i, name in enumerate(report["tasks"]):
        seen = [row[: i + 1] for row in acc[: i + 1]]
        entry = per_task[i] if i < len(per_task) else {}
        sparsity, jaccard = entry.get("sparsity"), entry.get("jaccard_with_previous")
        rows.append(
            {
                "task": name,
                "overall_accuracy": metrics.overall_accuracy(seen),
                "backward_transfer": metrics.backward_transfer(seen),
                "sparsity_mean": sparsity["mean"] if sparsity else None,
                "jaccard_mean": jaccard["mean"] if jaccard else None,
            }
        )
    return rows


def parse_layer_name(name: str) -> tuple[str, int, str] | None:
    """(stack, depth, module) of a PEFT module name, or None when it has no `block.<i>.` / `layers.<i>.` part.

    stack is "encoder" or "decoder" for encoder-decoder models (T5: `...encoder.block.3.layer.0.SelfAttention.q`)
    and "" for a single stack (Llama: `...model.layers.7.self_attn.q_proj`); cross-attention modules are named
    `cross-<module>` so that they are not averaged with the self-attention ones of the same block.
    """
    match = _LAYER_DEPTH.search(name)
    if match is None:
        return None
    module = name.rsplit(".", 1)[-1]
    if any(marker in name for marker in _CROSS_ATTENTION):
        module = f"cross-{module}"
    return match.group(1) or "", int(match.group(2)), module


def write_atomic(path: str, data: str | bytes) -> str:
    """Write via a temporary file and os.replace, so a reader never sees a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    if isinstance(data, bytes):
        with open(tmp, "wb") as f:
            f.write(data)
    else:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(data)
    os.replace(tmp, path)
    return path


def _number(value: float | None) -> str:
    """At most 6 decimals, without trailing zeros; an empty cell for a missing value."""
    if value is None or math.isnan(value):
        return ""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _csv(rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_run_reports(run_dir: str, report: Mapping | None = None) -> list[str]:
    """Write the CSV/JSON tables and PNG plots of one run into `run_dir`; returns the written paths.

    Tables are in the report's units (accuracies as fractions), plots in percent. A plot without data (BWT after a
    single task, sparsity of a report without per-layer values) is skipped, not written empty.
    """
    report = load_report(run_dir) if report is None else report
    if report.get("single_task_baselines"):
        raise ValueError(f"{run_dir} holds single-task baselines (a0 for FWT), not a continual run: it has no accuracy matrix")
    os.makedirs(run_dir, exist_ok=True)
    tasks = list(report["tasks"])
    summary = run_summary(report)

    matrix_rows = [["", *tasks]] + [[f"after {name}", *map(_number, row)] for name, row in zip(tasks, trained_matrix(report))]
    per_task = [["task", "overall_accuracy", "backward_transfer", "sparsity_mean", "jaccard_mean"]]
    per_task += [[row["task"], *(_number(row[key]) for key in per_task[0][1:])] for row in per_task_rows(report)]
    written = [
        write_atomic(os.path.join(run_dir, "accuracy_matrix.csv"), _csv(matrix_rows)),
        write_atomic(
            os.path.join(run_dir, "accuracy_matrix.json"),
            json.dumps({"tasks": tasks, "accuracy_matrix": report["accuracy_matrix"], **summary}, indent=1) + "\n",
        ),
        write_atomic(os.path.join(run_dir, "per_task.csv"), _csv(per_task)),
    ]
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed, so %s gets the tables but no plots: pip install -e '.[plots]'", run_dir)
        return written
    for plot, filename in (
        (plot_accuracy_matrix, "accuracy_matrix.png"),
        (plot_bwt_per_task, "bwt_per_task.png"),
        (plot_sparsity_overlap_per_task, "sparsity_overlap_per_task.png"),
        (plot_sparsity_by_depth, "sparsity_by_depth.png"),
    ):
        path = plot(report, os.path.join(run_dir, filename))
        if path is not None:
            written.append(path)
    return written


# ----------------------------------------------------------------------------- plots of one run
def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kwargs):
    # The Agg canvas directly, not pyplot: no global backend switch and no figure registry to leak into.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kwargs)


def _save_png(fig, path: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_atomic(path, buffer.getvalue())


def _title(report: Mapping, what: str) -> str:
    return f"{METHOD_NAMES.get(report.get('method'), report.get('method') or 'run')}: {what}"


def _percent(value: float | None) -> float:
    return float("nan") if value is None else 100.0 * value


def plot_accuracy_matrix(report: Mapping, path: str) -> str | None:
    """Heatmap of a[i][j] (%), with the values written in the cells."""
    acc = trained_matrix(report)
    if not acc:
        return None
    tasks = report["tasks"]
    values = np.array([[_percent(v) for v in row] for row in acc])
    side = max(4.0, 0.5 * len(tasks) + 2.5)
    fig, axes = _figure(side + 1.0, side)
    ax = axes[0, 0]
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=100.0)
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    fontsize = 9 if len(tasks) <= 8 else 6
    for (i, j), value in np.ndenumerate(values):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=fontsize, color="white" if value < 50 else "black")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), [f"after {name}" for name in tasks])
    ax.set_xlabel("evaluated on")
    summary = run_summary(report)
    bwt = summary["backward_transfer"]
    ax.set_title(_title(report, f"OA {_percent(summary['overall_accuracy']):.1f}%" + ("" if bwt is None else f", BWT {_percent(bwt):.1f}%")))
    return _save_png(fig, path)


def plot_bwt_per_task(report: Mapping, path: str) -> str | None:
    """BWT (%) after each task from the second on (paper Fig. 2, drawn as a line rather than a radial profile)."""
    rows = per_task_rows(report)[1:]
    if not rows:
        return None
    fig, axes = _figure(max(5.0, 0.45 * len(rows) + 3.0), 3.5)
    ax = axes[0, 0]
    ax.plot(range(len(rows)), [_percent(row["backward_transfer"]) for row in rows], marker="o")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [row["task"] for row in rows], rotation=45, ha="right")
    ax.set_xlabel("after training task")
    ax.set_ylabel("BWT (%)")
    ax.set_title(_title(report, "BWT after each task"))
    return _save_png(fig, path)


def plot_sparsity_overlap_per_task(report: Mapping, path: str) -> str | None:
    """Sparsity of each task's merged update and its mean Jaccard overlap with the previous tasks' (paper Fig. 3).

    Both are means over the adapted layers; the paper's Fig. 3 shows the middle layer.
    """
    rows = [row for row in per_task_rows(report) if row["sparsity_mean"] is not None]
    if not rows:
        return None
    overlap = [row for row in rows if row["jaccard_mean"] is not None]
    names = [row["task"] for row in rows]
    fig, axes = _figure(max(5.0, 0.45 * len(rows) + 3.0), 5.5 if overlap else 3.5, rows=2 if overlap else 1, sharex=True)
    axes[0, 0].bar(range(len(rows)), [_percent(row["sparsity_mean"]) for row in rows], color="tab:blue")
    axes[0, 0].set_ylim(0.0, 100.0)
    axes[0, 0].set_ylabel("sparsity (%)")
    fig.suptitle(_title(report, "merged update of each task\n(mean over adapted layers)"))
    if overlap:
        index = {name: i for i, name in enumerate(names)}
        jaccard = [row["jaccard_mean"] for row in overlap]
        axes[1, 0].plot([index[row["task"]] for row in overlap], jaccard, marker="o", color="tab:orange")
        axes[1, 0].set_ylim(0.0, max(1.2 * max(jaccard), 0.05))
        axes[1, 0].set_ylabel("mean Jaccard with previous")
    axes[-1, 0].set_xticks(range(len(rows)), names, rotation=45, ha="right")
    axes[-1, 0].set_xlabel("task")
    return _save_png(fig, path)


def _sparsity_by_depth(per_layer: Mapping[str, float]) -> dict[tuple[str, str], dict[int, float]]:
    """{(stack, module): {depth: mean sparsity}}, plus (stack, "all") when the stack has several module types."""
    values: dict[tuple[str, str], dict[int, list[float]]] = {}
    for name, sparsity in per_layer.items():
        parsed = parse_layer_name(name)
        if parsed is None:
            continue
        stack, depth, module = parsed
        values.setdefault((stack, module), {}).setdefault(depth, []).append(sparsity)
        values.setdefault((stack, "all"), {}).setdefault(depth, []).append(sparsity)
    modules_per_stack = {stack: sum(1 for s, m in values if s == stack and m != "all") for stack, _ in values}

    def shown(stack: str, module: str) -> bool:
        # One line per module type for the usual few targets (q, v); only the mean when all linear layers are adapted.
        n = modules_per_stack[stack]
        return n > 1 if module == "all" else n <= _MAX_MODULE_LINES

    return {key: {depth: float(np.mean(v)) for depth, v in sorted(by_depth.items())} for key, by_depth in values.items() if shown(*key)}


def plot_sparsity_by_depth(report: Mapping, path: str) -> str | None:
    """Mean sparsity (%) per layer depth, of the last task's update and averaged over tasks (paper Fig. 4).

    One line per module type (q, v, ...) and a thick one for all of them; for encoder-decoder models the encoder
    (solid) and the decoder (dashed) are separate series over their own block index.
    """
    entries = [entry for entry in report.get("per_task") or [] if (entry.get("sparsity") or {}).get("per_layer")]
    if not entries:
        return None
    per_layer = [entry["sparsity"]["per_layer"] for entry in entries]
    last = _sparsity_by_depth(per_layer[-1])
    if not last:
        return None
    panels = [(f"after {entries[-1]['name']}", last)]
    if len(per_layer) > 1:
        mean_over_tasks = {name: float(np.mean([layers[name] for layers in per_layer if name in layers])) for name in per_layer[-1]}
        panels.append((f"mean over {len(per_layer)} tasks", _sparsity_by_depth(mean_over_tasks)))
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(4.5 * len(panels) + 1.5, 4.0, cols=len(panels), sharey=True)
    modules = sorted({module for _, module in last if module != "all"})
    colors = {module: f"C{i}" for i, module in enumerate(modules)}
    for ax, (title, series) in zip(axes[0], panels):
        for (stack, module), by_depth in sorted(series.items()):
            name = ("(all modules)" if stack else "all modules") if module == "all" else module
            label = f"{stack} {name}" if stack else name
            style = {"color": "black", "linewidth": 2.5} if module == "all" else {"color": colors[module], "linewidth": 1.2}
            ax.plot(list(by_depth), [_percent(v) for v in by_depth.values()], marker="o", markersize=3,
                    linestyle="--" if stack == "decoder" else "-", label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("layer depth (block index)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0.0, 100.0)
    axes[0, 0].set_ylabel("sparsity (%)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.suptitle(_title(report, "sparsity by layer depth"))
    return _save_png(fig, path)


# ----------------------------------------------------------------------------- several runs
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


def aggregate_runs(run_dirs: Iterable[str], labels: Mapping[str, str] | None = None, allow_partial: bool = False) -> list[GroupResult]:
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
        order = labels.get(os.path.normpath(run_dir)) or run_label(run_dir, "single_task" if baseline else report["method"])
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


def _summarize_group(order: str, method: str, runs: list[tuple[str, dict]], allow_partial: bool, baselines: Mapping) -> GroupResult:
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
    )


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


def format_table(table: Sequence[GroupResult], fmt: str = "markdown", paper: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Markdown: one table per metric (OA, BWT, and FWT / sparsity when present), methods as rows and task orders
    as columns, cells "mean ± std" in percent with one decimal. `paper` ({method: {order: OA %}}, e.g.
    `PAPER_OA`) adds a "(paper)" column after each order it covers in the OA table.

    csv: one line per (order, method) with n, the means and stds in percent, the paper's OA and the notes.
    """
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"fmt must be 'markdown' or 'csv', got {fmt!r}")
    paper = paper or {}
    if fmt == "csv":
        header = ["order", "method", "n"] + [f"{short}_{part}" for _, short, _ in _TABLE_METRICS for part in ("mean", "std")]
        lines = [header + ["paper_oa", "notes"]]
        for group in sorted(table, key=lambda g: (_method_key(g.method), _natural_key(g.order))):
            values = []
            for attr, _, _ in _TABLE_METRICS:
                stat = getattr(group, attr)
                values += ["", ""] if stat is None else [_number(100 * stat.mean), _number(None if stat.std is None else 100 * stat.std)]
            lines.append([group.order, group.method, group.n, *values, _number(paper.get(group.method, {}).get(group.order)), "; ".join(group.notes)])
        return _csv(lines)

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
            columns = [c for order in orders for c in [(order, False)] + ([(order, True)] if any(order in p for p in paper.values()) else [])]
        lines = [
            "| Method | " + " | ".join(f"{order} (paper)" if is_paper else order for order, is_paper in columns) + " |",
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
            lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(row) + " |")
        sections.append(f"### {title}\n\n" + "\n".join(lines))
    footer = "Mean ± sample standard deviation (ddof=1) over the runs (seeds) of each cell, in percent; "
    footer += "n runs per cell as shown." if common_n is None else f"n = {common_n} run(s) per cell unless shown."
    footer += " A value without ± is a single run; – is not available; an empty cell has no run."
    notes = [f"- {g.order} / {METHOD_NAMES.get(g.method, g.method)}: {note}" for g in table for note in g.notes]
    if notes:
        footer += "\n\nNotes:\n" + "\n".join(notes)
    return "\n\n".join(sections + [footer]) + "\n"

"""Reports of one continual run: its tables and the plots of the paper's Fig. 2-4 (several runs: `aggregation`).

A run directory holds `continual_metrics.json`, which `ContinualTrainer` rewrites after every task.
`write_run_reports` turns it into CSV/JSON tables and PNG plots. OA, BWT and FWT are always recomputed from the
accuracy matrix by `jumplora_hf.metrics`. matplotlib is imported only inside the plotting functions, so the
rest of the package does not need it.
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
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .. import metrics
from ..files import write_atomic
from ..methods import display_name
from ..state import METRICS_FILE

logger = logging.getLogger(__name__)


_LAYER_DEPTH = re.compile(r"(?:^|\.)(?:(encoder|decoder)\.)?(?:block|layers)\.(\d+)\.")
_CROSS_ATTENTION = ("EncDecAttention", "encoder_attn", "crossattention")
_MAX_MODULE_LINES = 4


# ----------------------------------------------------------------------------- one run
def load_report(run_dir: str) -> dict:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {run_dir} is not a run directory, or its first task has not finished"
        )
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
    complete = metrics.final_row_is_complete(acc)  # not before the end of an eval_seen_tasks="at_end" run
    return {
        "overall_accuracy": metrics.overall_accuracy(acc) if complete else None,
        "backward_transfer": metrics.backward_transfer(acc) if complete else None,
        "forward_transfer": metrics.forward_transfer(acc, single) if single else report.get("forward_transfer"),
    }


def per_task_rows(report: Mapping) -> list[dict]:
    """One row per trained task: OA and BWT after it, and the mean sparsity / Jaccard overlap of its merged update."""
    acc = trained_matrix(report)
    per_task = report.get("per_task") or []
    rows = []
    for i, name in enumerate(report["tasks"]):
        seen = [row[: i + 1] for row in acc[: i + 1]]
        complete = metrics.row_is_complete(seen, i)
        entry = per_task[i] if i < len(per_task) else {}
        sparsity, jaccard = entry.get("sparsity"), entry.get("jaccard_with_previous")
        rows.append(
            {
                "task": name,
                "overall_accuracy": metrics.overall_accuracy(seen) if complete else None,
                "backward_transfer": metrics.backward_transfer(seen) if complete else None,
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


def format_number(value: float | None) -> str:
    """At most 6 decimals, without trailing zeros; an empty cell for a missing value."""
    if value is None or math.isnan(value):
        return ""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def csv_text(rows: Iterable[Sequence]) -> str:
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
        raise ValueError(
            f"{run_dir} holds single-task baselines (a0 for FWT), not a continual run: it has no accuracy matrix"
        )
    os.makedirs(run_dir, exist_ok=True)
    tasks = list(report["tasks"])
    summary = run_summary(report)

    matrix_rows = [["", *tasks]] + [
        [f"after {name}", *map(format_number, row)] for name, row in zip(tasks, trained_matrix(report))
    ]
    per_task = [["task", "overall_accuracy", "backward_transfer", "sparsity_mean", "jaccard_mean"]]
    per_task += [[row["task"], *(format_number(row[key]) for key in per_task[0][1:])] for row in per_task_rows(report)]
    written = [
        write_atomic(os.path.join(run_dir, "accuracy_matrix.csv"), csv_text(matrix_rows)),
        write_atomic(
            os.path.join(run_dir, "accuracy_matrix.json"),
            json.dumps({"tasks": tasks, "accuracy_matrix": report["accuracy_matrix"], **summary}, indent=1) + "\n",
        ),
        write_atomic(os.path.join(run_dir, "per_task.csv"), csv_text(per_task)),
    ]
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning(
            "matplotlib is not installed, so %s gets the tables but no plots: pip install -e '.[plots]'", run_dir
        )
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
    return f"{display_name(report.get('method'))}: {what}"


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
            ax.text(
                j,
                i,
                f"{value:.1f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if value < 50 else "black",
            )
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), [f"after {name}" for name in tasks])
    ax.set_xlabel("evaluated on")
    summary = run_summary(report)
    bwt = summary["backward_transfer"]
    ax.set_title(
        _title(
            report,
            (
                "not evaluated on every task yet"
                if summary["overall_accuracy"] is None
                else f"OA {_percent(summary['overall_accuracy']):.1f}%"
            )
            + ("" if bwt is None else f", BWT {_percent(bwt):.1f}%"),
        )
    )
    return _save_png(fig, path)


def plot_bwt_per_task(report: Mapping, path: str) -> str | None:
    """BWT (%) after each task from the second on (paper Fig. 2, drawn as a line rather than a radial profile)."""
    rows = [row for row in per_task_rows(report)[1:] if row["backward_transfer"] is not None]  # at_end: the last
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
    fig, axes = _figure(
        max(5.0, 0.45 * len(rows) + 3.0), 5.5 if overlap else 3.5, rows=2 if overlap else 1, sharex=True
    )
    sparsity = [_percent(row["sparsity_mean"]) for row in rows]
    bars = axes[0, 0].bar(range(len(rows)), sparsity, color="tab:blue")
    axes[0, 0].bar_label(bars, labels=[f"{v:.0f}%" if v >= 0.5 else "dense: 0% sparse" for v in sparsity], fontsize=8)
    axes[0, 0].set_ylim(0.0, 110.0)
    axes[0, 0].set_ylabel("sparsity (%)")
    fig.suptitle(_title(report, "merged update of each task\n(mean over adapted layers)"))
    if overlap:
        index = {name: i for i, name in enumerate(names)}
        jaccard = [row["jaccard_mean"] for row in overlap]
        axes[1, 0].plot([index[row["task"]] for row in overlap], jaccard, marker="o", color="tab:orange")
        axes[1, 0].set_ylim(0.0, 1.05)  # the same range for every method: dense updates overlap fully (1.0)
        axes[1, 0].set_ylabel("mean Jaccard with\nearlier tasks")
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

    return {
        key: {depth: float(np.mean(v)) for depth, v in sorted(by_depth.items())}
        for key, by_depth in values.items()
        if shown(*key)
    }


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
        mean_over_tasks = {
            name: float(np.mean([layers[name] for layers in per_layer if name in layers])) for name in per_layer[-1]
        }
        panels.append((f"mean over {len(per_layer)} tasks", _sparsity_by_depth(mean_over_tasks)))
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(4.5 * len(panels) + 1.5, 4.0, cols=len(panels), sharey=True)
    modules = sorted({module for _, module in last if module != "all"})
    colors = {module: f"C{i}" for i, module in enumerate(modules)}
    for ax, (title, series) in zip(axes[0], panels):
        for (stack, module), by_depth in sorted(series.items()):
            name = ("(all modules)" if stack else "all modules") if module == "all" else module
            label = f"{stack} {name}" if stack else name
            style = (
                {"color": "black", "linewidth": 2.5}
                if module == "all"
                else {"color": colors[module], "linewidth": 1.2}
            )
            ax.plot(
                list(by_depth),
                [_percent(v) for v in by_depth.values()],
                marker="o",
                markersize=3,
                linestyle="--" if stack == "decoder" else "-",
                label=label,
                **style,
            )
        ax.set_title(title)
        ax.set_xlabel("layer depth (block index)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-2.0, 100.0)
        if all(v < 0.005 for by_depth in series.values() for v in by_depth.values()):
            ax.text(0.5, 0.5, "dense: 0% sparse in every layer", transform=ax.transAxes, ha="center", fontsize=11)
    axes[0, 0].set_ylabel("sparsity (%)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.suptitle(_title(report, "sparsity by layer depth"))
    return _save_png(fig, path)

"""The model card of a published continual run, built with huggingface_hub's `ModelCard` / `ModelCardData`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .methods import display_name

PAPER = "https://arxiv.org/abs/2604.16171"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _matrix_table(report: dict) -> list[str]:
    tasks = report["tasks"]
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, row in zip(tasks, report["accuracy_matrix"]):
        lines.append(f"| {name} | " + " | ".join("" if v is None else _pct(v) for v in row[: len(tasks)]) + " |")
    return lines


def _per_task_table(report: dict) -> list[str]:
    lines = [
        "| task | metric | score after its training | sparsity of its update | mean Jaccard with earlier tasks | τ |",
        "|---|---|---|---|---|---|",
    ]
    for index, entry in enumerate(report["per_task"]):
        sparsity = entry["sparsity"]["mean"]
        overlap = entry.get("jaccard_with_previous")
        tau = entry.get("tau") or {}
        lines.append(
            f"| {entry['name']} | {entry.get('metric', 'exact_match')} | {_pct(report['accuracy_matrix'][index][index])} | "
            + ("dense (0%)" if sparsity < 1e-6 else f"{100 * sparsity:.1f}%")
            + f" | {'–' if not overlap else format(overlap['mean'], '.3f')} | "
            + (", ".join(f"{v:.3g}" for v in tau.values()) if tau else "–")
            + " |"
        )
    return lines


# beside a local base model: {"base_model": Hub id it came from, "license": ..., "note": how it was derived}
MODEL_SOURCE_FILE = "model_source.json"


def model_source(base: str | None) -> dict:
    """What a local base model folder says about its origin (empty for a Hub id or a folder without the file)."""
    path = os.path.join(base, MODEL_SOURCE_FILE) if base and os.path.isdir(base) else None
    if path is None or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_model_card(
    report: dict,
    run_config: dict,
    repo_id: str,
    plots: Sequence[str] = (),
    has_ledger: bool = True,
    tags_by_task: Sequence[str] = (),
) -> ModelCard:
    """The card of a run: what it is, how to load, rebuild and revert it, its task order and hyperparameters, the
    accuracy matrix and OA/BWT/FWT (also as `model-index` results), sparsity and overlap per task, and the plots."""
    method = report["method"]
    base = run_config.get("base_model") or None
    local = run_config.get("base_model_is_local", bool(base) and os.path.isdir(base))
    source = run_config.get("base_model_source") or {}
    origin = source.get("base_model") if local else base  # what a reader of the card can download
    auto_class = "AutoModelForSeq2SeqLM" if run_config.get("is_encoder_decoder") else "AutoModelForCausalLM"
    sequence = " → ".join(report["tasks"])
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type="continual-sequence",
            dataset_name=sequence,
            metric_type=metric,
            metric_name=label,
            metric_value=round(100 * value, 2),
        )
        for metric, label, value in (
            ("overall_accuracy", "OA", report.get("overall_accuracy")),
            ("backward_transfer", "BWT", report.get("backward_transfer")),
            ("forward_transfer", "FWT", report.get("forward_transfer")),
        )
        if value is not None
    ]
    data = ModelCardData(
        library_name="transformers",
        base_model=origin,
        tags=["continual-learning", "jumplora", "lora", "peft", method],
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
        license=run_config.get("license") or source.get("license"),
    )
    hyper = run_config.get("training", {})
    adapters = run_config.get("adapters", {})
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{f'`{base}`' if base else 'A model'}{' (a local checkpoint' + (f' of `{origin}`: ' + source['note'] if origin and source.get('note') else '') + ')' if local else ''} trained on {len(report['tasks'])} tasks in a row with **{display_name(method)}** "
        f"([JumpLoRA, arXiv 2604.16171]({PAPER}), trained with the `jumplora_hf` package). After each task its "
        "update was merged into the base weights, so this is a plain transformers checkpoint: no adapter is needed.",
        "",
        "## Load it",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        f'model = {auto_class}.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
        "",
    ]
    if tags_by_task:
        lines += ["The model after each task is a tagged revision:", "", "```python"]
        lines += [f'{auto_class}.from_pretrained("{repo_id}", revision="{tag}")' for tag in tags_by_task]
        lines += ["```", ""]
    lines += [
        "## Task order and method",
        "",
        f"Tasks, in training order: {sequence}.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {display_name(method)} (`{method}`) |",
    ]
    for key, value in {**adapters, **hyper}.items():
        if (
            key == "method"
            or value is None
            or value == -1
            or (key.startswith("ella_") and not method.endswith("ella"))
        ):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        lines.append(f"| {key} | {shown} |")
    lines += [
        "",
        "## Results",
        "",
        "a[i][j] is the score (%) on task j after training task i.",
        "",
        *_matrix_table(report),
        "",
    ]
    lines += [
        f"OA {_pct(report.get('overall_accuracy'))}, BWT {_pct(report.get('backward_transfer'))}, "
        f"FWT {_pct(report.get('forward_transfer'))} (%, paper §4.2; FWT needs single-task baselines).",
        "",
    ]
    lines += ["### Each task's update", "", *_per_task_table(report), ""]
    if plots:
        lines += ["### Plots", ""] + [f"![{os.path.splitext(p)[0].replace('_', ' ')}]({p})" for p in plots] + [""]
    if has_ledger:
        # a local base is nothing a reader has: they pass the same weights (the exact base, or it will not verify)
        ledger_base = "BASE_MODEL" if local else base or "BASE_MODEL"
        if local:
            lines += [
                f"The base was the local checkpoint `{base}`"
                + (f" ({source['note']}, from `{origin}`)" if origin and source.get("note") else "")
                + "; pass those exact weights as BASE_MODEL: a rebuild is bit-identical only from the same base.",
                "",
            ]
        lines += [
            "## The task ledger",
            "",
            "`ledger/` holds the exact update each task added to each adapted weight (sparse for JumpLoRA, the "
            "low-rank factors for dense methods). With the base model it rebuilds this checkpoint bit-identically, "
            "takes one task back out, or composes any subset of tasks:",
            "",
            "```bash",
            f"hf download {repo_id} --local-dir run",
            "python -m jumplora_hf.ledger show run",
            f"python -m jumplora_hf.ledger rebuild run --base {ledger_base} --out rebuilt",
            f"python -m jumplora_hf.ledger revert run --base {ledger_base} --task {report['tasks'][0]} --out without_{report['tasks'][0]}",
            f"python -m jumplora_hf.ledger verify run --base {ledger_base} --model run",
            "```",
            "",
        ]
    lines += [
        "## Citation",
        "",
        "```bibtex",
        "@article{dragomir2026jumplora,",
        "  title={JumpLoRA: Sparse Adapters for Continual Learning in Large Language Models},",
        "  author={Dragomir, Alexandra and others},",
        "  journal={arXiv preprint arXiv:2604.16171},",
        "  year={2026}",
        "}",
        "```",
        "",
    ]
    return ModelCard("\n".join(lines))

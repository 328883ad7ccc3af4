"""Tasks from a folder in the continual-learning benchmarks' standard layout.

    DATA_DIR/<task>/{train,dev,test}.json   records {"sentence": str, "label": str}
    DATA_DIR/<task>/labels.json             the label words
    DATA_DIR/instructions.json              optional: {task: {"instruction": str, "options": [...]}}
    DATA_DIR/orders.json                    optional: {"order1": [task, ...], ...}

This is the layout of the JumpLoRA paper's split (and of O-LoRA's / ELLA's CL_Benchmark folders).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

from ..data import ContinualTask

SPLITS = ("train", "dev", "test")


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_task_names(data_dir: str, tasks: str | Sequence[str]) -> list[str]:
    """A list of task names, or an order name from `orders.json` (e.g. "order4")."""
    if isinstance(tasks, str):
        orders_path = os.path.join(data_dir, "orders.json")
        orders = _read_json(orders_path) if os.path.exists(orders_path) else {}
        if tasks in orders:
            return list(orders[tasks])
        names = [t for t in tasks.split(",") if t]
    else:
        names = list(tasks)
    available = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    missing = [n for n in names if n not in available]
    if missing or not names:
        raise ValueError(
            f"{missing or tasks!r} is neither an order of {os.path.join(data_dir, 'orders.json')} nor tasks of {data_dir}; "
            f"tasks there: {available}"
        )
    return names


def load_cl_benchmark(
    data_dir: str,
    tasks: str | Sequence[str],
    eval_split: str = "dev",
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    seed: int = 0,
) -> list[ContinualTask]:
    """The tasks of `tasks` (names or an order) with train and `eval_split` examples, optionally subsampled.

    Instruction and options come from `instructions.json` when it lists the task, else the options are
    the task's `labels.json` and the instruction is the package default. Subsampling draws a fixed random
    subset (seeded by `seed` and the task name) so that reruns see the same examples.
    """
    if eval_split not in SPLITS[1:]:
        raise ValueError(f"eval_split={eval_split!r}: use 'dev' to tune, 'test' to report")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"no benchmark folder at {data_dir!r}; expected <task>/{{train,dev,test,labels}}.json")
    instructions_path = os.path.join(data_dir, "instructions.json")
    instructions = _read_json(instructions_path) if os.path.exists(instructions_path) else {}
    loaded = []
    for name in resolve_task_names(data_dir, tasks):
        folder = os.path.join(data_dir, name)
        paths = {split: os.path.join(folder, f"{split}.json") for split in ("train", eval_split, "labels")}
        absent = [p for p in paths.values() if not os.path.exists(p)]
        if absent:
            raise FileNotFoundError(f"task {name!r} lacks {absent}")
        spec = instructions.get(name, {})
        rng = random.Random(f"{seed}-{name}")

        def sample(records, limit):
            return records if limit is None or len(records) <= limit else rng.sample(records, limit)

        loaded.append(
            ContinualTask(
                name=name,
                train_dataset=sample(_read_json(paths["train"]), max_train_examples),
                eval_dataset=sample(_read_json(paths[eval_split]), max_eval_examples),
                options=spec.get("options") or _read_json(paths["labels"]),
                instruction=spec.get("instruction") or None,
            )
        )
    return loaded

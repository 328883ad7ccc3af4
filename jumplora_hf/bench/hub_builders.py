"""Build the continual-learning benchmark folder (the layout read by `cl_benchmark`) from the public Hub datasets.

    DATA_DIR/<task>/{train,dev,test}.json   records {"sentence": str, "label": str}
    DATA_DIR/<task>/labels.json             the label words
    DATA_DIR/instructions.json              {task: {"instruction": str, "options": [...]}}
    DATA_DIR/orders.json                    {"order1": [task, ...], ..., "order6": [...]}

The split follows the paper (and ELLA): test = at most 500 examples per class from the Hub test source; a
pool of at most 1000 per class from the Hub train source, shuffled with a fixed seed and split 80%/20% into
train/dev. GLUE and SuperGLUE hide their test labels, so for them the Hub validation split is the test source.
Sentences are laid out as in the paper's released folder (e.g. "sentence 1: ...\nsentence 2: ..." for NLI).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

TEST_PER_CLASS = 500
POOL_PER_CLASS = 1000
TRAIN_FRACTION = 0.8
DEFAULT_SEED = 42

OFFLINE_HINT = (
    "Without network access: build once where the Hub is reachable and reuse its cache (point --cache_dir or "
    "HF_DATASETS_CACHE at it and set HF_DATASETS_OFFLINE=1), or copy an existing benchmark folder "
    "(e.g. ../shared/cl_benchmark) and pass it as --data_dir."
)

# The instruction wording of the paper's released instructions.json.
TOPIC = "What is the topic of the following paragraph? Choose one from the option.\n"
SENTIMENT = "What is the sentiment of the following paragraph? Choose one from the option.\n"
NLI = 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option.\n'
WIC = "Given a word and two sentences, whether the word is used with the same sense in both sentence? Choose one from the option.\n"
QQP = 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.\n'
BOOLQ = "According to the following passage, is the question true or false? Choose one from the option.\n"
MULTIRC = "According to the following passage and question, is the candidate answer true or false? Choose one from the option.\n"

ORDERS = {
    "order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "order3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "order4": [
        "mnli",
        "cb",
        "wic",
        "copa",
        "qqp",
        "boolq",
        "rte",
        "imdb",
        "yelp",
        "amazon",
        "sst2",
        "dbpedia",
        "agnews",
        "multirc",
        "yahoo",
    ],
    "order5": [
        "multirc",
        "boolq",
        "wic",
        "mnli",
        "cb",
        "copa",
        "qqp",
        "rte",
        "imdb",
        "sst2",
        "dbpedia",
        "agnews",
        "yelp",
        "amazon",
        "yahoo",
    ],
    "order6": [
        "yelp",
        "amazon",
        "mnli",
        "cb",
        "copa",
        "qqp",
        "rte",
        "imdb",
        "sst2",
        "dbpedia",
        "agnews",
        "yahoo",
        "multirc",
        "boolq",
        "wic",
    ],
}

STARS = ("very negative", "negative", "neutral", "positive", "very positive")


@dataclass(frozen=True)
class HubTaskSpec:
    """Where one task comes from on the Hub and how a Hub row becomes a {"sentence", "label"} record."""

    path: str  # Hub dataset id
    config: str | None
    test_split: str  # Hub split feeding the test set
    train_split: str  # Hub split feeding the train/dev pool
    id2label: tuple[str, ...]  # label word of each Hub label id
    format_sentence: Callable[[Mapping[str, Any]], str]
    instruction: str
    labels: tuple[str, ...] | None = None  # labels.json order when it differs from id2label's
    label_column: str = "label"

    @property
    def options(self) -> list[str]:
        return list(self.labels or self.id2label)

    def to_record(self, row: Mapping[str, Any]) -> dict:
        label_id = int(row[self.label_column])
        if label_id >= len(self.id2label):
            raise ValueError(f"{self.path}: label id {label_id} has no word (words: {self.id2label})")
        # -1 marks an unlabelled row (hidden GLUE/SuperGLUE test labels, imdb's "unsupervised" split).
        label = self.id2label[label_id] if label_id >= 0 else None
        return {"sentence": self.format_sentence(row), "label": label}


def _title_text(title_key: str, text_key: str) -> Callable[[Mapping[str, Any]], str]:
    return lambda row: f"Title: {row[title_key]}\nText: {row[text_key]}\n"


def _text(key: str, end: str = "\n") -> Callable[[Mapping[str, Any]], str]:
    return lambda row: f"Text: {row[key]}{end}"


def _sentence_pair(first: str, second: str) -> Callable[[Mapping[str, Any]], str]:
    return lambda row: f"sentence 1: {row[first]}\nsentence 2: {row[second]}"


def _yahoo(row: Mapping[str, Any]) -> str:
    # Questions without a body are laid out with their title as the question.
    if (row["question_content"] or "").strip():
        return f"Title: {row['question_title']}\nQuestion: {row['question_content']}\nAnswer: {row['best_answer']}\n"
    return f"Question: {row['question_title']}\nAnswer: {row['best_answer']}\n"


def _copa(row: Mapping[str, Any]) -> str:
    return (
        f'Which sentence is the {row["question"]} of "{row["premise"]}"? Choose one between A and B.\n'
        f"A: {row['choice1']}\nB: {row['choice2']}"
    )


HUB_TASKS: dict[str, HubTaskSpec] = {
    # fancyzhx/ag_news joins title and description into one "text" column, so the title cannot be set apart.
    "agnews": HubTaskSpec(
        "fancyzhx/ag_news",
        None,
        "test",
        "train",
        ("World", "Sports", "Business", "Science or Technology"),
        _text("text"),
        TOPIC,
    ),
    "dbpedia": HubTaskSpec(
        "fancyzhx/dbpedia_14",
        None,
        "test",
        "train",
        (
            "Company",
            "Educational Institution",
            "Artist",
            "Athlete",
            "Office Holder",
            "Mean of Transportation",
            "Building",
            "Natural Place",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "Written Work",
        ),
        _title_text("title", "content"),
        TOPIC,
    ),
    "yahoo": HubTaskSpec(
        "community-datasets/yahoo_answers_topics",
        None,
        "test",
        "train",
        (
            "Society & Culture",
            "Science & Mathematics",
            "Health",
            "Education & Reference",
            "Computers & Internet",
            "Sports",
            "Business & Finance",
            "Entertainment & Music",
            "Family & Relationships",
            "Politics & Government",
        ),
        _yahoo,
        TOPIC,
        label_column="topic",
    ),
    "yelp": HubTaskSpec("Yelp/yelp_review_full", None, "test", "train", STARS, _text("text"), SENTIMENT),
    # The English part of the Multilingual Amazon Reviews Corpus (stars 1-5 as labels 0-4); it has no title column.
    "amazon": HubTaskSpec("SetFit/amazon_reviews_multi_en", None, "test", "train", STARS, _text("text"), SENTIMENT),
    "mnli": HubTaskSpec(
        "nyu-mll/glue",
        "mnli",
        "validation_matched",
        "train",
        ("entailment", "neutral", "contradiction"),
        _sentence_pair("premise", "hypothesis"),
        NLI,
        labels=("neutral", "entailment", "contradiction"),
    ),
    "qqp": HubTaskSpec(
        "nyu-mll/glue",
        "qqp",
        "validation",
        "train",
        ("False", "True"),
        lambda row: f"first sentence: {row['question1']}\nsecond sentence: {row['question2']}",
        QQP,
    ),
    # GLUE RTE: 0 entailment, 1 not_entailment (worded "contradiction" in the paper's folder).
    "rte": HubTaskSpec(
        "nyu-mll/glue",
        "rte",
        "validation",
        "train",
        ("entailment", "contradiction"),
        _sentence_pair("sentence1", "sentence2"),
        NLI,
        labels=("contradiction", "entailment"),
    ),
    "sst2": HubTaskSpec(
        "nyu-mll/glue",
        "sst2",
        "validation",
        "train",
        ("Bad", "Good"),
        _text("sentence", end=""),
        SENTIMENT,
        labels=("Good", "Bad"),
    ),
    "cb": HubTaskSpec(
        "aps/super_glue",
        "cb",
        "validation",
        "train",
        ("entailment", "contradiction", "neutral"),
        _sentence_pair("premise", "hypothesis"),
        NLI,
    ),
    "copa": HubTaskSpec("aps/super_glue", "copa", "validation", "train", ("A", "B"), _copa, ""),
    "wic": HubTaskSpec(
        "aps/super_glue",
        "wic",
        "validation",
        "train",
        ("False", "True"),
        lambda row: f"word: {row['word']}\n{row['sentence1']}\n{row['sentence2']}",
        WIC,
        labels=("True", "False"),
    ),
    "boolq": HubTaskSpec(
        "aps/super_glue",
        "boolq",
        "validation",
        "train",
        ("False", "True"),
        lambda row: f"question: {row['question']}\npassage: {row['passage']}",
        BOOLQ,
        labels=("True", "False"),
    ),
    "multirc": HubTaskSpec(
        "aps/super_glue",
        "multirc",
        "validation",
        "train",
        ("False", "True"),
        lambda row: f"paragraph: {row['paragraph']}\nquestion: {row['question']}\ncandidate answer: {row['answer']}",
        MULTIRC,
    ),
    "imdb": HubTaskSpec(
        "stanfordnlp/imdb",
        None,
        "test",
        "train",
        ("Bad", "Good"),
        lambda row: row["text"],
        SENTIMENT,
        labels=("Good", "Bad"),
    ),
}


def default_instructions() -> dict[str, dict]:
    return {name: {"instruction": spec.instruction, "options": spec.options} for name, spec in HUB_TASKS.items()}


def _is_unlabelled(label) -> bool:
    return label is None or label in ("", "-", -1)


def _take_per_class(
    records: Sequence[Mapping], per_class: int, rng: random.Random, labels, exclude: set[str]
) -> list[dict]:
    order = list(range(len(records)))
    rng.shuffle(order)
    counts: Counter = Counter()
    taken = []
    for index in order:
        if labels is not None and all(counts[label] >= per_class for label in labels):
            break  # every class is full: the rest of a large Hub split is never read
        record = records[index]
        label, sentence = record["label"], record["sentence"]
        if _is_unlabelled(label) or counts[label] >= per_class or sentence in exclude:
            continue
        if labels is not None and label not in labels:
            raise ValueError(f"label {label!r} is not one of {list(labels)}")
        exclude.add(sentence)
        counts[label] += 1
        taken.append({"sentence": sentence, "label": label})
    return taken


def sample_splits(
    test_source: Sequence[Mapping],
    train_source: Sequence[Mapping],
    *,
    labels: Iterable[str] | None = None,
    seed: int = DEFAULT_SEED,
    test_per_class: int = TEST_PER_CLASS,
    pool_per_class: int = POOL_PER_CLASS,
    train_fraction: float = TRAIN_FRACTION,
) -> dict[str, list[dict]]:
    """The paper's split of one task: {"train", "dev", "test"} lists of {"sentence", "label"} records.

    test: at most `test_per_class` records per class of `test_source`; pool: at most `pool_per_class` per class
    of `train_source`, shuffled and split `train_fraction` / rest into train / dev. Unlabelled records (label
    None, -1, "-") are dropped and a sentence appears at most once over the three splits. Deterministic given
    `seed`. `labels` (the task's label words), when given, is checked and lets sampling stop once every class
    is full.
    """
    if test_per_class < 1 or pool_per_class < 1:
        raise ValueError(f"test_per_class={test_per_class}, pool_per_class={pool_per_class}: both must be >= 1")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must lie strictly between 0 and 1")
    labels = None if labels is None else list(labels)
    rng = random.Random(seed)
    seen: set[str] = set()
    test = _take_per_class(test_source, test_per_class, rng, labels, seen)
    pool = _take_per_class(train_source, pool_per_class, rng, labels, seen)
    rng.shuffle(pool)
    n_train = int(round(train_fraction * len(pool)))
    return {"train": pool[:n_train], "dev": pool[n_train:], "test": test}


class HubLoadError(RuntimeError):
    """A Hub dataset could not be loaded (typically: no network and no local cache)."""


class _HubRecords(Sequence):
    """A Hub split seen as {"sentence", "label"} records, formatted on access (the train splits are large)."""

    def __init__(self, dataset, spec: HubTaskSpec):
        self.dataset, self.spec = dataset, spec

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.spec.to_record(self.dataset[index])


def _load_split(name: str, spec: HubTaskSpec, split: str, load: Callable, cache_dir: str | None):
    try:
        return load(spec.path, spec.config, split=split, cache_dir=cache_dir)
    except OSError as error:  # ConnectionError when offline, DatasetNotFoundError (a FileNotFoundError), ...
        where = spec.path + (f" ({spec.config})" if spec.config else "")
        raise HubLoadError(
            f"task {name!r}: could not load {where} split {split!r}: {error}\n{OFFLINE_HINT}"
        ) from error


def _write_json(path: str, obj, indent: int | None = None) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
    os.replace(tmp, path)


def _check_task_folders(out_dir: str, names: Iterable[str], overwrite: bool) -> None:
    for name in names:
        folder = os.path.join(out_dir, name)
        if not overwrite and os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
            raise ValueError(
                f"{folder} already exists and is not empty; pass overwrite=True (--overwrite) to replace its files"
            )


def _check_top_files(out_dir: str, overwrite: bool) -> None:
    for filename, content in (("instructions.json", default_instructions()), ("orders.json", ORDERS)):
        path = os.path.join(out_dir, filename)
        if not overwrite and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if json.load(f) != content:
                    raise ValueError(
                        f"{path} differs from the builder's; pass overwrite=True (--overwrite) to replace it"
                    )


def _resolve_names(tasks: str | Sequence[str] | None) -> list[str]:
    if tasks is None:
        return list(HUB_TASKS)
    if isinstance(tasks, str):
        names = list(ORDERS[tasks]) if tasks in ORDERS else [n for n in tasks.split(",") if n]
    else:
        names = list(tasks)
    unknown = [n for n in names if n not in HUB_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown tasks {unknown or tasks!r}; known: {list(HUB_TASKS)} or an order of {list(ORDERS)}")
    return names


def build_task(
    name: str,
    out_dir: str,
    seed: int = DEFAULT_SEED,
    load: Callable | None = None,
    cache_dir: str | None = None,
    *,
    test_per_class: int = TEST_PER_CLASS,
    pool_per_class: int = POOL_PER_CLASS,
    train_fraction: float = TRAIN_FRACTION,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write `out_dir/<name>/{train,dev,test,labels}.json` from the Hub; returns the size of each split.

    `load` is called as `load(path, config, split=..., cache_dir=...)` (default `datasets.load_dataset`).
    Refuses a non-empty task folder unless `overwrite`, before loading or writing anything.
    """
    (name,) = _resolve_names([name])
    _check_task_folders(out_dir, [name], overwrite)
    if load is None:
        from datasets import load_dataset as load
    spec = HUB_TASKS[name]
    splits = sample_splits(
        _HubRecords(_load_split(name, spec, spec.test_split, load, cache_dir), spec),
        _HubRecords(_load_split(name, spec, spec.train_split, load, cache_dir), spec),
        labels=spec.options,
        seed=seed,
        test_per_class=test_per_class,
        pool_per_class=pool_per_class,
        train_fraction=train_fraction,
    )
    empty = [split for split, records in splits.items() if not records]
    if empty:
        raise ValueError(
            f"task {name!r}: no labelled examples for {empty} (Hub splits {spec.test_split!r}, {spec.train_split!r})"
        )
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    for split, records in splits.items():
        _write_json(os.path.join(folder, f"{split}.json"), records)
    _write_json(os.path.join(folder, "labels.json"), spec.options)  # last: a folder without it is incomplete
    counts = {split: len(records) for split, records in splits.items()}
    logger.info("%s: %s from %s", name, counts, spec.path)
    return counts


def build_benchmark(
    out_dir: str,
    tasks: str | Sequence[str] | None = None,
    seed: int = DEFAULT_SEED,
    load: Callable | None = None,
    cache_dir: str | None = None,
    *,
    test_per_class: int = TEST_PER_CLASS,
    pool_per_class: int = POOL_PER_CLASS,
    train_fraction: float = TRAIN_FRACTION,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Build `tasks` (all 15 by default; names, comma-separated names or an order) plus instructions.json and
    orders.json (for all tasks and orders 1-6). Returns the split sizes of each task built."""
    names = _resolve_names(tasks)
    _check_task_folders(out_dir, names, overwrite)  # every refusal before the first write
    _check_top_files(out_dir, overwrite)
    options = dict(
        test_per_class=test_per_class,
        pool_per_class=pool_per_class,
        train_fraction=train_fraction,
        overwrite=overwrite,
    )
    counts = {name: build_task(name, out_dir, seed, load, cache_dir, **options) for name in names}
    _write_json(os.path.join(out_dir, "instructions.json"), default_instructions(), indent=1)
    _write_json(os.path.join(out_dir, "orders.json"), ORDERS, indent=1)
    return counts

"""The Hub builders of the benchmark folder, on small fake datasets with the Hub's column names (no network)."""

import functools
import json
import os
from collections import Counter

import datasets
import pytest
from tiny import load_script

from jumplora_hf.bench.cl_benchmark import load_cl_benchmark
from jumplora_hf.bench.hub_builders import HUB_TASKS, ORDERS, HubLoadError, build_benchmark, build_task, sample_splits

ROOT = os.path.dirname(os.path.dirname(__file__))
CAPS = dict(test_per_class=5, pool_per_class=10)
N_TEST, N_TRAIN = 8, 14  # fake rows per class in the Hub test / train source: above the caps, so sampling matters

# Task -> (Hub id, config, test source, train source, labels.json of the paper's folder).
EXPECTED = {
    "agnews": ("fancyzhx/ag_news", None, "test", "train", ["World", "Sports", "Business", "Science or Technology"]),
    "dbpedia": (
        "fancyzhx/dbpedia_14",
        None,
        "test",
        "train",
        [
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
        ],
    ),
    "yahoo": (
        "community-datasets/yahoo_answers_topics",
        None,
        "test",
        "train",
        [
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
        ],
    ),
    "yelp": (
        "Yelp/yelp_review_full",
        None,
        "test",
        "train",
        ["very negative", "negative", "neutral", "positive", "very positive"],
    ),
    "amazon": (
        "SetFit/amazon_reviews_multi_en",
        None,
        "test",
        "train",
        ["very negative", "negative", "neutral", "positive", "very positive"],
    ),
    "mnli": ("nyu-mll/glue", "mnli", "validation_matched", "train", ["neutral", "entailment", "contradiction"]),
    "qqp": ("nyu-mll/glue", "qqp", "validation", "train", ["False", "True"]),
    "rte": ("nyu-mll/glue", "rte", "validation", "train", ["contradiction", "entailment"]),
    "sst2": ("nyu-mll/glue", "sst2", "validation", "train", ["Good", "Bad"]),
    "cb": ("aps/super_glue", "cb", "validation", "train", ["entailment", "contradiction", "neutral"]),
    "copa": ("aps/super_glue", "copa", "validation", "train", ["A", "B"]),
    "wic": ("aps/super_glue", "wic", "validation", "train", ["True", "False"]),
    "boolq": ("aps/super_glue", "boolq", "validation", "train", ["True", "False"]),
    "multirc": ("aps/super_glue", "multirc", "validation", "train", ["False", "True"]),
    "imdb": ("stanfordnlp/imdb", None, "test", "train", ["Good", "Bad"]),
}


def _row(task, label, text, i):
    """One row of `task`'s Hub dataset with its real columns; `text` fills the text fields."""
    rows = {
        "agnews": lambda: {"text": text, "label": label},
        "dbpedia": lambda: {"label": label, "title": f"T{i}", "content": f" {text}"},
        "yahoo": lambda: {
            "id": i,
            "topic": label,
            "question_title": f"q{i}?",
            "question_content": text if i % 2 else "",
            "best_answer": text,
        },
        "yelp": lambda: {"label": label, "text": text},
        "amazon": lambda: {"id": f"en_{i}", "text": text, "label": label, "label_text": str(label)},
        "mnli": lambda: {"premise": text, "hypothesis": f"h{i}", "label": label, "idx": i},
        "qqp": lambda: {"question1": text, "question2": f"q{i}?", "label": label, "idx": i},
        "rte": lambda: {"sentence1": text, "sentence2": f"s{i}", "label": label, "idx": i},
        "sst2": lambda: {"sentence": f"{text} ", "label": label, "idx": i},
        "cb": lambda: {"premise": text, "hypothesis": f"h{i}", "idx": i, "label": label},
        "copa": lambda: {
            "premise": text,
            "choice1": "a.",
            "choice2": "b.",
            "question": ("cause", "effect")[i % 2],
            "idx": i,
            "label": label,
        },
        "wic": lambda: {
            "word": "w",
            "sentence1": text,
            "sentence2": "w.",
            "start1": 0,
            "start2": 0,
            "end1": 1,
            "end2": 1,
            "idx": i,
            "label": label,
        },
        "boolq": lambda: {"question": text, "passage": "P -- p.", "idx": i, "label": label},
        "multirc": lambda: {
            "paragraph": "p.",
            "question": text,
            "answer": "a",
            "idx": {"paragraph": 0, "question": i, "answer": 0},
            "label": label,
        },
        "imdb": lambda: {"text": text, "label": label},
    }
    return rows[task]()


def _fake_dataset(task, split, per_class, n_classes):
    rows = [_row(task, c, f"{task} {split} {c} {i}", c * 100 + i) for c in range(n_classes) for i in range(per_class)]
    rows += [_row(task, -1, f"{task} {split} unlabelled {i}", 9000 + i) for i in range(3)]
    if split == "train":  # a sentence also in the test source: it may land in one split only
        rows.append(_row(task, 0, f"{task} test 0 0", 0))
    return datasets.Dataset.from_list(rows)


class FakeHub:
    """Stands for `datasets.load_dataset`; serves each task's declared splits and records the calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, config=None, *, split, cache_dir=None):
        self.calls.append((path, config, split))
        return _fake_hub_data()[path, config, split]


@functools.cache
def _fake_hub_data():
    data = {}
    for task, (path, config, test_split, train_split, labels) in EXPECTED.items():
        data[path, config, test_split] = _fake_dataset(task, "test", N_TEST, len(labels))
        data[path, config, train_split] = _fake_dataset(task, "train", N_TRAIN, len(labels))
    return data


def _read(folder, name):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def _snapshot(root):
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_registry_covers_the_fifteen_tasks():
    assert set(HUB_TASKS) == set(EXPECTED) and len(HUB_TASKS) == 15
    assert {t for order in ORDERS.values() for t in order} == set(HUB_TASKS) and len(ORDERS) == 6
    for name, (path, config, test_split, train_split, labels) in EXPECTED.items():
        spec = HUB_TASKS[name]
        assert (spec.path, spec.config, spec.test_split, spec.train_split, spec.options) == (
            path,
            config,
            test_split,
            train_split,
            labels,
        )


@pytest.mark.parametrize(
    "task,row,sentence,label",
    [
        ("agnews", {"text": "T D", "label": 3}, "Text: T D\n", "Science or Technology"),
        ("dbpedia", {"title": "X", "content": " Y", "label": 13}, "Title: X\nText:  Y\n", "Written Work"),
        (
            "yahoo",
            {"topic": 9, "question_title": "t", "question_content": "c", "best_answer": "a"},
            "Title: t\nQuestion: c\nAnswer: a\n",
            "Politics & Government",
        ),
        (
            "yahoo",
            {"topic": 0, "question_title": "t", "question_content": "", "best_answer": "a"},
            "Question: t\nAnswer: a\n",
            "Society & Culture",
        ),
        ("yelp", {"text": "ok", "label": 0}, "Text: ok\n", "very negative"),
        ("amazon", {"text": "ok", "label": 4}, "Text: ok\n", "very positive"),
        ("mnli", {"premise": "p", "hypothesis": "h", "label": 0}, "sentence 1: p\nsentence 2: h", "entailment"),
        ("mnli", {"premise": "p", "hypothesis": "h", "label": 1}, "sentence 1: p\nsentence 2: h", "neutral"),
        ("qqp", {"question1": "a?", "question2": "b?", "label": 1}, "first sentence: a?\nsecond sentence: b?", "True"),
        ("rte", {"sentence1": "a", "sentence2": "b", "label": 1}, "sentence 1: a\nsentence 2: b", "contradiction"),
        ("sst2", {"sentence": "fine ", "label": 1}, "Text: fine ", "Good"),
        ("cb", {"premise": "p", "hypothesis": "h", "label": 2}, "sentence 1: p\nsentence 2: h", "neutral"),
        (
            "copa",
            {
                "premise": "The man turned on the faucet.",
                "choice1": "The toilet filled with water.",
                "choice2": "Water flowed from the spout.",
                "question": "effect",
                "label": 1,
            },
            'Which sentence is the effect of "The man turned on the faucet."? Choose one between A and B.\n'
            "A: The toilet filled with water.\nB: Water flowed from the spout.",
            "B",
        ),
        (
            "wic",
            {"word": "cushion", "sentence1": "To cushion a blow.", "sentence2": "Cushion the blow.", "label": 0},
            "word: cushion\nTo cushion a blow.\nCushion the blow.",
            "False",
        ),
        (
            "boolq",
            {"question": "is it", "passage": "T -- p.", "label": 1},
            "question: is it\npassage: T -- p.",
            "True",
        ),
        (
            "multirc",
            {"paragraph": "p. ", "question": "q?", "answer": "a", "label": 0},
            "paragraph: p. \nquestion: q?\ncandidate answer: a",
            "False",
        ),
        ("imdb", {"text": "Great.<br />", "label": 0}, "Great.<br />", "Bad"),
        ("sst2", {"sentence": "hidden ", "label": -1}, "Text: hidden ", None),
    ],
)
def test_rows_are_laid_out_as_in_the_papers_folder(task, row, sentence, label):
    assert HUB_TASKS[task].to_record(row) == {"sentence": sentence, "label": label}


def test_sample_splits_protocol():
    test_source = [{"sentence": f"t{i}", "label": "ab"[i % 2]} for i in range(20)] + [
        {"sentence": "x", "label": "-"},
        {"sentence": "y", "label": None},
    ]
    train_source = [{"sentence": f"p{i}", "label": "ab"[i % 2]} for i in range(40)] + [
        {"sentence": "t0", "label": "a"}
    ] * 3
    splits = sample_splits(test_source, train_source, labels=["a", "b"], seed=0, test_per_class=4, pool_per_class=10)
    assert Counter(r["label"] for r in splits["test"]) == {"a": 4, "b": 4}
    assert (len(splits["train"]), len(splits["dev"])) == (16, 4)
    sentences = [r["sentence"] for split in splits.values() for r in split]
    assert len(sentences) == len(set(sentences)) and not {"x", "y"} & set(sentences)
    assert splits == sample_splits(
        test_source, train_source, labels=["a", "b"], seed=0, test_per_class=4, pool_per_class=10
    )
    assert splits != sample_splits(
        test_source, train_source, labels=["a", "b"], seed=1, test_per_class=4, pool_per_class=10
    )
    with pytest.raises(ValueError, match="not one of"):
        sample_splits(test_source, train_source, labels=["a"])
    with pytest.raises(ValueError, match="train_fraction"):
        sample_splits(test_source, train_source, train_fraction=1.0)


@pytest.mark.parametrize("task", list(EXPECTED))
def test_build_task(task, tmp_path):
    hub = FakeHub()
    path, config, test_split, train_split, labels = EXPECTED[task]
    counts = build_task(task, str(tmp_path), seed=0, load=hub, **CAPS)
    assert sorted(hub.calls) == sorted([(path, config, test_split), (path, config, train_split)])
    folder = tmp_path / task
    assert sorted(os.listdir(folder)) == ["dev.json", "labels.json", "test.json", "train.json"]
    assert _read(folder, "labels.json") == labels
    splits = {split: _read(folder, f"{split}.json") for split in ("train", "dev", "test")}
    assert {split: len(records) for split, records in splits.items()} == counts
    for records in splits.values():
        assert all(set(r) == {"sentence", "label"} and isinstance(r["sentence"], str) for r in records)
        assert {r["label"] for r in records} <= set(labels)
    assert Counter(r["label"] for r in splits["test"]) == dict.fromkeys(labels, CAPS["test_per_class"])
    pool = splits["train"] + splits["dev"]
    assert Counter(r["label"] for r in pool) == dict.fromkeys(labels, CAPS["pool_per_class"])
    assert len(splits["train"]) == round(0.8 * len(pool))
    sentences = [r["sentence"] for records in splits.values() for r in records]
    assert len(sentences) == len(set(sentences))
    assert not any("unlabelled" in s for s in sentences)

    build_task(task, str(tmp_path / "again"), seed=0, load=hub, **CAPS)
    build_task(task, str(tmp_path / "other"), seed=1, load=hub, **CAPS)
    assert _snapshot(tmp_path / "again" / task) == _snapshot(folder) and not any(tmp_path.rglob("*.tmp"))
    assert _snapshot(tmp_path / "other" / task)["test.json"] != _snapshot(folder)["test.json"]


def test_build_benchmark_loads_with_each_order(tmp_path):
    counts = build_benchmark(str(tmp_path), seed=3, load=FakeHub(), **CAPS)
    assert set(counts) == set(EXPECTED)
    assert _read(tmp_path, "orders.json") == ORDERS
    instructions = _read(tmp_path, "instructions.json")
    for order in ORDERS:
        tasks = load_cl_benchmark(str(tmp_path), order)
        assert [t.name for t in tasks] == ORDERS[order]
    for task in load_cl_benchmark(str(tmp_path), "order4", eval_split="test"):
        assert task.options == EXPECTED[task.name][4] == instructions[task.name]["options"]
        assert task.instruction == (instructions[task.name]["instruction"] or None)
        assert task.resolved_options() == task.options  # every label is an option
    assert instructions["mnli"]["instruction"].startswith('What is the logical relationship between the "sentence 1"')


def test_refuses_to_overwrite_before_loading(tmp_path):
    hub = FakeHub()
    build_benchmark(str(tmp_path), tasks="cb,copa", seed=0, load=hub, **CAPS)
    before = _snapshot(tmp_path)
    hub.calls.clear()
    with pytest.raises(ValueError, match="overwrite=True"):
        build_task("cb", str(tmp_path), seed=1, load=hub, **CAPS)
    with pytest.raises(ValueError, match="overwrite=True"):
        build_benchmark(str(tmp_path), tasks=["wic", "copa"], seed=1, load=hub, **CAPS)
    assert hub.calls == [] and _snapshot(tmp_path) == before  # wic was not written either
    build_task("cb", str(tmp_path), seed=1, load=hub, overwrite=True, **CAPS)
    assert _snapshot(tmp_path)["cb/test.json"] != before["cb/test.json"]
    (tmp_path / "rte").mkdir()  # an empty folder is fine
    build_task("rte", str(tmp_path), load=hub, **CAPS)
    with pytest.raises(ValueError, match="unknown tasks"):
        build_benchmark(str(tmp_path / "new"), tasks="cb,nope", load=hub)


def _cli():
    return load_script("recipes/build_cl_benchmark.py")


def test_cli_offline_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubLoadError, match="HF_DATASETS_OFFLINE"):
        build_task("cb", str(tmp_path / "lib"))
    with pytest.raises(SystemExit) as exit_info:
        _cli().main(["--out_dir", str(tmp_path / "cli"), "--tasks", "cb"])
    message = str(exit_info.value.code)
    assert "aps/super_glue" in message and "HF_DATASETS_OFFLINE" in message and "--data_dir" in message
    assert not (tmp_path / "cli" / "instructions.json").exists()


def test_cli_builds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "load_dataset", FakeHub())
    counts = _cli().main(
        ["--out_dir", str(tmp_path), "--tasks", "order1", "--test_per_class", "2", "--pool_per_class", "5"]
    )
    assert list(counts) == ORDERS["order1"] and counts["agnews"] == {"train": 16, "dev": 4, "test": 8}
    assert "dbpedia" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--overwrite"):
        _cli().main(["--out_dir", str(tmp_path), "--tasks", "agnews"])

"""The offline demo (recipes/demo.py) on a tiny Llama, and the conflicting task stream it trains on."""

import itertools
import json
import os
import re
import sys

import pytest
from tiny import tiny_llama, tokenizer

from jumplora_hf.bench import synthetic
from jumplora_hf.bench.synthetic import CATEGORY_RULES, conflicting_task_stream

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
import demo  # recipes/demo.py

# the words by which a sentence mentions each category
CATEGORY_WORDS = {
    "animal": [w for pair in synthetic._ANIMALS for w in pair],
    "color": synthetic._COLORS,
    "number": synthetic._NUMBERS,
    "food": synthetic._FOODS,
    "place": synthetic._PLACES,
    "day": synthetic._DAYS,
}


def _mentions(sentence: str, category: str) -> bool:
    text = f" {sentence.rstrip('.')} "
    return any(f" {word} " in text for word in CATEGORY_WORDS[category])


def test_every_task_has_the_same_label_words_and_its_own_question():
    tasks = conflicting_task_stream(len(CATEGORY_RULES), n_train=20, n_eval=10)
    assert [t.name for t in tasks] == [name for name, _ in CATEGORY_RULES]
    for task in tasks:
        assert task.options == ["yes", "no"] and task.resolved_options() == ["yes", "no"]
        assert task.instruction.startswith("Does the sentence mention ") and task.instruction.endswith("?")
    assert len({t.instruction for t in tasks}) == len(tasks)


def test_labels_follow_each_task_rule_and_are_balanced():
    for task in conflicting_task_stream(len(CATEGORY_RULES), n_train=64, n_eval=31, seed=3):
        for split, n in ((task.train_dataset, 64), (task.eval_dataset, 31)):
            assert len(split) == n
            assert sum(r["label"] == "yes" for r in split) in (n // 2, (n + 1) // 2)
            for record in split:
                assert (record["label"] == "yes") == _mentions(record["sentence"], task.name), record
                assert record["mentions"] == [
                    name for name, _ in CATEGORY_RULES if _mentions(record["sentence"], name)
                ]


def test_rules_disagree_on_about_half_of_the_sentences():
    """The docstring's numbers: over the 4 × 384 training sentences of seed 0, the rules of two tasks give
    different labels to 0.50 of the sentences on average, 0.45-0.55 for every pair."""
    tasks = conflicting_task_stream(4, n_train=384, n_eval=48, seed=0)
    sentences = [r["sentence"] for t in tasks for r in t.train_dataset]
    rates = [
        sum(_mentions(s, a.name) != _mentions(s, b.name) for s in sentences) / len(sentences)
        for a, b in itertools.combinations(tasks, 2)
    ]
    assert all(0.45 <= rate <= 0.55 for rate in rates), rates
    assert abs(sum(rates) / len(rates) - 0.5) < 0.02, rates
    # answering an old task by the newest task's rule is right about half of the time: chance
    newest = tasks[-1].name
    for old in tasks[:-1]:
        by_newest = [_mentions(r["sentence"], newest) == (r["label"] == "yes") for r in old.eval_dataset]
        assert 0.3 <= sum(by_newest) / len(by_newest) <= 0.7


def test_stream_is_deterministic_in_the_seed():
    def records(seed):
        return [(t.train_dataset, t.eval_dataset) for t in conflicting_task_stream(4, 16, 8, seed=seed)]

    assert records(5) == records(5)
    assert records(5) != records(6)
    with pytest.raises(ValueError, match="n_tasks"):
        conflicting_task_stream(len(CATEGORY_RULES) + 1, 16, 8)


def test_training_examples_per_task():
    tasks = conflicting_task_stream(3, n_train=[8, 4, 6], n_eval=2)
    assert [len(t.train_dataset) for t in tasks] == [8, 4, 6] and all(len(t.eval_dataset) == 2 for t in tasks)
    assert tasks[0].train_dataset == conflicting_task_stream(1, n_train=8, n_eval=2)[0].train_dataset
    with pytest.raises(ValueError, match="one count or one per task"):
        conflicting_task_stream(3, n_train=[8, 4], n_eval=2)


@pytest.fixture
def tiny_model_dir(tmp_path):
    path = tmp_path / "model"
    tiny_llama().save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def test_demo_on_a_tiny_llama(tiny_model_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = [
        "--model_dir",
        str(tiny_model_dir),
        "--output_root",
        str(runs),
        "--tasks",
        "4",
        "--first_task_examples",
        "16",
        "--train_examples",
        "16",
        "--batch_size",
        "4",
        "--eval_examples",
        "4",
        "--max_source_length",
        "192",
        "--learning_rate",
        "1e-2",
    ]
    reports = demo.main(argv)
    out = capsys.readouterr().out
    assert list(reports) == ["inclora", "jumplora_inclora"]  # the default methods
    for method, report in reports.items():
        assert report["tasks"] == ["color", "number", "food", "place"]
        acc = report["accuracy_matrix"]
        assert all((acc[i][j] is None) == (j > i) for i in range(4) for j in range(4))
        assert len(report["per_task"]) == 4
        assert json.loads((runs / method / "continual_metrics.json").read_text())["accuracy_matrix"] == acc
        assert (runs / method / "accuracy_matrix.png").exists()
    assert all(t["sparsity"]["mean"] < 0.01 for t in reports["inclora"]["per_task"])  # dense updates
    assert all(t["sparsity"]["mean"] > 0.1 for t in reports["jumplora_inclora"]["per_task"])  # gated: sparse

    assert f"reusing the converted model in {tiny_model_dir}" in out
    assert "  color: Does the sentence mention a color?  (16 training / 4 evaluation examples)" in out
    assert "inclora: task 1/4 'color': training, 16 examples in 4 steps" in out
    assert re.search(r"jumplora_inclora: task 4/4 'place' done in \d+ s: accuracies \d\.\d{3}  \d\.\d{3}", out)
    for name in ("IncLoRA", "JumpLoRA + IncLoRA"):
        assert f"{name}: a[i][j] = accuracy on task j after training task i" in out
    assert out.count("  after place: ") == 3 and out.count("mean Jaccard with earlier tasks") == 6
    assert out.count("dense (0% sparse)") == 4
    assert re.search(r"^OA \d\.\d{3}   BWT [+-]\d\.\d{3}$", out, re.M)
    assert (
        "answering each earlier task by the newest task's question instead (complete forgetting) would score:" in out
    )
    assert re.search(r"^  after place: \d\.\d{3}  \d\.\d{3}  \d\.\d{3}$", out, re.M)
    assert re.search(
        r"^IncLoRA OA \d\.\d{3} BWT [+-]\d\.\d{3} \| JumpLoRA \+ IncLoRA OA \d\.\d{3} BWT [+-]\d\.\d{3}$", out, re.M
    )

    # a rerun resumes the finished runs (nothing left to train); --fresh deletes them first
    assert demo.main(argv) == reports
    out = capsys.readouterr().out
    assert "inclora: resuming the finished tasks in" in out and "training," not in out
    demo.main(argv + ["--fresh", "--methods", "inclora", "--tasks", "1"])
    out = capsys.readouterr().out
    assert f"--fresh: deleting {runs}" in out and not (runs / "jumplora_inclora").exists()
    assert "IncLoRA OA" in out and "BWT -" in out  # BWT is undefined after one task

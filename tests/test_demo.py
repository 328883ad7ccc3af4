"""The offline demo (recipes/demo.py) on a tiny Llama, and the Standard-CL-shaped stream it trains on."""

import json
import os
import re
import sys

import pytest
from tiny import tiny_llama, tokenizer

from jumplora_hf.bench import synthetic
from jumplora_hf.bench.synthetic import STANDARD_LIKE_TASKS, standard_like_stream

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
_environment = dict(os.environ)
import demo  # noqa: E402  (recipes/demo.py)

# the script pins CPU kernels for its own process; collecting this file must not pin them for every test's subprocesses
os.environ.clear()
os.environ.update(_environment)


def _properties_of(sentence: str) -> dict[str, str]:
    """Read the four properties back from a sentence, with the generator's word lists."""

    def which(table):
        found = [k for k, words in table.items() if any(re.search(rf"\b{re.escape(w)}\b", sentence) for w in words)]
        assert len(found) == 1, (sentence, found)
        return found[0]

    return {
        "topic": which(synthetic._TOPIC_WORDS),
        "sentiment": which(synthetic._SENTIMENT_WORDS),
        "amount": which(synthetic._AMOUNTS),
        "animal": which(synthetic._ANIMALS),
    }


def test_four_kinds_of_task_with_disjoint_label_sets():
    tasks = standard_like_stream(4, n_train=40, n_eval=12, seed=3)
    assert [t.name for t in tasks] == ["topic", "sentiment", "amount", "animal"]
    labels = [set(t.options) for t in tasks]
    assert all(not (a & b) for i, a in enumerate(labels) for b in labels[i + 1 :])
    assert len({t.instruction for t in tasks}) == 4
    for task, (_, _, options) in zip(tasks, STANDARD_LIKE_TASKS):
        for split, n in ((task.train_dataset, 40), (task.eval_dataset, 12)):
            assert len(split) == n
            counts = [sum(r["label"] == o for r in split) for o in options]
            assert max(counts) - min(counts) <= 1  # balanced
            for record in split:
                assert _properties_of(record["sentence"]) == record["properties"], record
                assert record["properties"][task.name] == record["label"]
        assert not {r["sentence"] for r in task.train_dataset} & {r["sentence"] for r in task.eval_dataset}


def test_stream_is_deterministic_in_the_seed_and_checks_its_arguments():
    def records(seed):
        return [(t.train_dataset, t.eval_dataset) for t in standard_like_stream(4, 16, 8, seed=seed)]

    assert records(5) == records(5) and records(5) != records(6)
    assert [len(t.train_dataset) for t in standard_like_stream(3, n_train=[8, 4, 6], n_eval=2)] == [8, 4, 6]
    with pytest.raises(ValueError, match="n_tasks"):
        standard_like_stream(5, 16, 8)
    with pytest.raises(ValueError, match="one count or one per task"):
        standard_like_stream(3, n_train=[8, 4], n_eval=2)


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
    methods = ["inclora", "jumplora_inclora"]
    assert [m for m in reports if m != "revert"] == methods  # the default methods
    for method in methods:
        report = reports[method]
        assert report["tasks"] == ["topic", "sentiment", "amount", "animal"]
        acc = report["accuracy_matrix"]
        assert all((acc[i][j] is None) == (j > i) for i in range(4) for j in range(4))
        assert json.loads((runs / method / "continual_metrics.json").read_text())["accuracy_matrix"] == acc
        assert (runs / method / "accuracy_matrix.png").exists() and len(os.listdir(runs / method / "ledger")) == 4
        shares = report["answer_sources"]
        assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert all(t["sparsity"]["mean"] < 0.01 for t in reports["inclora"]["per_task"])  # dense updates
    assert all(t["sparsity"]["mean"] > 0.1 for t in reports["jumplora_inclora"]["per_task"])  # gated: sparse

    # the printed claims: one line per task start and end, the matrices, the side-by-side summary, where the final
    # models' answers to earlier tasks come from, and what reverting the first task does
    assert f"reusing the converted model in {tiny_model_dir}" in out
    assert (
        "  topic: What is the sentence about? sports/food/weather/music  (16 training, 4 evaluation examples)" in out
    )
    assert "IncLoRA: task 1/4 'topic': training, 16 examples in 4 steps" in out
    assert re.search(r"JumpLoRA \+ IncLoRA: task 4/4 'animal' done in \d+ s: accuracies( \s*\d\.\d{3}){4}", out)
    assert out.count("  after animal: ") == 2 and "mean Jaccard with earlier tasks" in out
    assert re.search(r"^IncLoRA\s+\d\.\d{3}\s+[+-]\d\.\d{3}\s+dense", out, re.M)
    assert re.search(r"^JumpLoRA \+ IncLoRA\s+\d\.\d{3}\s+[+-]\d\.\d{3}\s+0\.\d{3}\s+0\.\d{3}$", out, re.M)
    for name in ("IncLoRA", "JumpLoRA + IncLoRA"):
        assert re.search(rf"^  {re.escape(name)}\s+own \d\.\d\d  later task \d\.\d\d  other \d\.\d\d$", out, re.M)
    revert = reports["revert"]
    assert revert["reverted"] == "topic" and len(revert["before"]) == len(revert["after"]) == 4
    assert "reverting 'topic' from the final JumpLoRA + IncLoRA model" in out
    assert re.search(r"^  after:  (\s*\d\.\d{3}){4}$", out, re.M)
    # the output reads well in a file: no progress bars, no per-step log dicts
    assert "\r" not in out and "{'loss'" not in out and "it/s]" not in out

    # a rerun resumes the finished runs (nothing left to train); --fresh deletes them first
    again = demo.main(argv)
    out = capsys.readouterr().out
    assert again["inclora"]["accuracy_matrix"] == reports["inclora"]["accuracy_matrix"]
    assert "IncLoRA: resuming the finished tasks in" in out and "': training," not in out
    demo.main(argv + ["--fresh", "--methods", "inclora", "--tasks", "1"])
    out = capsys.readouterr().out
    assert f"--fresh: deleting {runs}" in out and not (runs / "jumplora_inclora").exists()

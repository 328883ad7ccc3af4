import json

import pytest

from jumplora_hf.bench.cl_benchmark import load_cl_benchmark


@pytest.fixture
def data_dir(tmp_path):
    """A small folder with the benchmark's schema."""
    for name, labels in [("alpha", ["yes", "no"]), ("beta", ["red", "green", "blue"])]:
        folder = tmp_path / name
        folder.mkdir()
        for split, n in [("train", 20), ("dev", 6), ("test", 9)]:
            records = [{"sentence": f"{name} {split} {i}", "label": labels[i % len(labels)]} for i in range(n)]
            (folder / f"{split}.json").write_text(json.dumps(records))
        (folder / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "orders.json").write_text(json.dumps({"order1": ["beta", "alpha"]}))
    (tmp_path / "instructions.json").write_text(
        json.dumps({"beta": {"instruction": "Colour?\n", "options": ["blue", "green", "red"]}})
    )
    return tmp_path


def test_order_instructions_and_fallbacks(data_dir):
    tasks = load_cl_benchmark(str(data_dir), "order1")
    assert [t.name for t in tasks] == ["beta", "alpha"]
    beta, alpha = tasks
    assert beta.options == ["blue", "green", "red"] and beta.instruction == "Colour?\n"
    assert alpha.options == ["yes", "no"] and alpha.instruction is None  # labels.json, package default wording
    assert len(alpha.train_dataset) == 20 and len(alpha.eval_dataset) == 6
    assert len(load_cl_benchmark(str(data_dir), ["alpha"], eval_split="test")[0].eval_dataset) == 9
    assert alpha.resolved_options() == ["yes", "no"]  # every label is an option, in labels.json's order


def test_subsampling_is_fixed_by_seed(data_dir):
    first = load_cl_benchmark(str(data_dir), "alpha,beta", max_train_examples=5, max_eval_examples=3, seed=1)
    again = load_cl_benchmark(str(data_dir), "alpha,beta", max_train_examples=5, max_eval_examples=3, seed=1)
    other = load_cl_benchmark(str(data_dir), "alpha,beta", max_train_examples=5, max_eval_examples=3, seed=2)
    assert [len(t.train_dataset) for t in first] == [5, 5] and [len(t.eval_dataset) for t in first] == [3, 3]
    assert [t.train_dataset for t in first] == [t.train_dataset for t in again]
    assert [t.train_dataset for t in first] != [t.train_dataset for t in other]


@pytest.mark.parametrize(
    "tasks,kwargs,error,message",
    [
        ("order9", {}, ValueError, r"neither an order.*tasks there: \['alpha', 'beta'\]"),
        (["alpha", "gamma"], {}, ValueError, "gamma"),
        ("alpha", {"eval_split": "train"}, ValueError, "use 'dev' to tune"),
    ],
)
def test_bad_requests_name_what_exists(data_dir, tasks, kwargs, error, message):
    with pytest.raises(error, match=message):
        load_cl_benchmark(str(data_dir), tasks, **kwargs)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark folder"):
        load_cl_benchmark(str(tmp_path / "nowhere"), "order1")

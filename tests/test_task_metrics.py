"""Tasks beyond label classification: a generation task scored by a local `evaluate` module or a callable, next to
a labelled task scored by exact match; the accuracy matrix holds each task's own score and the report its metric."""

import os

import pytest
from tiny import keyword_task, tiny_t5, tokenizer

from jumplora_hf import ContinualConfig, ContinualTask, ContinualTrainer, JumpLoraConfig
from jumplora_hf.data import encode_task

METRIC_DIR = os.path.join(os.path.dirname(__file__), "metrics", "token_f1")


def _copy_task(n: int, seed: int) -> list[dict]:
    words = "red green blue cat dog sun moon tree rock fire ice".split()
    out = []
    for i in range(n):
        picked = [words[(seed + i * 3 + k) % len(words)] for k in range(3)]
        out.append({"sentence": " ".join(picked), "label": " ".join(reversed(picked))})
    return out


def _generation_task(metric, key=None):
    return ContinualTask(
        "reverse",
        _copy_task(16, 0),
        _copy_task(8, 5),
        instruction="Reverse the words.",
        generation=True,
        metric=metric,
        metric_key=key,
    )


def test_generation_task_prompt_has_no_options_and_free_targets():
    task = _generation_task(None)
    encoded = encode_task(task, tokenizer(), True, 128)
    prompt = tokenizer().decode(encoded.prompts[0]["input_ids"])
    assert "Options:" not in prompt and "Reverse the words." in prompt
    assert (
        encoded.max_new_tokens
        == max(len(tokenizer()(r["label"], add_special_tokens=False)["input_ids"]) for r in task.train_dataset) + 1
    )
    assert encoded.metric_name == "exact_match"


def test_mixed_sequence_reports_each_tasks_metric(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    labelled = keyword_task("colors", ["red", "blue"], ["cat", "dog"], 16, 8, seed=1)
    overlap = lambda predictions, references: {
        "overlap": sum(p == r for p, r in zip(predictions, references)) / len(references)
    }
    tasks = [
        labelled,
        _generation_task(METRIC_DIR, "token_f1"),
        ContinualTask("reverse2", _copy_task(16, 2), _copy_task(8, 7), generation=True, metric=overlap),
    ]
    args = ContinualConfig(
        output_dir=str(tmp_path),
        method="jumplora_inclora",
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = ContinualTrainer(
        tiny_t5(), args, tokenizer(), peft_config=JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    )
    report = trainer.train_continual(tasks)
    assert report["metrics"] == ["exact_match", "token_f1", "overlap"]
    assert [t["metric"] for t in report["per_task"]] == ["exact_match", "token_f1", "overlap"]
    assert all(0.0 <= v <= 1.0 for row in report["accuracy_matrix"] for v in row if v is not None)


@pytest.mark.parametrize(
    "metric,key,message",
    [
        ("no/such/metric_anywhere", None, "evaluate.load.*failed.*local metric module or a callable"),
        (lambda p, r: {"a": 1.0, "b": 2.0}, None, r"returns \['a', 'b'\]: set the task's metric_key"),
        (lambda p, r: 1 / 0, None, "fails on its own labels"),
        (42, None, "must be None, a callable"),
    ],
)
def test_bad_metrics_are_refused_before_training(metric, key, message):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=message):
        encode_task(_generation_task(metric, key), tokenizer(), True, 128)

"""Publishing a run, offline: the upload calls and their arguments through an injected client with `HfApi`'s
interface, the exact folders pushed, the model card parsed back, per-task pushes and tags, no re-push after a
resume, and `recipes/publish.py` for a finished run dir."""

import inspect
import json
import logging
import os
import shutil
import sys
import time

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from tiny import continual_args, task_stream, tiny_llama, tokenizer
from transformers import AutoModelForCausalLM

from jumplora_hf import ContinualCallback, ContinualTrainer, JumpLoraConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecordingHubApi:
    """Records create_repo / upload_folder / create_tag calls (checked against HfApi's signatures) and keeps a copy
    of every uploaded folder."""

    def __init__(self, snapshots):
        self.snapshots, self.calls = snapshots, []

    def _record(self, name, *args, **kwargs):
        inspect.signature(getattr(HfApi, name)).bind(None, *args, **kwargs)  # a TypeError if HfApi would refuse it
        self.calls.append((name, args, kwargs))

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", repo_id, **kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, **kwargs):
        self._record("upload_folder", **kwargs)
        oid = f"commit{sum(c[0] == 'upload_folder' for c in self.calls)}"
        shutil.copytree(kwargs["folder_path"], os.path.join(self.snapshots, oid))
        return type("CommitInfo", (), {"oid": oid})()

    def create_tag(self, repo_id, **kwargs):
        self._record("create_tag", repo_id, **kwargs)

    def list_repo_refs(self, repo_id, **kwargs):
        inspect.signature(HfApi.list_repo_refs).bind(None, repo_id, **kwargs)
        tags = [type("GitRefInfo", (), {"name": c[2]["tag"]})() for c in self.named("create_tag")]
        return type("GitRefs", (), {"tags": tags})()

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


def _trainer(out, api, tasks=3, strategy="every_save", push=True):
    args = continual_args(
        out,
        seed=5,
        push_to_hub=push,
        hub_model_id="someone/jumplora-run",
        hub_strategy=strategy,
        hub_token="hf_dummy",
        hub_private_repo=True,
    )
    trainer = ContinualTrainer(
        tiny_llama(),
        args,
        tokenizer(),
        peft_config=JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        hub_api=api,
    )
    return trainer, task_stream(3)[:tasks]


def test_per_task_pushes_tags_and_no_repush_after_resume(tmp_path):
    api = RecordingHubApi(str(tmp_path / "pushed"))
    trainer, tasks = _trainer(tmp_path / "run", api, tasks=2)
    trainer.train_continual(tasks)
    assert api.named("create_repo")[0][2] == {"token": "hf_dummy", "private": True, "exist_ok": True}
    resumed, tasks = _trainer(tmp_path / "run", api, tasks=3)  # a new process continues the run dir
    resumed.train_continual(tasks)

    tags = [c[2]["tag"] for c in api.named("create_tag")]
    assert tags == ["after-task-01-task0", "after-task-02-task1", "after-task-03-task2"]  # each task pushed once
    uploads = api.named("upload_folder")
    assert len(uploads) == 3 and all(
        c[2]["repo_id"] == "someone/jumplora-run" and c[2]["token"] == "hf_dummy" for c in uploads
    )
    assert [c[2]["revision"] for c in api.named("create_tag")] == ["commit1", "commit2", "commit3"]
    pushes = json.loads((tmp_path / "run" / "hub_pushes.json").read_text())
    assert [t["tag"] for t in pushes["tasks"]] == tags

    last = tmp_path / "pushed" / "commit3"
    files = sorted(os.path.relpath(os.path.join(d, f), last) for d, _, fs in os.walk(last) for f in fs)
    assert {"README.md", "config.json", "model.safetensors", "continual_metrics.json", "tokenizer_config.json"} <= set(
        files
    )
    assert [f for f in files if f.startswith("ledger/")] == [
        "ledger/task-01-task0.safetensors",
        "ledger/task-02-task1.safetensors",
        "ledger/task-03-task2.safetensors",
    ]
    assert sorted(os.listdir(tmp_path / "pushed" / "commit1" / "ledger")) == ["task-01-task0.safetensors"]
    # the pushed model after the third task is a plain checkpoint of the merged weights
    merged = AutoModelForCausalLM.from_pretrained(last)
    params = dict(merged.named_parameters())
    for name, layer in resumed.model.named_modules():
        if hasattr(layer, "lora_gate_state"):
            key = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(params[key], layer.get_base_layer().weight), key

    card = ModelCard.load(last / "README.md")
    assert {"continual-learning", "jumplora"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert [r.metric_type for r in card.data.eval_results] == ["overall_accuracy", "backward_transfer"]
    assert card.data.eval_results[0].dataset_name == "task0 → task1 → task2"
    text = card.text
    assert "task0 → task1 → task2" in text and "| after \\ on | task0 | task1 | task2 |" in text
    assert 'revision="after-task-02-task1"' in text and "python -m jumplora_hf.ledger revert" in text
    assert json.loads((last / "continual_metrics.json").read_text())["tasks"] == ["task0", "task1", "task2"]


def test_end_strategy_pushes_once_when_asked(tmp_path):
    api = RecordingHubApi(str(tmp_path / "pushed"))
    trainer, tasks = _trainer(tmp_path / "run", api, strategy="end")
    report = trainer.train_continual(tasks)
    assert not api.named("upload_folder")  # nothing during training
    commit = trainer.push_to_hub()
    assert commit == "commit1" and not api.named("create_tag") and len(api.named("upload_folder")) == 1
    pushed = tmp_path / "pushed" / "commit1"
    assert json.loads((pushed / "continual_metrics.json").read_text())["accuracy_matrix"] == report["accuracy_matrix"]
    assert len(os.listdir(pushed / "ledger")) == 3


def test_publish_a_finished_run_dir_later(tmp_path, capsys):
    trainer, tasks = _trainer(tmp_path / "run", None, strategy="end", push=False)
    trainer.train_continual(tasks)
    trainer.save_merged_model(str(tmp_path / "run" / "merged"))
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    import publish

    api = RecordingHubApi(str(tmp_path / "pushed"))
    assert publish.main([str(tmp_path / "run"), "--hub_model_id", "me/later", "--no_ledger"], api=api) == 0
    pushed = tmp_path / "pushed" / "commit1"
    assert (pushed / "model.safetensors").exists() and not (pushed / "ledger").exists()
    assert (
        "ledger"
        not in ModelCard.load(pushed / "README.md").text.split("## Results")[1].lower().split("## citation")[0]
    )
    assert (
        publish.main(
            [str(tmp_path / "run"), "--hub_model_id", "me/later", "--stage_only", str(tmp_path / "staged")], api=api
        )
        == 0
    )
    assert (tmp_path / "staged" / "README.md").exists() and len(api.named("upload_folder")) == 1
    assert publish.main([str(tmp_path / "nothing"), "--hub_model_id", "me/x"], api=api) == 2
    assert "no continual_metrics.json" in capsys.readouterr().err


@pytest.mark.parametrize("strategy,per_task", [("end", False), ("every_save", True), ("checkpoint", True)])
def test_hub_strategy_maps_to_per_task_pushes(tmp_path, strategy, per_task):
    from jumplora_hf.hub import HubPublisher

    trainer, _ = _trainer(tmp_path, RecordingHubApi(str(tmp_path / "p")), strategy=strategy)
    assert HubPublisher.from_trainer(trainer).per_task is per_task


def _card_inputs():
    report = {
        "method": "jumplora_inclora",
        "tasks": ["a", "b"],
        "accuracy_matrix": [[1.0, None], [0.5, 1.0]],
        "overall_accuracy": 0.75,
        "backward_transfer": -0.5,
        "per_task": [
            {"name": "a", "metric": "exact_match", "sparsity": {"mean": 0.7}, "tau": {"global": 0.001}},
            {"name": "b", "metric": "exact_match", "sparsity": {"mean": 0.6}, "jaccard_with_previous": {"mean": 0.2}},
        ],
    }
    return report, {"training": {"method": "jumplora_inclora"}, "adapters": {"r": 4}}


@pytest.mark.parametrize(
    "base,local,encoder_decoder,auto_class",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False, False, "AutoModelForCausalLM"),
        ("models/SmolLM2-135M-Instruct", True, False, "AutoModelForCausalLM"),
        ("google-t5/t5-large", False, True, "AutoModelForSeq2SeqLM"),
    ],
)
def test_card_names_a_hub_base_model_only_and_loads_with_the_right_class(
    tmp_path, base, local, encoder_decoder, auto_class
):
    from jumplora_hf.card import build_model_card

    report, run_config = _card_inputs()
    run_config.update(base_model=base, base_model_is_local=local, is_encoder_decoder=encoder_decoder)
    build_model_card(report, run_config, "me/run").save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    # the Hub validates base_model as a model id: a local folder (which looks like owner/name) stays out of it
    assert card.data.base_model == (None if local else base)
    assert f"`{base}`" in card.text and ("(a local checkpoint)" in card.text) is local
    assert f'{auto_class}.from_pretrained("me/run")' in card.text and "hf download me/run" in card.text
    assert "huggingface-cli" not in card.text  # not in huggingface_hub 1.x / 2.x


class SlowHubApi(RecordingHubApi):
    """Each upload takes `delay` seconds; records when each started and ended."""

    def __init__(self, snapshots, delay):
        super().__init__(snapshots)
        self.delay, self.times = delay, []

    def upload_folder(self, **kwargs):
        start = time.monotonic()
        time.sleep(self.delay)
        result = super().upload_folder(**kwargs)
        self.times.append((start, time.monotonic()))
        return result


class FailingHubApi(RecordingHubApi):
    """The second upload fails (the network went away); or, with `tag_then_fail`, the second push reaches the Hub
    (commit and tag) but the client fails afterwards, so the run never records it."""

    def __init__(self, snapshots, tag_then_fail=False):
        super().__init__(snapshots)
        self.tag_then_fail = tag_then_fail

    def upload_folder(self, **kwargs):
        if not self.tag_then_fail and len(self.named("upload_folder")) == 1:
            raise ConnectionError("the network is down")
        return super().upload_folder(**kwargs)

    def create_tag(self, repo_id, **kwargs):
        super().create_tag(repo_id, **kwargs)
        if self.tag_then_fail and len(self.named("create_tag")) == 2:
            raise ConnectionError("the connection dropped after the tag")


class TaskClock(ContinualCallback):
    def __init__(self):
        self.begins = []

    def on_task_begin(self, args, state, control, **kwargs):
        self.begins.append(time.monotonic())


def test_uploads_run_beside_the_training_and_the_run_waits_for_them_at_the_end(tmp_path):
    api = SlowHubApi(str(tmp_path / "pushed"), delay=1.5)
    trainer, tasks = _trainer(tmp_path / "run", api)
    clock = TaskClock()
    trainer.add_callback(clock)
    trainer.train_continual(tasks)
    # the first upload was still running when the second task began: the training did not wait for it
    assert api.times[0][1] > clock.begins[1]
    assert len(api.times) == 3 and all(a[1] <= b[0] for a, b in zip(api.times, api.times[1:]))  # one at a time
    pushes = json.loads((tmp_path / "run" / "hub_pushes.json").read_text())
    assert [t["tag"] for t in pushes["tasks"]] == ["after-task-01-task0", "after-task-02-task1", "after-task-03-task2"]
    assert not (tmp_path / "run" / "hub_pending").exists()  # every staged folder removed once uploaded


@pytest.mark.parametrize("tag_then_fail", [False, True])
def test_a_failed_push_stays_staged_and_the_restart_uploads_it_in_order(tmp_path, caplog, tag_then_fail):
    api = FailingHubApi(str(tmp_path / "pushed"), tag_then_fail=tag_then_fail)
    trainer, tasks = _trainer(tmp_path / "run", api)
    with caplog.at_level(logging.ERROR):
        report = trainer.train_continual(tasks)  # the training itself finishes
    assert report["tasks"] == ["task0", "task1", "task2"]
    assert "Hub uploads failed: task 2 (task1)" in caplog.text and "--retry_pending" in caplog.text
    pushes = json.loads((tmp_path / "run" / "hub_pushes.json").read_text())
    assert [t["tag"] for t in pushes["tasks"]] == ["after-task-01-task0"]
    # task 3 waited behind the failed task 2, so the branch history stays in task order
    assert sorted(os.listdir(tmp_path / "run" / "hub_pending")) == ["after-task-02-task1", "after-task-03-task2"]
    uploads_before = len(api.named("upload_folder"))

    api.tag_then_fail, api.upload_folder = False, lambda **kw: RecordingHubApi.upload_folder(api, **kw)  # back online
    resumed, _ = _trainer(tmp_path / "run", api)
    resumed.train_continual(tasks)  # nothing left to train: it uploads what was staged, then returns
    pushes = json.loads((tmp_path / "run" / "hub_pushes.json").read_text())
    assert [t["tag"] for t in pushes["tasks"]] == ["after-task-01-task0", "after-task-02-task1", "after-task-03-task2"]
    # a push the Hub already had (its tag exists) is recorded, not uploaded again
    assert len(api.named("upload_folder")) - uploads_before == (1 if tag_then_fail else 2)
    assert [c[2]["tag"] for c in api.named("create_tag")] == [t["tag"] for t in pushes["tasks"]]
    assert not (tmp_path / "run" / "hub_pending").exists()

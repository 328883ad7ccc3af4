"""The task sequence inside one Trainer: every method on a tiny T5 and a tiny Llama."""

import dataclasses
import json
import os

import pytest
import torch
from tiny import TINY_MODELS, continual_args, task_stream, tokenizer
from transformers import TrainerCallback

from jumplora_hf import ContinualTrainer, JumpLoraConfig
from jumplora_hf.bench.generation import evaluate_tasks
from jumplora_hf.bench.reports import write_run_reports
from jumplora_hf.data import encode_task
from jumplora_hf.ella import ella_penalty
from jumplora_hf.layer import iter_jumplora_layers
from jumplora_hf.lifecycle import end_task
from jumplora_hf.methods import METHODS
from jumplora_hf.metrics import pack_support
from jumplora_hf.steps import TaskSpan

TARGETS = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}


def _args(tmp_path, method="jumplora_inclora", **overrides):
    return continual_args(tmp_path / "out", method, **overrides)


def _trainer(tmp_path, arch="t5", method="jumplora_inclora", callbacks=None, **overrides):
    config = JumpLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch])
    return ContinualTrainer(
        TINY_MODELS[arch](), _args(tmp_path, method, **overrides), tokenizer(), peft_config=config, callbacks=callbacks
    )


class _TaskStartProbe(TrainerCallback):
    """Records, at every task's first step, whether ΔW = 0, the optimizer state and the learning rate."""

    def __init__(self):
        self.trainer = None
        self.delta_is_zero, self.optimizers, self.state_sizes, self.first_lrs = [], [], [], []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step not in {span.first_step for span in self.trainer.task_spans}:
            return
        self.delta_is_zero.append(
            all(not layer.delta_weight("default").any() for _, layer in iter_jumplora_layers(model))
        )
        self.optimizers.append(optimizer)
        self.state_sizes.append(len(optimizer.state))
        self.first_lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_three_task_run_for_every_method(tmp_path, arch, method):
    probe = _TaskStartProbe()
    trainer = _trainer(tmp_path, arch, method, callbacks=[probe])
    probe.trainer = trainer
    report = trainer.train_continual(task_stream(3))
    acc = report["accuracy_matrix"]
    assert len(acc) == 3 and all(len(row) == 3 for row in acc)
    assert all((acc[i][j] is None) == (j > i) for i in range(3) for j in range(3))
    written = json.loads((tmp_path / "out" / "continual_metrics.json").read_text())
    assert written["accuracy_matrix"] == acc and written["tasks"] == ["task0", "task1", "task2"]
    assert written["backward_transfer"] == report["backward_transfer"]
    # the last row, re-measured outside the Trainer on the final (merged) model, and the metrics computed from it
    encoded = [encode_task(t, tokenizer(), arch == "t5", 512) for t in task_stream(3)]
    assert acc[2] == evaluate_tasks(trainer.model, tokenizer(), encoded)
    assert report["overall_accuracy"] == pytest.approx(sum(acc[2]) / 3)
    assert report["backward_transfer"] == pytest.approx(((acc[2][0] - acc[0][0]) + (acc[2][1] - acc[1][1])) / 2)
    sparsity = [task["sparsity"]["mean"] for task in report["per_task"]]
    if METHODS[method].jump_gate:
        assert all(s > 0.2 for s in sparsity), sparsity  # the merged ΔW_final is sparse
        assert all(task["jaccard_with_previous"]["mean"] < 1.0 for task in report["per_task"][1:])
    else:
        assert all(s < 0.01 for s in sparsity)  # plain LoRA merges a dense ΔW
    # one optimizer for the whole sequence; every task starts from ΔW = 0, an empty optimizer state and a
    # restarted LR schedule
    assert probe.delta_is_zero == [True, True, True]
    assert len({id(o) for o in probe.optimizers}) == 1 and probe.state_sizes == [0, 0, 0]
    assert probe.first_lrs == [probe.first_lrs[0]] * 3
    assert [span.first_step for span in trainer.task_spans] == [0, 4, 8] and trainer.state.global_step == 12
    counts = [int(state["step"]) for state in trainer.optimizer.state.values()]
    assert max(counts) == trainer.task_spans[-1].num_steps and min(counts) > 0  # τ starts at S_start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if METHODS[method].ella:
        assert all("loss_ella" in h and "loss_ce" in h for h in logs)
        assert any(h["loss_ella"] > 0 for h in logs if h["task"] > 0)
    if METHODS[method].jump_gate:
        assert {h["jump/gamma"] for h in logs} >= {0.0, 1.0} and any("jump/sparsity" in h for h in logs)


def test_eval_at_end_evaluates_each_task_after_it_and_all_after_the_last(tmp_path, monkeypatch):
    full = _trainer(tmp_path / "full", "llama", "jumplora_inclora")
    full_report = full.train_continual(task_stream(4))
    at_end = _trainer(tmp_path / "end", "llama", "jumplora_inclora", eval_seen_tasks="at_end")
    evaluated = []
    evaluate = at_end.evaluate_generation
    monkeypatch.setattr(at_end, "evaluate_generation", lambda task: evaluated.append(task.name) or evaluate(task))
    report = at_end.train_continual(task_stream(4))
    assert evaluated == ["task0", "task1", "task2", "task0", "task1", "task2", "task3"]  # 2T−1, not T(T+1)/2
    acc, full_acc = report["accuracy_matrix"], full_report["accuracy_matrix"]
    assert [acc[i][i] for i in range(4)] == [full_acc[i][i] for i in range(4)]  # evaluating changes no training
    assert acc[3] == full_acc[3]
    assert all(acc[i][j] is None for i in range(3) for j in range(4) if j != i)
    for key in ("overall_accuracy", "backward_transfer"):
        assert report[key] == full_report[key]
        assert [t[key] for t in report["per_task"]] == [
            full_report["per_task"][0][key],  # after the first task its row is complete
            None,
            None,
            full_report["per_task"][3][key],
        ]
    expected = dict(full.model.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in at_end.model.named_parameters() if "base_layer" in n)
    written = {os.path.basename(p) for p in write_run_reports(str(tmp_path / "end" / "out"))}
    assert {"accuracy_matrix.csv", "per_task.csv", "accuracy_matrix.png", "bwt_per_task.png"} <= written


def test_same_seed_twice_gives_identical_results(tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = _trainer(tmp_path / name, "t5", "jumplora_ella")
        report = trainer.train_continual(task_stream(3))
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "base_layer" in n}
        runs.append((report["accuracy_matrix"], weights))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys()
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


def test_ella_term_counts_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    trainer = _trainer(tmp_path, "t5", "ella", ella_lambda=[100.0])
    model = trainer.model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # a merged past task (W_past ≠ 0), then a current adapter with ΔW ≠ 0
        with torch.no_grad():
            for _, layer in iter_jumplora_layers(model):
                layer.lora_B["default"].weight.copy_(
                    torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.1
                )
        if not any(layer.ella_w_past is not None for _, layer in iter_jumplora_layers(model)):
            end_task(model, accumulate_w_past=True)
    encoded = encode_task(task_stream(1)[0], trainer.processing_class, True, 512)
    batch = trainer.data_collator([encoded.train[i] for i in range(4)])
    items = int((batch["labels"] != -100).sum())
    penalty = 100.0 * ella_penalty(model).item()
    assert penalty > 0
    # the second task begins: the regulariser takes its λ and the layers record their terms
    trainer.ella.on_task_begin(
        trainer.args, trainer.state, trainer.control, task=TaskSpan(1, 4, 0, 4, "t"), model=model
    )
    assert trainer.ella.lam == 100.0
    trainer.current_gradient_accumulation_steps = 2
    cross_entropy = super(ContinualTrainer, trainer).compute_loss
    # normalised over the whole accumulated batch: the Trainer will not divide, so the term is divided here
    added = trainer.compute_loss(model, dict(batch), num_items_in_batch=items) - cross_entropy(
        model, dict(batch), num_items_in_batch=items
    )
    assert added.item() == pytest.approx(penalty / 2, rel=1e-4)
    # a per-micro-batch mean: the Trainer divides the whole loss by the accumulation steps itself
    added = trainer.compute_loss(model, dict(batch)) - cross_entropy(model, dict(batch))
    assert added.item() == pytest.approx(penalty, rel=1e-4)


def _bad(tasks_kind):
    tasks = task_stream(2)
    if tasks_kind == "empty_train":
        tasks[1].train_dataset = []
    elif tasks_kind == "empty_eval":
        tasks[0].eval_dataset = []
    elif tasks_kind == "unknown_label":
        tasks[1].eval_dataset = tasks[1].eval_dataset + [{"sentence": "x", "label": "maybe"}]
    elif tasks_kind == "duplicate_names":
        tasks[1].name = tasks[0].name
    return tasks


@pytest.mark.parametrize(
    "kind,message",
    [
        ("empty_train", "train split is empty"),
        ("empty_eval", "eval split is empty"),
        ("unknown_label", "'maybe'.*not among the task's options"),
        ("duplicate_names", "unique"),
    ],
)
def test_bad_tasks_fail_before_training_or_writing(tmp_path, kind, message):
    trainer = _trainer(tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        trainer.train_continual(_bad(kind))
    assert not any((tmp_path / "out").rglob("*"))  # the Trainer makes output_dir; nothing is written into it
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_lambda_list_must_match_the_tasks(tmp_path):
    trainer = _trainer(tmp_path, method="jumplora_ella", ella_lambda=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="ella_lambda has 3 values for 2 tasks"):
        trainer.train_continual(task_stream(2))
    assert not any((tmp_path / "out").rglob("*"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"method": "ewc"}, "unknown method 'ewc'"),
        ({"method": "olora", "olora_lambda1": -1.0}, "must be ≥ 0"),
        ({"method": "ella", "ella_lambda": None}, "needs ella_lambda"),
        ({"method": "ella", "ella_lambda": [-1.0]}, "non-negative"),
        ({"ella_delta_mode": "dense"}, "unknown ella_delta_mode"),
        ({"eval_seen_tasks": "never"}, "unknown eval_seen_tasks"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **overrides)


def test_option_longer_than_target_budget_is_refused(tmp_path):
    trainer = _trainer(tmp_path, max_target_length=3)
    with pytest.raises(ValueError, match="needs 4 target tokens"):
        trainer.train_continual(task_stream(1))


def test_restart_continues_from_the_last_finished_task(tmp_path):
    full = _trainer(tmp_path / "full", "t5", "jumplora_ella", ella_lambda=[50.0])
    full_report = full.train_continual(task_stream(3))
    interrupted = _trainer(tmp_path / "part", "t5", "jumplora_ella", ella_lambda=[50.0])
    interrupted.train_continual(task_stream(3)[:2])  # as if the session ended after task 2
    assert (tmp_path / "part" / "out" / "continual_state.json").exists()

    first = _FirstStep()
    resumed = _trainer(
        tmp_path / "part", "t5", "jumplora_ella", callbacks=[first], ella_lambda=[50.0]
    )  # a fresh model
    report = resumed.train_continual(task_stream(3))
    assert first.step == 8  # only the unfinished task is trained, with its own step numbers (8..11 of the sequence)
    assert [h["step"] for h in resumed.state.log_history if h.get("task") == 2] == [9, 10, 11, 12]
    assert report["accuracy_matrix"] == full_report["accuracy_matrix"]
    assert [t["sparsity"] for t in report["per_task"]] == [t["sparsity"] for t in full_report["per_task"]]
    expected = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        if "base_layer" in name:
            assert torch.equal(param, expected[name]), name  # bit-identical to the uninterrupted run
    for (name, layer), (_, reference) in zip(iter_jumplora_layers(resumed.model), iter_jumplora_layers(full.model)):
        assert torch.equal(layer.ella_w_past, reference.ella_w_past), name


def test_restart_with_other_tasks_is_refused(tmp_path):
    _trainer(tmp_path, "t5", "inclora").train_continual(task_stream(2))
    state = (tmp_path / "out" / "continual_state.json").read_bytes()
    other = _trainer(tmp_path, "t5", "inclora")
    with pytest.raises(ValueError, match=r"does not start this run.*choose another output_dir"):
        other.train_continual(task_stream(3)[1:])
    assert (tmp_path / "out" / "continual_state.json").read_bytes() == state  # nothing overwritten


def test_single_task_baselines_train_every_task_from_the_base_model(tmp_path):
    trainer = _trainer(tmp_path, "t5", "jumplora_inclora", single_task_baselines=True)
    before = {
        name: layer.get_base_layer().weight.detach().clone() for name, layer in iter_jumplora_layers(trainer.model)
    }
    report = trainer.train_continual(task_stream(2))
    assert report["single_task_baselines"] and len(report["single_task_accuracies"]) == 2
    matrix = trainer.record.accuracy_matrix
    assert all(matrix[i][j] is None for i in range(2) for j in range(2) if j != i)
    assert all(0.0 <= matrix[i][i] <= 1.0 for i in range(2))
    assert report["single_task_accuracies"] == [matrix[0][0], matrix[1][1]]
    last_support = trainer.record.updates[-1].supports
    for name, layer in iter_jumplora_layers(trainer.model):
        changed = (layer.get_base_layer().weight != before[name]).cpu().numpy()
        # only the last task's update is in the weights: the first task's was undone before the second began
        assert (pack_support(changed) == last_support[name]).all(), name


def test_an_old_pickled_state_is_refused_and_never_loaded(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # not even a valid pickle: loading it would fail loudly, refusing it must not try
    (out / "continual_state.pt").write_bytes(b"\x80\x04not a state")
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="pickle, which this version never loads"):
        trainer.train_continual(task_stream(2))
    assert sorted(p.name for p in out.iterdir()) == ["continual_state.pt"]  # nothing written, nothing removed


def test_a_damaged_state_is_refused(tmp_path):
    _trainer(tmp_path, "t5", "inclora").train_continual(task_stream(2))
    tensors = next((tmp_path / "out").glob("continual_state-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(ValueError, match="does not match continual_state.json"):
        _trainer(tmp_path, "t5", "inclora").train_continual(task_stream(3))


def test_restart_with_other_settings_is_refused_naming_them(tmp_path):
    _trainer(tmp_path, "t5", "inclora").train_continual(task_stream(2))
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in ("continual_state.json", "run_config.json")}
    other = ContinualTrainer(
        TINY_MODELS["t5"](),
        _args(tmp_path, "inclora", learning_rate=5e-3),
        tokenizer(),
        peft_config=JumpLoraConfig(r=8, lora_alpha=8, target_modules=TARGETS["t5"]),
    )
    with pytest.raises(
        ValueError, match=r"other settings.*adapters\.r: 4 → 8.*training\.learning_rate: 0\.01 → 0\.005"
    ):
        other.train_continual(task_stream(3))
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing written
    changed = task_stream(2)
    changed[1] = dataclasses.replace(changed[1], train_dataset=list(changed[1].train_dataset)[:-1])
    with pytest.raises(ValueError, match=r"tasks\.task1\.train"):
        _trainer(tmp_path, "t5", "inclora").train_continual(changed)  # the same names, other data
    # what does not change the result may differ: the eval batch size, logging
    _trainer(tmp_path, "t5", "inclora", per_device_eval_batch_size=3, logging_steps=2).train_continual(task_stream(2))


class _FirstStep(TrainerCallback):
    def __init__(self):
        self.step = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step if self.step is None else self.step


def _interrupted(tmp_path, at_step, **overrides):
    """A run stopped at `at_step` (the job died there): an exception out of the Trainer's loop."""

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == at_step:
                raise KeyboardInterrupt

    trainer = _trainer(tmp_path, "t5", "jumplora_ella", callbacks=[Crash()], ella_lambda=["auto"], **overrides)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_continual(task_stream(3))


def test_a_restart_continues_inside_a_task_from_the_latest_checkpoint(tmp_path, caplog):
    settings = dict(save_strategy="steps", save_steps=3, ella_lambda=["auto"])
    full = _trainer(tmp_path / "full", "t5", "jumplora_ella", **settings)
    full_report = full.train_continual(task_stream(3))
    _interrupted(tmp_path / "part", 7, save_strategy="steps", save_steps=3)  # task 2 (steps 4-7), after checkpoint-6
    names = sorted(p.name for p in (tmp_path / "part" / "out").glob("checkpoint-*"))
    assert names == ["checkpoint-3", "checkpoint-6"]  # numbered over the whole sequence: no name is reused
    first = _FirstStep()
    resumed = _trainer(tmp_path / "part", "t5", "jumplora_ella", callbacks=[first], **settings)
    with caplog.at_level("WARNING"):
        report = resumed.train_continual(task_stream(3))
    assert "1 of 3 task(s) finished; continuing task 2 (task1) at its step 2 of 4 from" in caplog.text
    assert first.step == 6  # killed before step 7, checkpoint-6: one step redone, not the whole task
    assert report["accuracy_matrix"] == full_report["accuracy_matrix"]
    assert [t["ella_lambda"] for t in report["per_task"]] == [t["ella_lambda"] for t in full_report["per_task"]]
    expected = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, expected[name]), name  # bit-identical: merged weights and the last adapters
    assert sorted(p.name for p in (tmp_path / "part" / "out").glob("checkpoint-*")) == sorted(
        p.name for p in (tmp_path / "full" / "out").glob("checkpoint-*")
    )


def test_resume_from_checkpoint_argument(tmp_path):
    with pytest.raises(ValueError, match="holds no checkpoint or finished task"):
        _trainer(tmp_path / "empty", "t5", "jumplora_ella", ella_lambda=["auto"]).train_continual(
            task_stream(3), resume_from_checkpoint=True
        )
    _interrupted(tmp_path, 7, save_strategy="steps", save_steps=3)
    older = str(tmp_path / "out" / "checkpoint-3")  # inside task 1, which the run state has finished since
    with pytest.raises(ValueError, match="not between the last finished task's end"):
        _trainer(tmp_path, "t5", "jumplora_ella", ella_lambda=["auto"]).train_continual(
            task_stream(3), resume_from_checkpoint=older
        )
    first = _FirstStep()
    trainer = _trainer(tmp_path, "t5", "jumplora_ella", callbacks=[first], ella_lambda=["auto"])
    trainer.train_continual(task_stream(3), resume_from_checkpoint=False)  # the run state only: task 2 from its start
    assert first.step == 4


def test_single_task_baselines_start_every_task_from_the_base_even_when_resumed(tmp_path):
    full = _trainer(tmp_path / "full", "t5", "jumplora_inclora", single_task_baselines=True)
    expected = full.train_continual(task_stream(3))
    part = _trainer(tmp_path / "part", "t5", "jumplora_inclora", single_task_baselines=True)
    part.train_continual(task_stream(3)[:2])
    resumed = _trainer(tmp_path / "part", "t5", "jumplora_inclora", single_task_baselines=True)
    report = resumed.train_continual(task_stream(3))
    assert report["single_task_accuracies"] == expected["single_task_accuracies"]
    reference = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, reference[name]), name  # before: base + task 2 under task 3, not the base


def test_olora_keeps_the_earlier_tasks_subspaces_and_adds_their_orthogonality_to_the_loss(tmp_path):
    trainer = _trainer(tmp_path, "t5", "jumplora_olora", olora_lambda1=0.5, olora_lambda2=0.1)
    trainer.train_continual(task_stream(2))
    layers = list(iter_jumplora_layers(trainer.model))
    assert all(layer.olora_past_A.shape == (2 * 4, layer.in_features) for _, layer in layers)  # r rows per task
    # the loss term of one forward, against the formula computed by hand
    from jumplora_hf.olora import OLoraRegularizer, pop_olora_terms, record_olora_terms

    model = trainer.model
    model.train()
    record_olora_terms(model, True)
    ids = torch.tensor([[5, 6, 7, 1]])
    model(input_ids=ids, labels=ids)
    orthogonal, l2 = pop_olora_terms(model)
    expected_orthogonal = sum(
        (layer.olora_past_A @ layer.lora_A["default"].weight.float().t()).abs().sum() for _, layer in layers
    )
    expected_l2 = sum(
        torch.linalg.norm(layer.lora_A["default"].weight) + torch.linalg.norm(layer.lora_B["default"].weight)
        for _, layer in layers
    )
    assert torch.allclose(orthogonal, expected_orthogonal) and torch.allclose(l2, expected_l2)
    assert isinstance(trainer.olora, OLoraRegularizer) and trainer.olora in trainer.regularizers
    logs = [h for h in trainer.state.log_history if "loss_olora" in h]
    assert logs and all(h["loss_olora"] >= 0 for h in logs)


def test_olora_restart_restores_the_earlier_subspaces(tmp_path):
    full = _trainer(tmp_path / "full", "t5", "olora")
    full.train_continual(task_stream(3))
    _trainer(tmp_path / "part", "t5", "olora").train_continual(task_stream(3)[:2])
    resumed = _trainer(tmp_path / "part", "t5", "olora")
    resumed.train_continual(task_stream(3))
    for (name, layer), (_, reference) in zip(iter_jumplora_layers(resumed.model), iter_jumplora_layers(full.model)):
        assert torch.equal(layer.olora_past_A, reference.olora_past_A), name
        assert torch.equal(layer.get_base_layer().weight, reference.get_base_layer().weight), name

"""Method osf: PEFT's OSF run across a task sequence by ContinualTrainer (one optimizer, one engine, fixed shapes).

The tiny Llama here has one square target (q_proj 32×32: PEFT projects with U_low_init / V_low_init), one with
d_out < d_in (v_proj 16×32 with one key-value head: PEFT keeps V_high) and one with d_out > d_in (up_proj 64×32:
PEFT keeps U_high), so every branch of PEFT's projection hook runs with the zero-padded tensors.
"""

import dataclasses

import pytest
import torch
from peft import OSFConfig, PeftModel, get_peft_model
from tiny import continual_args, load_script, task_stream, tiny_llama, tokenizer
from transformers import Seq2SeqTrainer, TrainerCallback

from jumplora_hf import ContinualCallback, ContinualConfig, ContinualTrainer, JumpLoraConfig
from jumplora_hf.data import ContinualDataCollator, encode_task
from jumplora_hf.ledger import TaskLedger
from jumplora_hf.osf import iter_osf_layers, preserved_rank
from jumplora_hf.steps import TaskBatchSampler, TaskSpan
from jumplora_hf.trainer_callback import JumpLoraCallback

TARGETS = ["q_proj", "v_proj", "up_proj"]
FRACTION = 0.5


def _model():
    return tiny_llama(num_key_value_heads=1)


def _args(out, **overrides) -> ContinualConfig:
    values = dict(osf_max_preserved_fraction=FRACTION, learning_rate=1e-2, optim="adamw_torch")
    return continual_args(out, "osf", **{**values, **overrides})


def _trainer(out, callbacks=None, **overrides) -> ContinualTrainer:
    return ContinualTrainer(
        _model(),
        _args(out, **overrides),
        tokenizer(),
        peft_config=JumpLoraConfig(target_modules=TARGETS),
        callbacks=callbacks,
    )


def _merged(model) -> dict[str, torch.Tensor]:
    """The adapted weights by module name (without PEFT's prefix)."""
    return {
        name.removeprefix("base_model.model."): layer.get_base_layer().weight.detach().clone()
        for name, layer in iter_osf_layers(model)
    }


class _Boundaries(ContinualCallback):
    """The adapted weights when each task begins and after its merge."""

    def __init__(self):
        self.starts, self.ends = [], []

    def on_task_begin(self, args, state, control, model=None, resumed=False, **kwargs):
        self.starts.append(_merged(model))

    def on_task_end(self, args, state, control, model=None, **kwargs):
        self.ends.append(_merged(model))


def test_preserved_rank_is_the_progressive_budget():
    assert [preserved_rank(0.5, 576, t, 4) for t in (1, 2, 3, 4)] == [72, 144, 216, 288]
    assert [preserved_rank(0.9, 192, t, 4) for t in (1, 2, 3, 4)] == [43, 86, 129, 172]
    assert preserved_rank(0.9, 10, 1, 1) == 9  # 0.9·10 is 9 exactly, not the binary 0.9's 9.000000000000002 floored


def _reference_run(args: ContinualConfig, tasks, out) -> dict[str, torch.Tensor]:
    """PEFT's documented continual loop: per task a fresh get_peft_model(OSFConfig(effective_rank=k_t)) on the model
    with the earlier tasks merged, a fresh Trainer (fresh AdamW, the task's own linear LR schedule), the same batches
    (the task's sampler, seeded as ContinualTrainer seeds it); then merge_and_unload (see the test below: PEFT's
    documented `unload()` alone would drop the task's update)."""
    model, tok, n = _model(), tokenizer(), len(tasks)
    collator = ContinualDataCollator(tok.pad_token_id, False)
    for t, task in enumerate(tasks):
        ranks = {
            name: preserved_rank(FRACTION, low, t + 1, n)
            for name, low in (("q_proj", 32), ("v_proj", 16), ("up_proj", 32))
        }
        peft_model = get_peft_model(model, OSFConfig(target_modules=TARGETS, effective_rank=1, rank_pattern=ranks))
        encoded = encode_task(task, tok, False, args.max_source_length)
        steps = -(-len(encoded.train) // args.per_device_train_batch_size)
        span = TaskSpan(t, len(encoded.train), 0, steps, task.name, steps)

        class TaskTrainer(Seq2SeqTrainer):
            def get_train_dataloader(self):
                sampler = TaskBatchSampler([span], args.per_device_train_batch_size, 1, 1, args.seed)
                return torch.utils.data.DataLoader(encoded.train, batch_sampler=sampler, collate_fn=collator)

        task_args = dataclasses.replace(args, output_dir=str(out / f"reference{t}"), save_strategy="no")
        TaskTrainer(model=peft_model, args=task_args, train_dataset=encoded.train, data_collator=collator).train()
        model = peft_model.merge_and_unload()
    return {
        name: module.weight.detach().clone() for name, module in model.named_modules() if name.endswith(tuple(TARGETS))
    }


def test_continual_trainer_equals_peft_documented_loop(tmp_path):
    tasks = task_stream(3)
    trainer = _trainer(tmp_path / "continual")
    trainer.train_continual(tasks)
    ours = _merged(trainer.model)
    reference = _reference_run(trainer.args, tasks, tmp_path)
    base = {name: m.weight.detach() for name, m in _model().named_modules() if name.endswith(tuple(TARGETS))}
    worst = max(float((ours[n] - reference[n]).abs().max()) for n in reference)
    moved = min(float((reference[n] - base[n]).abs().max()) for n in reference)
    print(f"max |ContinualTrainer − PEFT loop| = {worst:.3g}; smallest max |update| of a layer = {moved:.3g}")
    assert moved > 1e-2  # every layer learnt something
    # The two runs compute the same steps, but the padded forward sums over zero columns too (a GEMM over 2·r_1
    # instead of 2·r_t columns rounds differently), and AdamW turns those float32 rounding differences of near-zero
    # gradient entries into steps of up to lr: measured ~1e-5 with 1 thread, 2e-4 with 2 (the GEMMs' reduction order
    # follows the thread count; lr 1e-2, 12 steps); a missing projection, a wrong budget, a merge lost or doubled,
    # or a leaked optimizer state moves the weights by 1e-2 and more
    assert worst < 1e-3


def test_peft_documented_unload_alone_drops_the_update():
    # why the reference merges: PEFT 0.21.2's OSF keeps the update in its factors, and unload() returns the base
    # layers as they were
    model = get_peft_model(_model(), OSFConfig(target_modules=TARGETS, effective_rank=4))
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if "base_layer" in n}
    with torch.no_grad():
        for _, layer in iter_osf_layers(model):
            layer.osf_svd_params["default"]["S_low"].mul_(2.0)
    unloaded = model.unload()
    after = dict(unloaded.named_parameters())
    for name, weight in before.items():
        assert torch.equal(after[name.replace(".base_layer", "")], weight)


@pytest.mark.parametrize(("optim", "bound"), [("sgd", 1e-5), ("adamw_torch", None)])
def test_each_update_is_orthogonal_to_the_preserved_subspace(tmp_path, optim, bound):
    boundaries = _Boundaries()
    trainer = _trainer(tmp_path, callbacks=[boundaries], optim=optim, learning_rate=0.5 if optim == "sgd" else 1e-2)
    report = trainer.train_continual(task_stream(3))
    leaks, scaled, per_task_leaks = [], [], []
    for t, (start, end) in enumerate(zip(boundaries.starts, boundaries.ends)):
        per_task_leaks.append({})
        for name, w0 in start.items():
            delta = end[name] - w0
            u, _, vh = torch.linalg.svd(w0, full_matrices=False)
            k = preserved_rank(FRACTION, min(w0.shape), t + 1, 3)
            assert k == report["per_task"][t]["osf_preserved_rank"]["base_model.model." + name]
            norm = float(delta.norm())
            assert norm > 0
            leak = max(float((u[:, :k].T @ delta).norm()), float((delta @ vh[:k].T).norm()))
            leaks.append(leak / norm)
            per_task_leaks[-1][name] = leak / norm
            scaled.append(leak / float(w0.norm()))
    # the after-the-fact measurement of the comparison's runs, from the ledger alone, is this one
    from_ledger = load_script("benchmarks/osf_subspace.py").run_leaks(str(tmp_path), _model())
    assert [sorted(task) for task in from_ledger] == [sorted(task) for task in per_task_leaks]
    for measured, expected in zip(from_ledger, per_task_leaks):
        for name, leak in expected.items():
            assert measured[name] == pytest.approx(leak, abs=1e-4), name  # float64 SVD there, float32 here
    print(f"{optim}: max ‖U_highᵀΔW‖, ‖ΔW V_highᵀ‖ relative to ‖ΔW‖ {max(leaks):.3g}, to ‖W‖ {max(scaled):.3g}")
    if bound is not None:
        # SGD's step is the projected gradient, so ΔW = U·S·V − U0·S0·V0 is orthogonal up to the float32 rounding of
        # those two products, each of the size of W: measured ~1e-7 of ‖W‖, ~1e-4 of ‖ΔW‖ for the smallest updates
        assert max(scaled) < bound and max(leaks) < 1e-3
    # AdamW divides each entry by its own second moment, which takes the step out of the projected subspace:
    # PEFT's OSF projects gradients, not steps (reported, not asserted)
    per_task = report["per_task"]
    assert [t["sparsity"]["mean"] < 0.01 for t in per_task] == [True] * 3  # dense updates
    sizes = {"q_proj": (32, 32), "v_proj": (16, 32), "up_proj": (64, 32)}
    for t, entry in enumerate(per_task):
        expected = sum(
            4 * (d_out + d_in + 1) * (min(d_out, d_in) - preserved_rank(FRACTION, min(d_out, d_in), t + 1, 3))
            for d_out, d_in in sizes.values()
        )  # 2 layers × 2 (decoder blocks) … per target kind: tiny_llama has 2 layers
        assert entry["trainable_parameters"] == expected // 2
        assert entry["allocated_parameters"] == per_task[0]["trainable_parameters"]


class _Crash(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


class _CrashInMerge(ContinualCallback):
    def on_task_layer_merged(self, args, state, control, task=None, **kwargs):
        if task.index == 1:
            raise KeyboardInterrupt


def test_restart_from_the_checkpoint_that_ends_an_unmerged_task_is_bit_identical(tmp_path):
    # checkpoint-8 ends task 2 (steps 4-7); the job dies inside its merge: the restart merges task 2 from that
    # checkpoint, which needs the task's frozen SVD tensors back although it continues no step of the task
    settings = {"save_strategy": "steps", "save_steps": 4}
    full = _trainer(tmp_path / "full", **settings)
    full_report = full.train_continual(task_stream(3))
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "part", callbacks=[_CrashInMerge()], **settings).train_continual(task_stream(3))
    assert (tmp_path / "part" / "checkpoint-8").is_dir()
    resumed = _trainer(tmp_path / "part", **settings)
    report = resumed.train_continual(task_stream(3))
    _assert_same_run(resumed, full, report, full_report)


def _assert_same_run(resumed, full, resumed_report, full_report):
    assert resumed_report["accuracy_matrix"] == full_report["accuracy_matrix"]
    assert [t["osf_preserved_rank"] for t in resumed_report["per_task"]] == [
        t["osf_preserved_rank"] for t in full_report["per_task"]
    ]
    expected = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, expected[name]), name  # bit-identical


@pytest.mark.parametrize(("crash", "settings"), [(4, {}), (7, {"save_strategy": "steps", "save_steps": 3})])
def test_restart_is_bit_identical_to_an_uninterrupted_run(tmp_path, crash, settings):
    full = _trainer(tmp_path / "full", **settings)
    full_report = full.train_continual(task_stream(3))
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "part", callbacks=[_Crash(crash)], **settings).train_continual(task_stream(3))
    if settings:  # task 2 (steps 4-7) stopped after checkpoint-6: PEFT's checkpoint has the padded factors
        from safetensors.torch import load_file

        saved = load_file(tmp_path / "part" / "checkpoint-6" / "adapter_model.safetensors")
        shapes = {k: tuple(v.shape) for k, v in saved.items()}
        assert shapes["base_model.model.model.layers.0.self_attn.v_proj.osf_svd_params.U_low"] == (16, 16 - 2)
        assert shapes["base_model.model.model.layers.0.mlp.up_proj.osf_svd_params.V_low"] == (32 - 5, 32)
        assert not any("_osf_" in k for k in shapes)  # PEFT's buffers are not persistent: recomputed on resume
    resumed = _trainer(tmp_path / "part", **settings)
    report = resumed.train_continual(task_stream(3))
    _assert_same_run(resumed, full, report, full_report)


def test_ledger_rebuilds_and_verifies_the_merged_model(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train_continual(task_stream(3))
    ledger = TaskLedger(str(tmp_path))
    rebuilt = dict(ledger.compose(_model()).named_modules())
    for name, weight in _merged(trainer.model).items():
        assert torch.equal(rebuilt[name].weight, weight), name
    trainer.save_merged_model(str(tmp_path / "merged"))
    from jumplora_hf.ledger import load_model

    assert ledger.verify(load_model(str(tmp_path / "merged")), _model()) == 0.0
    assert [row["sparsity"] for row in ledger.summary()] == [pytest.approx(0.0, abs=1e-2)] * 3


def test_single_task_baselines_train_every_task_from_the_base_with_task_one_budget(tmp_path):
    boundaries = _Boundaries()
    report = _trainer(tmp_path, callbacks=[boundaries], single_task_baselines=True).train_continual(task_stream(3))
    base = {name: m.weight.detach() for name, m in _model().named_modules() if name.endswith(tuple(TARGETS))}
    for start in boundaries.starts:
        assert all(torch.equal(start[name], base[name]) for name in base)
    ranks = [t["osf_preserved_rank"] for t in report["per_task"]]
    assert ranks[0] == ranks[1] == ranks[2] and sorted(set(ranks[0].values())) == [2, 5]  # k_1 of 16 and 32


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_a_fraction_outside_zero_one_is_refused(tmp_path, fraction):
    with pytest.raises(ValueError, match="osf_max_preserved_fraction must be in"):
        _args(tmp_path, osf_max_preserved_fraction=fraction)


def test_senseless_combinations_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no JumpReLU gate"):
        ContinualTrainer(
            _model(),
            _args(tmp_path),
            tokenizer(),
            peft_config=JumpLoraConfig(target_modules=TARGETS, use_jumprelu=True),
        )
    from jumplora_hf.methods import get_method

    osf = get_method("osf")
    assert (osf.display_name, osf.jump_gate, osf.ella, osf.olora) == ("OSF (PEFT)", False, False, False)
    with pytest.raises(ValueError, match="pass the base model"):
        wrapped = get_peft_model(_model(), OSFConfig(target_modules=TARGETS))
        assert isinstance(wrapped, PeftModel)
        ContinualTrainer(wrapped, _args(tmp_path), tokenizer())
    with pytest.raises(NotImplementedError, match="ContinualTrainer"):
        JumpLoraCallback(method="osf")
    with pytest.raises(ValueError, match="match no module"):
        ContinualTrainer(_model(), _args(tmp_path), tokenizer(), peft_config=JumpLoraConfig(target_modules=["q"]))

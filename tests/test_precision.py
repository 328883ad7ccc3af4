"""bf16: merges that round once, thresholds that a cast cannot round, and a bf16 sequence through the Trainer's
autocast. (The 2-process DeepSpeed ZeRO-2/3 bf16 engine: test_distributed.py.)"""

import math

import pytest
import torch
from tiny import SurvivorProbe, task_stream, tiny_llama, tiny_t5, tokenizer

from jumplora_hf import ContinualConfig, ContinualTrainer, JumpLoraConfig, get_jumplora_model
from jumplora_hf.bench.precision import merge_drift, survivor_count, synthetic_updates
from jumplora_hf.layer import JumpLoraLinear, iter_jumplora_layers
from jumplora_hf.ledger import TaskLedger
from jumplora_hf.thresholds import initialize_thresholds

BF16 = torch.bfloat16


def test_fifteen_merges_round_once_instead_of_fifteen_times():
    # the demo's measured scales (weights 0.18, update entries 0.011) and a third of them (the paper's lr 1e-3)
    for median in (0.011, 0.0037):
        weight, updates = synthetic_updates((192, 576), tasks=15, update_median=median)
        drift = merge_drift(weight, updates)
        assert drift["accumulated_differs_from_round_once"] < 1e-4  # the single rounding, up to float32 ties
        assert drift["accumulated"] == pytest.approx(drift["round_once"], rel=1e-3)
        assert drift["naive"] > 1.5 * drift["accumulated"]  # README: benchmarks/merge_drift.py prints the numbers


def test_the_layer_merges_through_its_float32_copy():
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40).to(BF16)
    config = JumpLoraConfig(r=4, lora_alpha=8)
    layer = JumpLoraLinear(base, "default", config=config, r=4, lora_alpha=8, target_name="l")
    start = base.weight.detach().float().clone()
    expected = start.clone()  # the float32 merge, task after task
    naive = base.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(15):
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.randn(4, 48, generator=gen) * 0.05)
            layer.lora_B["default"].weight.copy_(torch.randn(40, 4, generator=gen) * 0.05)
        initialize_thresholds(torch.nn.ModuleList([layer]))
        update = layer.get_delta_weight("default")
        expected += update
        naive += update.to(BF16)
        layer.fold_final_delta("default", accumulate_w_past=False)
    assert torch.equal(layer.merged_weight(), expected)
    assert torch.equal(base.weight, expected.to(BF16))  # the float32 merge rounded once
    assert not torch.equal(naive, base.weight)  # what rounding at every merge would have given


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_count_at_s_start_is_exact_with_bf16_adapters(arch):
    targets = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}[arch]
    model = get_jumplora_model(
        {"t5": tiny_t5, "llama": tiny_llama}[arch](), JumpLoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    model = model.to(BF16)  # every floating parameter and buffer, as DeepSpeed's bf16 engine does
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in iter_jumplora_layers(model):
            layer.lora_B["default"].weight.copy_(
                torch.randn(layer.lora_B["default"].weight.shape, generator=gen).to(BF16) * 0.05
            )
    initialize_thresholds(model)
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    budget = sum(layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel() for layer in layers)
    assert sum(int((layer.final_delta("default") != 0).sum()) for layer in layers) == budget
    assert layers[0].lora_log_tau["default"].dtype == BF16 and layers[0].log_tau("default").dtype == torch.float32
    # before the fix: log τ itself a bf16 parameter (spacing ~0.03 at log τ ≈ -5) misses the count
    deltas = torch.cat([layer.delta_weight("default").flatten() for layer in layers])
    rounded = layers[0].log_tau("default").to(BF16)
    assert survivor_count(deltas, rounded) != budget


@pytest.mark.parametrize("model_dtype", [torch.float32, BF16], ids=["fp32-weights", "bf16-weights"])
def test_three_tasks_under_bf16_autocast(tmp_path, model_dtype):
    probe = SurvivorProbe()
    # SGD: after Adam's first step every entry of B is ±lr, and rows of ΔW = B·A with the same signs tie at the
    # threshold, where no τ can separate them; SGD's steps follow the gradients
    args = ContinualConfig(
        output_dir=str(tmp_path),
        method="jumplora_inclora",
        per_device_train_batch_size=4,
        num_train_epochs=1,
        optim="sgd",
        learning_rate=0.5,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
        bf16=True,
    )
    model = tiny_t5(tie_word_embeddings=False).to(model_dtype)
    config = JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], threshold_mode="per_block")
    trainer = ContinualTrainer(model, args, tokenizer(), peft_config=config, callbacks=[probe])
    report = trainer.train_continual(task_stream(3))
    assert len(probe.counts) == 3 * 4 and all(s == b for s, b in probe.counts)  # exact at every task's S_start
    assert all(0.2 < t["sparsity"]["mean"] < 1.0 for t in report["per_task"])
    rebuilt = dict(
        TaskLedger(str(tmp_path)).compose(tiny_t5(tie_word_embeddings=False).to(model_dtype)).named_parameters()
    )
    for name, layer in iter_jumplora_layers(trainer.model):
        weight = layer.get_base_layer().weight
        assert weight.dtype == model_dtype
        # bf16 weights: the float32 merge of the three updates rounded once; fp32 weights: the float32 merge
        assert torch.equal(weight, rebuilt[name.removeprefix("base_model.model.") + ".weight"]), name
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)

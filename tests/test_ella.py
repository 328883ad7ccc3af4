import pytest
import torch
from tiny import TINY_MODELS

from jumplora_hf import JumpLoraConfig, get_jumplora_model
from jumplora_hf.ella import ella_penalty
from jumplora_hf.layer import iter_jumplora_layers, set_interpolation_gamma
from jumplora_hf.lifecycle import begin_task, end_task
from jumplora_hf.thresholds import initialize_thresholds


def _randomise_adapters(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_jumplora_layers(model):
            layer.lora_B["default"].weight.copy_(
                torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.1
            )


def _model(use_jumprelu=True):
    return get_jumplora_model(
        TINY_MODELS["t5"](), JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_jumprelu=use_jumprelu)
    )


def test_w_past_accumulates_final_deltas_task_after_task():
    model = _model()
    assert ella_penalty(model) is None  # nothing merged yet
    expected = {}
    for task in range(3):
        begin_task(model, task, seed=0)
        _randomise_adapters(model, seed=task)
        initialize_thresholds(model)
        finals = {name: layer.final_delta("default") for name, layer in iter_jumplora_layers(model)}
        end_task(model, accumulate_w_past=True)
        for name, layer in iter_jumplora_layers(model):
            expected[name] = expected.get(name, 0) + finals[name]
            assert torch.allclose(layer.ella_w_past, expected[name])


@pytest.mark.parametrize("mode", ["sparse", "interpolated"])
def test_penalty_equals_formula(mode):
    model = _model()
    _randomise_adapters(model, seed=0)
    initialize_thresholds(model)
    end_task(model, accumulate_w_past=True)
    begin_task(model, 1, seed=0)
    _randomise_adapters(model, seed=1)
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    # before S_start both modes use the dense ΔW
    dense = sum(
        ((layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.ella_w_past).pow(2).sum()
        for layer in layers
    ) / len(layers)
    assert torch.allclose(ella_penalty(model, mode), dense)
    initialize_thresholds(model)
    set_interpolation_gamma(model, 0.5)
    terms = []
    for layer in layers:
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        jumped = delta * (delta.abs() > layer.log_tau("default").exp())
        delta_x = jumped if mode == "sparse" else 0.5 * delta + 0.5 * jumped
        terms.append((delta_x * layer.ella_w_past).pow(2).sum())
    penalty = ella_penalty(model, mode)
    assert torch.allclose(penalty, sum(terms) / len(terms))
    penalty.backward()
    assert all(layer.lora_B["default"].weight.grad is not None for layer in layers)


def test_plain_lora_penalty_uses_dense_delta():
    model = _model(use_jumprelu=False)
    _randomise_adapters(model, seed=0)
    end_task(model, accumulate_w_past=True)
    _randomise_adapters(model, seed=1)
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    expected = sum(
        ((layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.ella_w_past).pow(2).sum()
        for layer in layers
    ) / len(layers)
    assert torch.allclose(ella_penalty(model), expected)


def test_auto_lambda_is_measured_per_task_and_reported(tmp_path):
    from tiny import task_stream, tiny_t5, tokenizer

    from jumplora_hf import ContinualConfig, ContinualTrainer

    args = ContinualConfig(
        output_dir=str(tmp_path),
        method="jumplora_ella",
        ella_lambda="auto",
        ella_target_ratio=0.5,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
    )
    trainer = ContinualTrainer(
        tiny_t5(), args, tokenizer(), peft_config=JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    )
    report = trainer.train_continual(task_stream(3))
    lambdas = [task["ella_lambda"] for task in report["per_task"]]
    assert lambdas[0] == 0.0 and all(lam > 0 for lam in lambdas[1:])  # no W_past in the first task
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for index in (1, 2):
        task_logs = [h for h in logs if h["task"] == index]
        # measured over 2 steps (the steps before S_start, round(0.2 · 4) = 1, at least 2) with λ = 0, then fixed
        assert [h["ella/lambda"] for h in task_logs[:2]] == [0.0, 0.0] and task_logs[1]["loss_ella"] == 0.0
        assert {h["ella/lambda"] for h in task_logs[2:]} == {lambdas[index]}
        # the term is then of the order of target_ratio × the cross-entropy of the measured steps (it keeps growing
        # with ΔW after the window, so larger)
        ratio = task_logs[2]["loss_ella"] / task_logs[1]["loss_ce"]
        assert 0.05 < ratio < 20.0, ratio


def test_lambda_values_are_parsed_and_checked():
    from jumplora_hf import ContinualConfig

    assert ContinualConfig(output_dir="o", method="ella", ella_lambda=["0", "3e4"]).ella_lambda == [0.0, 3e4]
    assert ContinualConfig(output_dir="o", method="ella", ella_lambda=["AUTO"]).ella_lambda == "auto"
    with pytest.raises(ValueError, match="numbers or 'auto'"):
        ContinualConfig(output_dir="o", method="ella", ella_lambda=["big"])

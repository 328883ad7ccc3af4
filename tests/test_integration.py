"""JumpLoRA inside other people's Trainer scripts: transformers' `Trainer` (causal LM, tiny Llama), `Seq2SeqTrainer`
(T5, with generate-eval) and trl's `SFTTrainer`, with the README's lines. Each: γ 0→1 in `log_history`, τ set at
S_start, resume from a mid-ramp checkpoint equal to an uninterrupted run, the merged checkpoint reloads with plain
`from_pretrained` and equals the adapted model at γ = 1; and the library's guards for those scripts."""

import glob
import os

import pytest
import torch
from tiny import task_stream, tiny_llama, tiny_t5, tokenizer
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from jumplora_hf import (
    JumpLoraArguments,
    JumpLoraCallback,
    JumpLoraConfig,
    attach_jumplora,
    finish_task,
    get_jumplora_model,
)
from jumplora_hf.data import ContinualDataCollator, encode_task
from jumplora_hf.layer import iter_jumplora_layers

STEPS = 10  # S_start = step 2, S_final = step 8


def _data(encoder_decoder: bool, index: int = 0):
    encoded = encode_task(task_stream(2, n_train=40, n_eval=8)[index], tokenizer(), encoder_decoder, 128)
    return encoded, ContinualDataCollator(tokenizer().pad_token_id, encoder_decoder)


def _args(cls, out, **overrides):
    values = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=STEPS,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=11,
        disable_tqdm=True,
        save_strategy="no",
    )
    return cls(**{**values, **overrides})


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _jump_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


# ----------------------------------------------------------------------------- the three trainers
def _make(kind, out, model=None, **overrides):
    """The README's lines in each trainer: get_jumplora_model (or trl's peft_config), the trainer as usual,
    attach_jumplora; `train()` and `finish_task` are the test's."""
    if kind == "sft":
        trl = pytest.importorskip("trl")
        from datasets import Dataset

        texts = [f"{r['sentence']} -> {r['label']}" for r in task_stream(1, n_train=40)[0].train_dataset]
        # bf16=False: SFTConfig's default autocasts the forward, the merged checkpoint is then compared in float32
        args = _args(
            trl.SFTConfig, out, max_length=64, packing=False, dataset_text_field="text", bf16=False, **overrides
        )
        trainer = trl.SFTTrainer(
            model=model or tiny_llama(),
            args=args,
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=tokenizer(),
            peft_config=JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )
    else:
        t5 = kind == "seq2seq"
        targets = ["q", "v"] if t5 else ["q_proj", "v_proj"]
        base = tiny_t5(tie_word_embeddings=False) if t5 else tiny_llama()
        model = model or get_jumplora_model(base, JumpLoraConfig(r=4, lora_alpha=8, target_modules=targets))
        encoded, collator = _data(t5)
        if t5:
            args = _args(
                Seq2SeqTrainingArguments, out, predict_with_generate=True, per_device_eval_batch_size=4, **overrides
            )
            trainer = Seq2SeqTrainer(
                model=model,
                args=args,
                train_dataset=encoded.train,
                data_collator=collator,
                processing_class=tokenizer(),
            )
        else:
            trainer = Trainer(
                model=model,
                args=_args(TrainingArguments, out, **overrides),
                train_dataset=encoded.train,
                data_collator=collator,
            )
    attach_jumplora(trainer)
    return trainer


def _inputs(kind):
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, 300, (2, 9), generator=gen)}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, 300, (2, 4), generator=gen)
    return inputs


KINDS = ["trainer", "seq2seq", "sft"]


@pytest.mark.parametrize("kind", KINDS)
def test_gamma_ramp_tau_and_the_merged_checkpoint(tmp_path, kind):
    trainer = _make(kind, tmp_path / "run")
    trainer.train()
    logs = _jump_logs(trainer)
    gammas = [h["jump/gamma"] for h in logs]
    assert gammas[0] == 0.0 and gammas[-1] == 1.0 and gammas == sorted(gammas)  # in log_history, 0 → 1
    # τ is logged from S_start (step 2 of 10) on: before it the gate is open and τ a placeholder, not a value
    assert "jump/tau_min" not in logs[1] and logs[3]["jump/tau_min"] > 1e-6
    assert all("jump/sparsity" in h for h in logs[3:])
    trainer.model.eval()
    with torch.no_grad():
        adapted = trainer.model(**_inputs(kind)).logits  # the adapter at γ = 1
    finish_task(trainer, merged_dir=str(tmp_path / "merged"), adapter_dir=str(tmp_path / "adapter"))
    auto = T5ForConditionalGeneration if kind == "seq2seq" else AutoModelForCausalLM
    merged = auto.from_pretrained(tmp_path / "merged").eval()  # plain transformers, no adapter
    with torch.no_grad():
        assert torch.allclose(merged(**_inputs(kind)).logits, adapted, atol=1e-5)
    assert not any("lora" in name for name in merged.state_dict())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert trainer.optimizer is None  # the next train() builds a fresh one


def test_jump_scalars_reach_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = _make("trainer", tmp_path / "run", report_to=["tensorboard"])
    trainer.train()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/jump/gamma", "train/jump/tau_mean", "train/jump/sparsity"} <= tags  # every report_to backend


class _Interrupt(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            control.should_training_stop = True


@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_ramp_equals_an_uninterrupted_run(tmp_path, kind):
    full = _make(kind, tmp_path / "full")
    full.train()
    part = _make(kind, tmp_path / "part", save_strategy="steps", save_steps=5)
    part.add_callback(_Interrupt(at_step=5))  # as if the job died in the γ ramp (S_start 2, S_final 8), after τ is set
    part.train()
    assert os.path.isdir(tmp_path / "part" / "checkpoint-5")
    resumed = _make(kind, tmp_path / "part", save_strategy="steps", save_steps=5)  # a fresh process would start here
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-5"))
    expected = _lora_state(full.model)
    for name, value in _lora_state(resumed.model).items():
        assert torch.equal(value, expected[name]), name  # τ, γ, A, B: bit-identical
    for (_, layer), (_, reference) in zip(iter_jumplora_layers(resumed.model), iter_jumplora_layers(full.model)):
        assert layer.jump_gamma["default"] == reference.jump_gamma["default"] == 1.0
        assert torch.equal(layer.lora_gate_state["default"], reference.lora_gate_state["default"])


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd"])
def test_resume_with_weight_decay_and_every_optimizer_equals_an_uninterrupted_run(tmp_path, optim):
    # most scripts set weight_decay; attach_jumplora builds the optimizer with log τ out of decay from the start, so
    # the checkpoint's optimizer state fits the optimizer of the resumed run (before: "loaded state dict contains a
    # parameter group that doesn't match the size of optimizer's group")
    settings = dict(optim=optim, weight_decay=0.01)
    full = _make("trainer", tmp_path / "full", **settings)
    full.train()
    part = _make("trainer", tmp_path / "part", save_strategy="steps", save_steps=5, **settings)
    part.add_callback(_Interrupt(at_step=5))
    part.train()
    resumed = _make("trainer", tmp_path / "part", save_strategy="steps", save_steps=5, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-5"))
    expected = _lora_state(full.model)
    for name, value in _lora_state(resumed.model).items():
        assert torch.equal(value, expected[name]), name
    taus = {id(layer.lora_log_tau["default"]) for _, layer in iter_jumplora_layers(resumed.model)}
    assert all(g["weight_decay"] == 0 for g in resumed.optimizer.param_groups if taus & {id(p) for p in g["params"]})


def test_task_after_task_with_a_fresh_optimizer(tmp_path):
    trainer = _make("trainer", tmp_path, optim="adamw_torch", weight_decay=1.0)
    trainer.train()
    taus = {id(layer.lora_log_tau["default"]) for _, layer in iter_jumplora_layers(trainer.model)}
    decayed = [g for g in trainer.optimizer.param_groups if g["weight_decay"] > 0]
    assert decayed and not any(id(p) in taus for g in decayed for p in g["params"])  # log τ never decayed
    with pytest.raises(RuntimeError, match="finish_task"):
        trainer.train()  # a second task on the old optimizer is refused
    update = finish_task(trainer)
    assert update.supports and 0.2 < sum(update.sparsity().values()) / len(update.supports) < 1.0
    encoded, _ = _data(False, index=1)
    trainer.train_dataset = encoded.train
    trainer.train()
    steps = [int(s["step"]) for s in trainer.optimizer.state.values()]
    assert max(steps) == STEPS  # Adam counts this task's steps only: a fresh optimizer


def test_multi_process_launch_without_distribution_is_refused(monkeypatch, tmp_path):
    # the state accelerate leaves when 2 CPU processes are launched without use_cpu: WORLD_SIZE=2, no process group
    args = _args(TrainingArguments, tmp_path)
    assert args.world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = get_jumplora_model(tiny_llama(), JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(RuntimeError, match="each would train alone.*use_cpu=True"):
        JumpLoraCallback().on_init_end(args, None, None, model=model)


# ----------------------------------------------------------------------------- trl's SFTTrainer
def _sft(out, route):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = tokenizer()
    texts = [f"{r['sentence']} -> {r['label']}" for r in task_stream(1, n_train=40)[0].train_dataset]
    config = JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = _args(trl.SFTConfig, out, max_length=64, packing=False, dataset_text_field="text")
    base = tiny_llama()
    if route == "peft_config":
        trainer = trl.SFTTrainer(
            model=base,
            args=args,
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=tok,
            peft_config=config,
        )
    else:
        trainer = trl.SFTTrainer(
            model=get_jumplora_model(base, config),
            args=args,
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=tok,
        )
    attach_jumplora(trainer)
    trainer.train()
    return trainer


def test_sft_trainer_routes_give_the_same_model(tmp_path):
    via_config = _sft(tmp_path / "a", "peft_config")
    via_model = _sft(tmp_path / "b", "get_jumplora_model")
    # trl's get_peft_model gave every layer its own τ (the shared threshold untied) and A came from the global RNG:
    # attach_jumplora ties the thresholds before the optimizer exists and the task starts from A drawn from the seed
    assert len({id(layer.lora_log_tau["default"]) for _, layer in iter_jumplora_layers(via_config.model)}) == 1
    a, b = _lora_state(via_config.model), _lora_state(via_model.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gammas = [h["jump/gamma"] for h in _jump_logs(via_config)]
    assert gammas[0] == 0.0 and gammas[-1] == 1.0


def test_sft_trainer_peft_config_route_checks_the_targets(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    # PEFT injects the one name that matches and says nothing about the other
    config = JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_prj"])
    args = _args(trl.SFTConfig, tmp_path, max_length=64, dataset_text_field="text")
    trainer = trl.SFTTrainer(
        model=tiny_llama(),
        args=args,
        peft_config=config,
        train_dataset=Dataset.from_dict({"text": ["a b c"] * 8}),
        processing_class=tokenizer(),
    )
    with pytest.raises(ValueError, match=r"'v_prj' \(closest: \['v_proj'"):
        attach_jumplora(trainer)


# ----------------------------------------------------------------------------- flags
def test_jumplora_arguments_parse_beside_a_scripts_own():
    parser = HfArgumentParser((TrainingArguments, JumpLoraArguments))
    training, jumplora = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--jumplora_r",
            "4",
            "--jumplora_alpha",
            "16",
            "--jumplora_target_modules",
            "q_proj",
            "v_proj",
            "--jumplora_threshold_mode",
            "per_block",
            "--jumplora_s_start",
            "0.1",
            "--jumplora_s_final",
            "0.9",
            "--jumplora_method",
            "inclora",
        ]
    )
    config = jumplora.to_peft_config()
    assert (config.r, config.lora_alpha, config.threshold_mode, config.s_start, config.s_final) == (
        4,
        16,
        "per_block",
        0.1,
        0.9,
    )
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.use_jumprelu is False
    assert JumpLoraArguments().to_peft_config().use_jumprelu is True
    with pytest.raises(ValueError, match="s_start"):
        JumpLoraArguments(jumplora_s_start=0.9, jumplora_s_final=0.5).to_peft_config()


@pytest.mark.distributed
def test_trainer_under_two_processes(tmp_path):
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "plain_trainer_run.py")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        script,
        str(tmp_path),
    ]
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["ranks_equal"] and 0.2 < result["sparsity"] < 1.0
    gammas = [h["jump/gamma"] for h in result["log_history"] if "loss" in h]
    assert gammas[0] == 0.0 and gammas[-1] == 1.0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())

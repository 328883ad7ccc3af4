"""JumpLoRA in other people's scripts, one task per run: ELLA across runs equal to ContinualTrainer, the scripts' own
`save_model` after `finish_task`, PEFT's own loaders, and trl's real `trl/scripts/sft.py` with the README's diff."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import task_stream, tiny_llama, tiny_t5, tokenizer
from transformers import (
    AutoModelForCausalLM,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

from jumplora_hf import (
    ContinualConfig,
    ContinualTrainer,
    JumpLoraArguments,
    JumpLoraConfig,
    attach_jumplora,
    finish_task,
    get_jumplora_model,
)
from jumplora_hf.data import ContinualDataCollator, encode_task
from jumplora_hf.layer import iter_jumplora_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, STEPS = 16, 6  # one batch of the whole task per step: the sampler's order changes only the order of float sums
COMMON = dict(
    learning_rate=1e-2,
    lr_scheduler_type="constant",
    max_steps=STEPS,
    per_device_train_batch_size=N,
    seed=5,
    use_cpu=True,
    report_to="none",
    disable_tqdm=True,
    logging_steps=1,
    save_strategy="no",
)


def _arguments(method):
    lam = ["0", "100"] if "ella" in method else None
    return JumpLoraArguments(
        jumplora_method=method,
        jumplora_ella_lambda=lam,
        jumplora_r=4,
        jumplora_alpha=8,
        jumplora_target_modules=["q", "v"],
    )


def _seq2seq_run(tasks, index, model_path, out, method):
    """One script run: one task, from the base model or the previous run's merged model."""
    base = T5ForConditionalGeneration.from_pretrained(model_path) if model_path else tiny_t5(tie_word_embeddings=False)
    arguments = _arguments(method)
    model = get_jumplora_model(base, arguments.to_peft_config())
    encoded = encode_task(tasks[index], tokenizer(), True, 128)
    trainer = Seq2SeqTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(output_dir=str(out), **COMMON),
        train_dataset=encoded.train,
        data_collator=ContinualDataCollator(tokenizer().pad_token_id, True),
        processing_class=tokenizer(),
    )
    attach_jumplora(trainer, arguments)
    trainer.train()
    finish_task(trainer)
    trainer.save_model()  # the script's own save: the merged model, with what the next run needs
    return trainer


def test_ella_across_two_script_runs_equals_the_continual_trainer(tmp_path):
    tasks = task_stream(2, n_train=N, n_eval=4)
    _seq2seq_run(tasks, 0, None, tmp_path / "t1", "jumplora_ella")
    saved = tmp_path / "t1"
    assert (saved / "model.safetensors").exists() and not (saved / "adapter_model.safetensors").exists()
    second = _seq2seq_run(tasks, 1, str(saved), tmp_path / "t2", "jumplora_ella")
    ella_logs = [h["loss_ella"] for h in second.state.log_history if "loss_ella" in h]
    assert ella_logs and max(ella_logs) > 0  # W_past of task 1 came with the merged model: the term is on

    continual = ContinualTrainer(
        tiny_t5(tie_word_embeddings=False),
        ContinualConfig(output_dir=str(tmp_path / "c"), method="jumplora_ella", ella_lambda=["0", "100"], **COMMON),
        tokenizer(),
        peft_config=JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]),
    )
    continual.train_continual(tasks)
    ours = dict(iter_jumplora_layers(second.model))
    for name, layer in iter_jumplora_layers(continual.model):
        weight = ours[name].get_base_layer().weight
        assert torch.allclose(weight, layer.get_base_layer().weight, atol=1e-5), name
        assert torch.allclose(ours[name].ella_w_past, layer.ella_w_past, atol=1e-5), name
    # and ELLA is not inert: the same runs without it end elsewhere
    plain = _seq2seq_run(tasks, 1, str(saved), tmp_path / "t2_inclora", "jumplora_inclora")
    weights = {n: layer.get_base_layer().weight for n, layer in iter_jumplora_layers(plain.model)}
    assert any(not torch.allclose(weights[n], layer.get_base_layer().weight, atol=1e-6) for n, layer in ours.items())


def test_save_model_after_finish_task_saves_the_merged_model(tmp_path):
    encoded = encode_task(task_stream(1, n_train=N)[0], tokenizer(), False, 128)
    model = get_jumplora_model(tiny_llama(), JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), **COMMON),
        train_dataset=encoded.train,
        data_collator=ContinualDataCollator(tokenizer().pad_token_id, False),
    )
    attach_jumplora(trainer)
    trainer.train()
    trainer.save_model(str(tmp_path / "during"))  # before finish_task: the adapter, as the Trainer saves it
    assert (tmp_path / "during" / "adapter_model.safetensors").exists()
    finish_task(trainer)
    trainer.save_model(str(tmp_path / "after"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "after")
    params = dict(merged.named_parameters())
    base = dict(tiny_llama().named_parameters())
    for name, layer in iter_jumplora_layers(trainer.model):
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.equal(params[key], layer.get_base_layer().weight) and not torch.equal(params[key], base[key])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "after" / "jumplora_continual.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["jumplora"])["tasks_done"] == 1


def test_methods_a_script_cannot_run_are_refused_with_what_to_do():
    with pytest.raises(NotImplementedError, match="ContinualTrainer"):
        from jumplora_hf import JumpLoraCallback

        JumpLoraCallback(method="olora")
    with pytest.raises(ValueError, match="needs --jumplora_ella_lambda"):
        JumpLoraArguments(jumplora_method="jumplora_ella")
    with pytest.raises(ValueError, match="for the ella methods"):
        JumpLoraArguments(jumplora_method="jumplora_inclora", jumplora_ella_lambda=["3e4"])


# ----------------------------------------------------------------------------- trl's own sft.py
def _readme_diff() -> list[tuple[str, str]]:
    """The (old, new) text of every hunk of the README's sft.py diff."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("<!-- sft.py diff: applied by tests/test_script_path.py -->", 1)[1]
    block = block.split("```diff\n", 1)[1].split("```", 1)[0]
    hunks = []
    for hunk in block.split("@@\n"):
        lines = [line for line in hunk.splitlines() if line]
        old = [line[1:] for line in lines if line[0] in " -"]
        new = [line[1:] for line in lines if line[0] in " +"]
        hunks.append(("\n".join(old) + "\n", "\n".join(new) + "\n"))
    return hunks


@pytest.fixture(scope="module")
def sft_script(tmp_path_factory):
    trl = pytest.importorskip("trl")
    folder = tmp_path_factory.mktemp("sft")
    text = open(os.path.join(os.path.dirname(trl.__file__), "scripts", "sft.py"), encoding="utf-8").read()
    for old, new in _readme_diff():
        assert text.count(old) == 1, f"the README's diff does not apply to trl {trl.__version__}: {old!r}"
        text = text.replace(old, new)
    script = folder / "sft.py"
    script.write_text(text)
    base = folder / "base"
    tiny_llama().save_pretrained(base)
    tokenizer().save_pretrained(base)
    for index, task in enumerate(task_stream(2, n_train=24)):
        data = folder / f"task{index}"
        data.mkdir()
        with open(data / "train.jsonl", "w") as f:
            for row in task.train_dataset:
                f.write(json.dumps({"text": f"{row['sentence']} -> {row['label']}"}) + "\n")
    return folder


def _sft(folder, model, task, out, *extra):
    command = [
        sys.executable,
        str(folder / "sft.py"),
        "--model_name_or_path", str(model),
        "--dataset_name", str(folder / f"task{task}"),
        "--output_dir", str(out),
        "--max_steps", "10",
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant",
        "--weight_decay", "0.01",
        "--save_steps", "5",
        "--max_length", "64",
        "--bf16", "false",
        "--use_cpu", "true",
        "--report_to", "none",
        "--seed", "3",
        "--jumplora_method", "jumplora_ella",
        "--jumplora_ella_lambda", "0", "100",
        "--jumplora_r", "4",
        "--jumplora_alpha", "8",
        "--jumplora_target_modules", "q_proj", "v_proj",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_trl_sft_script_with_the_readme_diff_runs_two_tasks(sft_script, tmp_path):
    first, second = tmp_path / "task1", tmp_path / "task2"
    _sft(sft_script, sft_script / "base", 0, first)
    # the script's own save_model: the merged model (it was an adapter with B = 0 before), and the next task's state
    assert (first / "model.safetensors").exists() and not (first / "adapter_model.safetensors").exists()
    base = load_file(sft_script / "base" / "model.safetensors")
    merged = load_file(first / "model.safetensors")
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    _sft(sft_script, first, 1, second)
    state = load_file(second / "jumplora_continual.safetensors")
    assert state and all(t.abs().sum() > 0 for t in state.values())  # W_past of both tasks
    log = json.loads((second / "checkpoint-10" / "trainer_state.json").read_text())["log_history"]
    assert max(h.get("loss_ella", 0.0) for h in log) > 0  # ELLA active in the second run

    # resume the first task from its checkpoint of step 5 with weight decay: the same merged model
    resumed = tmp_path / "task1_resumed"
    shutil.copytree(first / "checkpoint-5", resumed / "checkpoint-5")
    _sft(sft_script, sft_script / "base", 0, resumed, "--resume_from_checkpoint", str(resumed / "checkpoint-5"))
    again = load_file(resumed / "model.safetensors")
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_auto_peft_model_loads_a_saved_jumplora_adapter(tmp_path):
    from peft import AutoPeftModelForSeq2SeqLM

    base = tmp_path / "base"
    tiny_t5(tie_word_embeddings=False).save_pretrained(base)
    model = get_jumplora_model(
        T5ForConditionalGeneration.from_pretrained(base), JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    )
    gen = torch.Generator().manual_seed(0)
    for _, layer in iter_jumplora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen))
        layer.set_log_tau("default", -1.5)
        layer.set_gamma("default", 1.0)
    model.save_pretrained(tmp_path / "adapter")
    ids = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "decoder_input_ids": torch.tensor([[0, 5]])}
    expected = model.eval()(**ids).logits
    loaded = AutoPeftModelForSeq2SeqLM.from_pretrained(tmp_path / "adapter").eval()
    assert type(loaded.base_model).__name__ == "JumpLoraModel"
    assert torch.allclose(loaded(**ids).logits, expected, atol=1e-6)
    assert re.match(r"JUMPLORA", json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"])

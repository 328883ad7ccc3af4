"""One test per contract of `jumplora_hf._compat` with another package's private or undocumented names. The
DeepSpeed parameter attributes (`ds_id`, `ds_tensor`, `ds_status`, `ds_process_group`, `_hp_mapping`) are exercised
for real by the 2-process ZeRO-2/3 runs of test_distributed.py; here their absence on plain tensors, and the ZeRO-3
ones on one partitioned weight (tests/zero3_contract_run.py)."""

import os
import warnings

import torch
from peft import get_peft_model
from tiny import task_stream, tiny_t5, tokenizer
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from jumplora_hf import JumpLoraConfig, _compat
from jumplora_hf.data import ContinualDataCollator, encode_task
from jumplora_hf.layer import JumpLoraLinear


def test_versions_outside_the_tested_ranges_warn(monkeypatch):
    assert _compat.check_versions() == []  # the installed stack is the tested one
    monkeypatch.setitem(_compat.TESTED_RANGES, "peft", ("0.1", "0.2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outside = _compat.check_versions()
    assert outside and outside[0].startswith("peft ") and "untested" in str(caught[0].message)


def test_custom_lora_layer_registration_is_used_by_peft_injection():
    config = JumpLoraConfig(target_modules=["q"])
    assert config._custom_modules == {torch.nn.Linear: JumpLoraLinear}
    model = get_peft_model(tiny_t5(), config)
    assert any(isinstance(m, JumpLoraLinear) for m in model.modules())
    assert issubclass(JumpLoraLinear, _compat.LoraLinear)


def test_lora_variant_interface():
    for name in ("init", "merge_safe", "merge_unsafe", "unmerge", "forward"):
        assert hasattr(_compat.LoraVariant, name)


def test_check_target_module_exists():
    config = JumpLoraConfig(target_modules=["q", "v"])
    assert _compat.check_target_module_exists(config, "encoder.block.0.layer.0.SelfAttention.q")
    assert not _compat.check_target_module_exists(config, "encoder.block.0.layer.0.SelfAttention.k")


def test_buffer_dict_keys_follow_peft_adapter_naming():
    buffers = _compat.BufferDict(persistent=True)
    buffers["default"] = torch.zeros(2, dtype=torch.int32)
    holder = torch.nn.Module()
    holder.lora_gate_state = buffers
    assert list(holder.state_dict()) == ["lora_gate_state.default"]


def test_osf_layer_keeps_its_frozen_tensors_in_these_buffer_dicts():
    from peft import OSFConfig

    model = get_peft_model(tiny_t5(), OSFConfig(target_modules=["q"], effective_rank=4))
    layer = model.base_model.model.encoder.block[0].layer[0].SelfAttention.q
    buffers = _compat.osf_frozen_tensors(layer)
    assert set(buffers) == set(layer.other_param_names) - {"effective_rank"}
    assert all(isinstance(b, _compat.BufferDict) and not b.persistent for b in buffers.values())
    assert tuple(buffers["_osf_U_low_init"]["default"].shape) == (32, 32 - 4)
    assert "default" not in buffers["_osf_U_high"] and "default" not in buffers["_osf_V_high"]  # 32×32: both square


def test_add_weighted_adapter_detection_is_false_elsewhere():
    assert not _compat.called_from_add_weighted_adapter()


def _trainer(tmp_path, **overrides):
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_eval_batch_size=4,
        predict_with_generate=True,
        **overrides,
    )
    tok = tokenizer()
    return Seq2SeqTrainer(
        model=tiny_t5(), args=args, processing_class=tok, data_collator=ContinualDataCollator(tok.pad_token_id, True)
    )


def test_trainer_loss_scaling_rule_and_accumulation_attribute(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.loss_is_scaled_for_ga is None
    assert _compat.loss_is_scaled_for_ga(trainer, 10) == (
        trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None
    )
    assert _compat.loss_is_scaled_for_ga(trainer, None) == (trainer.compute_loss_func is not None)
    trainer.loss_is_scaled_for_ga = True
    assert _compat.loss_is_scaled_for_ga(trainer, None) is True
    assert isinstance(_compat.gradient_accumulation_steps(trainer), int)


def test_generation_kwargs_stored_by_predict_and_prepare_inputs(tmp_path):
    trainer = _trainer(tmp_path)
    encoded = encode_task(task_stream(1)[0], trainer.processing_class, True, 128)
    trainer.predict(encoded.prompts, max_new_tokens=3)
    assert _compat.generation_kwargs(trainer)["max_new_tokens"] == 3
    batch = _compat.prepare_inputs(trainer, {"input_ids": torch.ones(1, 2, dtype=torch.long)})
    assert batch["input_ids"].device == trainer.args.device


def test_deepspeed_attributes_are_absent_on_plain_parameters():
    param = torch.nn.Parameter(torch.zeros(2))
    assert not _compat.is_zero3_param(param) and not _compat.has_zero_fp32_fragment(param)


def test_zero3_parameter_attributes_on_a_partitioned_weight():
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = os.path.join(os.path.dirname(__file__), "zero3_contract_run.py")
    env = {**os.environ, "PORT": str(port), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-2000:]

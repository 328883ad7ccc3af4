"""Tiny models built from configs and generated tasks: everything the tests need, offline."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from jumplora_hf import ContinualCallback, ContinualConfig, ContinualTask
from jumplora_hf.bench.synthetic import keyword_task, keyword_task_stream
from jumplora_hf.thresholds import threshold_groups
from jumplora_hf.zero import gathered_adapters

__all__ = [
    "SurvivorProbe",
    "TINY_MODELS",
    "keyword_task",
    "load_script",
    "task_stream",
    "tiny_llama",
    "tiny_t5",
    "tokenizer",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(path: str) -> ModuleType:
    """A script of the repo (`benchmarks/x.py`, `recipes/y.py`) imported as a module named after its file."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses of the script resolve their module
    spec.loader.exec_module(module)
    return module


def tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()


def tiny_t5(seed: int = 0, d_model: int = 32, layers: int = 2, **overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    defaults = dict(
        vocab_size=384,
        d_model=d_model,
        d_ff=2 * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=2,
        d_kv=d_model // 2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(T5Config(**{**defaults, **overrides}))


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    defaults = dict(
        vocab_size=384,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(LlamaConfig(**{**defaults, **overrides}))


TINY_MODELS = {"t5": tiny_t5, "llama": tiny_llama}


def task_stream(n_tasks: int, n_train: int = 16, n_eval: int = 8) -> list[ContinualTask]:
    return keyword_task_stream(n_tasks, n_train, n_eval)


class SurvivorProbe(ContinualCallback):
    """At S_start (right after τ is set): per threshold group, #{|ΔW| > τ} against #A + #B (the paper's invariant)."""

    def __init__(self):
        self.counts = []

    def on_task_step(self, args, state, control, task=None, step=0, model=None, **kwargs):
        config = model.peft_config["default"]
        if not getattr(config, "use_jumprelu", False) or step != round(config.s_start * task.num_steps):
            return
        with gathered_adapters(model):
            for layers in threshold_groups(model).values():
                budget = sum(
                    layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel() for layer in layers
                )
                survivors = sum(int((layer.final_delta("default") != 0).sum()) for layer in layers)
                self.counts.append([survivors, budget])


def continual_args(output_dir, method: str = "jumplora_inclora", **overrides) -> ContinualConfig:
    """The tests' ContinualConfig: batch 4, one epoch per task, lr 1e-2, CPU, a log every step, λ 100 for ELLA."""
    values = dict(
        output_dir=str(output_dir),
        method=method,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        num_train_epochs=1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
        ella_lambda=[0.0, 100.0, 100.0] if "ella" in method else None,
    )
    return ContinualConfig(**{**values, **overrides})

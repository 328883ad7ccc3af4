"""JumpLoRA continual learning (arXiv 2604.16171) for the Hugging Face stack.

The public names below are loaded on first use (PEP 562), so `import jumplora_hf` and the recipes' `--help` do
not import torch; any of them loads `jumplora_hf.layer` first, which registers the JumpLoRA layer that
`JumpLoraConfig` injects.
"""

import importlib
import os

# Before torch is imported: idle OpenMP threads sleep instead of spinning, which on a shared machine made a
# training step 10-14x slower. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"
_EXPORTS = {
    "ContinualCallback": "lifecycle",
    "ContinualDataCollator": "data",
    "ContinualRecord": "state",
    "ContinualSeq2SeqConfig": "continual_config",
    "ContinualSeq2SeqTrainer": "continual_trainer",
    "ContinualTask": "data",
    "JumpLoRATrainerCallback": "callback",
    "JumpLoraArguments": "arguments",
    "JumpLoraConfig": "config",
    "JumpLoraLinear": "layer",
    "METHODS": "methods",
    "MergedTaskUpdate": "lifecycle",
    "Method": "methods",
    "THRESHOLD_MODES": "groups",
    "TaskLedger": "ledger",
    "TaskSpan": "sequence",
    "attach_jumplora": "callback",
    "begin_task": "lifecycle",
    "check_target_modules": "model",
    "ella_penalty": "ella",
    "encode_task": "data",
    "end_task": "lifecycle",
    "exact_match_accuracy": "data",
    "finish_task": "callback",
    "get_jumplora_model": "model",
    "hard_threshold": "gate",
    "initialize_thresholds": "thresholds",
    "interpolation_gamma": "gate",
    "iter_jumplora_layers": "layer",
    "jump_interpolated_delta": "gate",
    "load_jumplora_adapter": "model",
    "normalize_answer": "data",
    "save_merged_model": "model",
    "set_interpolation_gamma": "layer",
    "symmetric_jump_relu": "gate",
    "threshold_statistics": "thresholds",
    "tie_thresholds": "thresholds",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jumplora_hf' has no attribute {name!r}")
    importlib.import_module(".layer", __name__)
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

"""JumpLoRA continual learning (arXiv 2604.16171) for the Hugging Face stack.

The top level holds what a script uses: the configs, the trainer, the callbacks and the few functions a script
calls. Everything else is importable from the module that holds it (the README's "Layout" table). The names are
loaded on first use (PEP 562): `import jumplora_hf` imports neither torch nor PEFT, and changes no environment
variable. It does register JumpLoRA with PEFT, when PEFT is imported (now, if it already is): from then on PEFT's own
`get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModel*` take JumpLoRA adapters (model.py).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.3.0"
_EXPORTS = {
    "JumpLoraConfig": "config",
    "JumpLoraModel": "model",
    "JumpLoraArguments": "arguments",
    "ContinualConfig": "continual_config",
    "ContinualTrainer": "continual_trainer",
    "ContinualTask": "data",
    "ContinualCallback": "callback",
    "JumpLoraCallback": "trainer_callback",
    "attach_jumplora": "trainer_callback",
    "finish_task": "trainer_callback",
    "get_jumplora_model": "adapters",
    "load_jumplora_adapter": "adapters",
    "save_merged_model": "adapters",
}
# The public names of 0.2, kept for one minor version: old name → (module, name now)
_DEPRECATED = {
    "ContinualSeq2SeqConfig": ("continual_config", "ContinualConfig"),
    "ContinualSeq2SeqTrainer": ("continual_trainer", "ContinualTrainer"),
    "JumpLoRATrainerCallback": ("trainer_callback", "JumpLoraCallback"),
    "ContinualDataCollator": ("data", "ContinualDataCollator"),
    "ContinualRecord": ("record", "ContinualRecord"),
    "JumpLoraLinear": ("layer", "JumpLoraLinear"),
    "METHODS": ("methods", "METHODS"),
    "Method": ("methods", "Method"),
    "MergedTaskUpdate": ("updates", "MergedTaskUpdate"),
    "THRESHOLD_MODES": ("groups", "THRESHOLD_MODES"),
    "TaskLedger": ("ledger", "TaskLedger"),
    "TaskSpan": ("steps", "TaskSpan"),
    "begin_task": ("lifecycle", "begin_task"),
    "end_task": ("lifecycle", "end_task"),
    "check_target_modules": ("adapters", "check_target_modules"),
    "ella_penalty": ("ella", "ella_penalty"),
    "encode_task": ("data", "encode_task"),
    "exact_match_accuracy": ("data", "exact_match_accuracy"),
    "normalize_answer": ("data", "normalize_answer"),
    "hard_threshold": ("gate", "hard_threshold"),
    "interpolation_gamma": ("gate", "interpolation_gamma"),
    "jump_interpolated_delta": ("gate", "jump_interpolated_delta"),
    "symmetric_jump_relu": ("gate", "symmetric_jump_relu"),
    "initialize_thresholds": ("thresholds", "initialize_thresholds"),
    "threshold_statistics": ("thresholds", "threshold_statistics"),
    "tie_thresholds": ("thresholds", "tie_thresholds"),
    "iter_jumplora_layers": ("layer", "iter_jumplora_layers"),
    "set_interpolation_gamma": ("layer", "set_interpolation_gamma"),
}
__all__ = sorted(_EXPORTS)


def _load(module: str, name: str):
    importlib.import_module(".layer", __name__)  # registers the layer JumpLoraConfig injects
    importlib.import_module(".model", __name__)  # registers the PEFT method
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = _load(_EXPORTS[name], name)
        globals()[name] = value
        return value
    if name in _DEPRECATED:
        module, new = _DEPRECATED[name]
        where = f"jumplora_hf.{new}" if new in _EXPORTS else f"jumplora_hf.{module}.{new}"
        warnings.warn(
            f"jumplora_hf.{name} is deprecated and will be removed in 0.4; use {where}", FutureWarning, stacklevel=2
        )
        return _load(module, new)
    raise AttributeError(f"module 'jumplora_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


class _RegisterWhenPeftLoads(importlib.abc.MetaPathFinder):
    """Registers JumpLoRA with PEFT right after PEFT's own import (a no-op finder otherwise)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("peft")
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            if f"{__name__}._compat" not in sys.modules:  # else jumplora_hf itself imports PEFT, and registers
                importlib.import_module(".layer", __name__)
                importlib.import_module(".model", __name__)

        loader.exec_module = exec_module
        return spec


if "peft" in sys.modules:
    importlib.import_module(".layer", __name__)
    importlib.import_module(".model", __name__)
elif not any(isinstance(f, _RegisterWhenPeftLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenPeftLoads())

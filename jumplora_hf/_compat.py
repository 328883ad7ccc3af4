"""Every private or undocumented name of torch / transformers / peft / accelerate / DeepSpeed used by jumplora_hf.

Nothing else in the package touches another package's internals: when one of them changes, this file (and
`tests/test_compat.py`, one test per contract) is where it shows. The versions each contract was checked
against are the ranges of pyproject.toml; outside them `check_versions` warns at import.
"""

from __future__ import annotations

import importlib.metadata
import sys
import warnings

import torch
from packaging.version import Version
from peft.tuners._buffer_dict import BufferDict  # a dict of buffers with PEFT's `<name>.<adapter>` state-dict keys
from peft.tuners.lora.layer import Linear as LoraLinear  # PEFT's LoRA Linear, subclassed by JumpLoraLinear
from peft.tuners.lora.layer import LoraVariant  # the LoRA variant interface (marked experimental by PEFT)
from peft.tuners.tuners_utils import check_target_module_exists

# The ranges the contracts below were verified with (tests/test_compat.py), as in pyproject.toml.
TESTED_RANGES = {
    "peft": ("0.21.2", "0.22"),
    "transformers": ("5.23", "5.24"),
    "accelerate": ("1.15", "1.16"),
    "torch": ("2.13", "2.14"),
    "deepspeed": ("0.19.8", "0.20"),
}

__all__ = [
    "BufferDict",
    "add_peft_type",
    "LoraLinear",
    "LoraVariant",
    "TESTED_RANGES",
    "called_from_add_weighted_adapter",
    "check_target_module_exists",
    "check_versions",
    "generation_kwargs",
    "gradient_accumulation_steps",
    "has_zero_fp32_fragment",
    "is_zero3_param",
    "loss_is_scaled_for_ga",
    "osf_frozen_tensors",
    "prepare_inputs",
    "register_custom_lora_layer",
    "start_training_at_step",
    "zero3_clear_secondary_partition",
    "zero3_data_is_resident",
    "zero3_is_quantized",
    "zero3_local_shard",
    "zero3_partition_group",
]


def _installed(distribution: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions() -> list[str]:
    """Warn for every installed package outside the range its private contracts were tested with."""
    outside = []
    for name, (low, high) in TESTED_RANGES.items():
        version = _installed(name)
        if version is not None and not (Version(low) <= Version(version.base_version) < Version(high)):
            outside.append(f"{name} {version} (tested: >={low},<{high})")
    if outside:
        warnings.warn(
            "jumplora_hf relies on internals of these packages, and their installed versions are untested: "
            + "; ".join(outside)
            + ". Install the ranges of pyproject.toml if anything fails.",
            stacklevel=2,
        )
    return outside


# ----------------------------------------------------------------------------- peft
def register_custom_lora_layer(config, mapping: dict[type, type]) -> None:
    """LoraConfig._register_custom_module: PEFT then injects `mapping[type(target)]` for matching targets."""
    config._register_custom_module(mapping)


def add_peft_type(name: str):
    """The member `name` of PEFT's `PeftType` enum, added if missing: `register_peft_method` only takes names the enum
    has, and an Enum's members are fixed at its creation (so this writes Enum's own tables, as its metaclass does)."""
    from peft.utils.peft_types import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def called_from_add_weighted_adapter() -> bool:
    """Whether the current call comes from `LoraModel.add_weighted_adapter` (which injects, then fills A and B)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "add_weighted_adapter" and "peft" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


# PEFT's OSFLayer keeps its frozen per-adapter tensors in private BufferDicts (its `other_param_names`): the SVD's
# initial low-rank factors (the reference of `get_delta_weight`, and the projector of a square factor) and U_high /
# V_high of a non-square factor (only when that factor is not square).
OSF_BUFFER_NAMES = ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high")


def osf_frozen_tensors(layer) -> dict[str, BufferDict]:
    """The BufferDicts of a PEFT OSF layer, by attribute name. PEFT registers their entries non-persistent: neither
    the state dict nor a Trainer checkpoint holds them."""
    return {name: getattr(layer, name) for name in OSF_BUFFER_NAMES}


# ----------------------------------------------------------------------------- transformers Trainer attributes
def loss_is_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Whether `compute_loss` already normalises over the whole accumulated batch (then `training_step` does not
    divide by the accumulation steps); the rule of `Trainer.training_step`."""
    if trainer.loss_is_scaled_for_ga is not None:
        return trainer.loss_is_scaled_for_ga
    return (
        trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
    ) or trainer.compute_loss_func is not None


def gradient_accumulation_steps(trainer) -> int:
    """The accumulation steps of the current optimizer step (the last one of an epoch can be shorter); set by the
    Trainer during training, the configured value outside it."""
    return getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)


def generation_kwargs(trainer) -> dict:
    """The generation kwargs Seq2SeqTrainer.evaluate/predict stored for `prediction_step`."""
    return dict(getattr(trainer, "_gen_kwargs", {}) or {})


def start_training_at_step(trainer, step: int) -> None:
    """Make a `train()` that has just begun (its `on_train_begin`) count from optimizer step `step`, as a run resumed
    from a checkpoint at that step would: the state's step and the Trainer's counters for the logged loss average
    (`_globalstep_last_logged`) and the throughput (`_initial_global_step`), set in `_inner_training_loop`."""
    trainer.state.global_step = step
    trainer._globalstep_last_logged = step
    trainer._initial_global_step = step


def prepare_inputs(trainer, inputs: dict) -> dict:
    """Trainer._prepare_inputs: tensors onto the device the model runs on."""
    return trainer._prepare_inputs(inputs)


# ----------------------------------------------------------------------------- DeepSpeed parameter attributes
def is_zero3_param(param: torch.Tensor) -> bool:
    """A ZeRO-3 partitioned parameter (DeepSpeed gives it a `ds_id`)."""
    return hasattr(param, "ds_id")


def zero3_local_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter."""
    return param.ds_tensor


def zero3_partition_group(param: torch.Tensor):
    """The process group a ZeRO-3 parameter is partitioned over (the data-parallel group, unless MiCS / hpZ)."""
    return param.ds_process_group


def zero3_data_is_resident(param: torch.Tensor) -> bool:
    """Whether the whole ZeRO-3 parameter is in `param.data` now (persistent small parameters, or gathered)."""
    return param.ds_status.name == "AVAILABLE"


def zero3_clear_secondary_partition(param: torch.Tensor) -> None:
    """Drop the ZeRO++ hpZ secondary copy of a shard written in place; DeepSpeed rebuilds it from the primary
    shards at the next gather (it gathers from the primary partition while the secondary one is None)."""
    if getattr(param, "ds_secondary_tensor", None) is not None:
        param.ds_secondary_tensor = None


def zero3_is_quantized(param: torch.Tensor) -> bool:
    """A shard DeepSpeed stores quantised (`zero_quantized_nontrainable_weights`)."""
    return hasattr(param.ds_tensor, "ds_quant_scale")


def has_zero_fp32_fragment(param: torch.Tensor) -> bool:
    """A ZeRO-1/2 parameter with an fp32 master fragment on this rank (`_hp_mapping`)."""
    return getattr(param, "_hp_mapping", None) is not None


check_versions()

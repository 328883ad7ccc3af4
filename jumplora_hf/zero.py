"""JumpLoRA's writes of the adapters outside the optimizer, made correct under DeepSpeed ZeRO.

JumpLoRA changes the adapters outside the optimizer step: re-initialised at each task start, τ set at S_start and B
zeroed by the merge. Under ZeRO-3 a parameter is a shard on each rank: the adapters (small) are gathered whole first,
written once, by rank 0, then re-sharded. Under ZeRO 1-3 the optimizer also keeps fp32 master copies of the trainable
parameters and copies them back over the model's after every step, so a write must reach the master copy too. The
frozen base weights are merged into shard by shard instead, with no gather (entries.py). Without DeepSpeed every
function here is a no-op wrapper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from peft.tuners.osf import OSFLayer
from peft.utils.integrations import gather_params_ctx

from ._compat import has_zero_fp32_fragment, is_zero3_param, zero3_local_shard
from .layer import iter_jumplora_layers


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Whole ZeRO-3 parameters inside the block; with `modifier_rank`, that rank's writes are kept everywhere."""
    params = list({id(p): p for p in params if is_zero3_param(p)}.values())
    if not params:
        yield
        return
    with gather_params_ctx(params, modifier_rank=modifier_rank):
        yield


def adapter_parameters(model: torch.nn.Module, include_base: bool = False) -> list[torch.nn.Parameter]:
    """A, B and log τ of every adapted layer, and PEFT's U_low, S_low, V_low of every OSF layer (and the frozen base
    weight it merges into)."""
    params = []
    for _, layer in iter_jumplora_layers(model):
        for name, param in layer.named_parameters():
            if "lora_" in name or (include_base and name == "base_layer.weight"):
                params.append(param)
    for layer in model.modules():
        if isinstance(layer, OSFLayer):
            for name, param in layer.named_parameters():
                if name.startswith("osf_svd_params.") or (include_base and name == "base_layer.weight"):
                    params.append(param)
    return list({id(p): p for p in params}.values())  # τ is shared between the layers of a threshold group


def gathered_adapters(model: torch.nn.Module, include_base: bool = False, modifier_rank: int | None = None):
    return gathered(adapter_parameters(model, include_base), modifier_rank)


@contextlib.contextmanager
def writing_adapters(model: torch.nn.Module) -> Iterator[None]:
    """Write A, B and τ in place inside the block; ZeRO shards and master copies follow.

    Every rank computes the same values (they are seeded, or derived from gathered weights); rank 0's are the ones
    kept, so float non-determinism between ranks cannot make them diverge. The base weights are not gathered: the
    merge writes each process's own entries of them (entries.py).
    """
    with gathered_adapters(model, modifier_rank=0):
        yield
    sync_master_weights(adapter_parameters(model))


def sync_master_weights(params: Iterable[torch.nn.Parameter]) -> None:
    """Copy the current values of trainable parameters into DeepSpeed's fp32 master copies.

    ZeRO-3: each rank copies its own shard (already re-sharded from rank 0's write), which
    needs no gather and also works for parameters smaller than the number of ranks, such as τ.
    ZeRO 1-2: the parameter is whole on every rank and is copied into the fragment this rank owns.
    """
    params = [p for p in params if p.requires_grad]
    if not any(is_zero3_param(p) or has_zero_fp32_fragment(p) for p in params):
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for param in params:
        if is_zero3_param(param):
            safe_set_local_fp32_param(param, zero3_local_shard(param).data.float())
        elif has_zero_fp32_fragment(param):
            safe_set_full_fp32_param(param, param.data.float())


def register_adapted_weights_as_external(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters when its forward starts. The fused JumpLoRA forward reads
    the base weight and A, B, τ directly (one GEMM), not through the child modules' forwards, so they are
    registered as external parameters of the adapted layer: gathered for its forward and backward."""
    import deepspeed

    for _, layer in iter_jumplora_layers(model):
        for name, param in layer.named_parameters():
            if "lora_" in name or name == "base_layer.weight":
                deepspeed.zero.register_external_parameter(layer, param)
    # PEFT's OSF forward reads U_low, S_low, V_low from its ParameterDict, a child module whose forward never runs
    for layer in model.modules():
        if isinstance(layer, OSFLayer):
            for name, param in layer.named_parameters():
                if name.startswith("osf_svd_params."):
                    deepspeed.zero.register_external_parameter(layer, param)

"""OSF (Orthogonal Subspace Fine-tuning, PEFT's `OSFConfig`) across a task sequence, with one engine.

PEFT's documented continual use re-wraps the model for every task: the update of the finished task goes into the
weights, the SVD of the updated weights is recomputed, and task t of n (1-based) preserves its top
k_t = ⌊f·min(d_out, d_in)·t/n⌋ singular directions (the progressive budget, f the maximum preserved fraction). Here
one `ContinualTrainer` keeps one optimizer and one engine for the whole sequence, so the shapes of what it trains are
fixed once, before the engine exists (`allocate_osf`):

- PEFT's trainable U_low (d_out × r), S_low (r), V_low (r × d_in) and their frozen initial copies at task 1's size,
  r = min − k_1, the largest trainable rank of the sequence;
- PEFT's U_high (d_out × k_n) / V_high (k_n × d_in), kept for a non-square factor only, at the last task's size.

At each task's start (`begin_osf_task`) every layer's current weight (the earlier tasks' updates merged in) is
decomposed by PEFT's `decompose_weight_matrix(W, top_k=k_t)` and the result is copied in place into those tensors,
zero-padded. The padding takes no part: a padded column of U_low / row of V_low / entry of S_low is zero, so its
gradient is exactly zero (every term of it is multiplied by a zero of the same index), PEFT's projection hooks keep it
zero and AdamW leaves a parameter with zero gradient and zero moments at zero; the padded columns of U_low_init make
PEFT's square-factor projector U_low_init·U_low_initᵀ the one of the real columns, and zero columns of U_high (rows of
V_high) add nothing to I − U_high·U_highᵀ. The forward, the gradient projection and `get_delta_weight` are PEFT's.

At the task's end (`end_osf_task`) W ← W + get_delta_weight (PEFT's), one layer at a time, each process writing its
own entries of W (entries.py: under ZeRO-3 its shard, no gather of W); then the factors and their initial copies are
zeroed, so the adapter adds exactly 0 until the next task begins (the difference of two equal products, as PEFT's
identity at init, would add float rounding noise to the evaluation). The ledger gets each task's update as it is: the
dense ΔW, stored in the ledger's sparse format (its nonzero entries and their values; a bit per entry at this density).

A restart inside a task gets the factors from the Trainer checkpoint (they are PEFT's parameters, in their padded
shapes); PEFT keeps the frozen tensors as non-persistent buffers, which no checkpoint holds, so they are recomputed
from the restored weight exactly as at the task's start (`restore_osf_task`: the same SVD of the same tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from peft.tuners.osf import OSFLayer
from peft.tuners.osf.utils import decompose_weight_matrix

from ._compat import osf_frozen_tensors
from .entries import (
    broadcast_from_main,
    distributed,
    is_main_process,
    read_weight_entries,
    weight_partition,
    write_weight_entries,
)
from .updates import LayerUpdate, MergedTaskUpdate
from .zero import gathered

LOW_PRECISION = (torch.float16, torch.bfloat16)
FACTORS = ("U_low", "S_low", "V_low")


def preserved_rank(fraction: float, min_dim: int, task_number: int, num_tasks: int) -> int:
    """k_t = ⌊f·min_dim·t/n⌋ for task t (1-based) of n, exact for the decimal f is written as (0.9 is 9/10 here,
    not the binary float just above it)."""
    return int(Fraction(repr(float(fraction))) * min_dim * task_number // num_tasks)


def iter_osf_layers(model: torch.nn.Module) -> Iterator[tuple[str, OSFLayer]]:
    """(name, layer) for every PEFT OSF layer of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, OSFLayer):
            yield name, module


class OsfAdaptedLayer:
    """A PEFT OSF layer as the run state (state.py) and the single-task baselines see an adapted layer: this
    process's entries of its merged base weight (OSF keeps no W_past, no earlier A and no float32 copy)."""

    ella_w_past = None

    def __init__(self, layer: OSFLayer):
        self.layer = layer
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.lora_A: dict = {}
        self.olora_past_A = None

    def get_base_layer(self) -> torch.nn.Module:
        return self.layer.get_base_layer()

    def entry_partition(self):
        return weight_partition(self.get_base_layer().weight, (self.out_features, self.in_features))

    def merged_weight(self) -> torch.Tensor:
        return read_weight_entries(self.get_base_layer().weight, self.entry_partition())

    @torch.no_grad()
    def restore_merged_weight(self, value: torch.Tensor) -> None:
        write_weight_entries(self.get_base_layer().weight, self.entry_partition(), value)

    def restore_w_past(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise ValueError("an OSF layer keeps no W_past")


def iter_adapted_layers(model: torch.nn.Module) -> Iterator[tuple[str, object]]:
    """Every layer whose merged weight a run carries from task to task: the JumpLoRA layers, and the OSF layers
    (as `OsfAdaptedLayer`)."""
    from .layer import iter_jumplora_layers

    yield from iter_jumplora_layers(model)
    for name, layer in iter_osf_layers(model):
        yield name, OsfAdaptedLayer(layer)


def osf_parameters(model: torch.nn.Module, adapter: str = "default") -> list[torch.nn.Parameter]:
    """PEFT's trainable U_low, S_low, V_low of every OSF layer."""
    return [layer.osf_svd_params[adapter][f] for _, layer in iter_osf_layers(model) for f in FACTORS]


@dataclass(frozen=True)
class OsfShapes:
    """The fixed shapes of one layer: `rank` trainable columns (task 1's min − k_1), `high` preserved ones kept for a
    non-square factor (the last task's k_n)."""

    rank: int
    high: int


def osf_shapes(layer: OSFLayer, fraction: float, num_tasks: int) -> OsfShapes:
    low = min(layer.out_features, layer.in_features)
    return OsfShapes(
        low - preserved_rank(fraction, low, 1, num_tasks), preserved_rank(fraction, low, num_tasks, num_tasks)
    )


@torch.no_grad()
def allocate_osf(model: torch.nn.Module, fraction: float, num_tasks: int, adapter: str = "default") -> None:
    """Give every OSF layer its fixed shapes for a sequence of `num_tasks` (all zeros: the adapter adds nothing until
    a task begins). Call it before the engine exists; the parameters stay the same objects (PEFT's gradient hooks
    and ZeRO-3's external-parameter registration refer to them), only their data is replaced."""
    for _, layer in iter_osf_layers(model):
        shapes = osf_shapes(layer, fraction, num_tasks)
        d_out, d_in, r = layer.out_features, layer.in_features, shapes.rank
        params = layer.osf_svd_params[adapter]
        like = params["U_low"]
        zeros = lambda *shape: torch.zeros(shape, dtype=like.dtype, device=like.device)  # noqa: E731
        for name, shape in (("U_low", (d_out, r)), ("S_low", (r,)), ("V_low", (r, d_in))):
            params[name].data = zeros(*shape)
        buffers = osf_frozen_tensors(layer)
        for name, shape in (
            ("_osf_U_low_init", (d_out, r)),
            ("_osf_S_low_init", (r,)),
            ("_osf_V_low_init", (r, d_in)),
        ):
            buffers[name][adapter] = zeros(*shape)
        if adapter in buffers["_osf_U_high"]:  # PEFT keeps U_high for d_out > d_in only
            buffers["_osf_U_high"][adapter] = zeros(d_out, shapes.high)
        if adapter in buffers["_osf_V_high"]:  # and V_high for d_out < d_in
            buffers["_osf_V_high"][adapter] = zeros(shapes.high, d_in)


def _fill(target: torch.Tensor, value: torch.Tensor) -> None:
    """target ← value in its leading block, zeros elsewhere."""
    target.zero_()
    target[tuple(slice(0, size) for size in value.shape)].copy_(value)


def _same_on_every_process(tensor: torch.Tensor) -> None:
    """Rank 0's values everywhere (each process decomposed the same weight; float non-determinism must not let the
    frozen tensors of the ranks differ)."""
    if distributed() and torch.distributed.get_world_size() > 1:
        tensor.copy_(
            broadcast_from_main(tensor.detach().cpu() if is_main_process() else None, tensor.shape, tensor.dtype)
        )


@torch.no_grad()
def _decompose_into(layer: OSFLayer, k: int, adapter: str, factors: bool) -> None:
    weight = layer.get_base_layer().weight
    with gathered([weight]):  # under ZeRO-3 one layer's weight is whole on every process, read only
        if weight.dtype in LOW_PRECISION:
            raise NotImplementedError(
                f"method osf needs float32 adapted weights (this one is {weight.dtype}): each task's update is added "
                "to the weight in its own dtype, which the ledger's single float32 rounding would not reproduce; "
                "train in float32 (bf16=False, a float32 model)"
            )
        svd = decompose_weight_matrix(weight.data, top_k=k)
    buffers = osf_frozen_tensors(layer)
    frozen = [
        (buffers["_osf_U_low_init"][adapter], svd["U_low"]),
        (buffers["_osf_S_low_init"][adapter], svd["S_low"]),
        (buffers["_osf_V_low_init"][adapter], svd["V_low"]),
    ]
    if adapter in buffers["_osf_U_high"]:
        frozen.append((buffers["_osf_U_high"][adapter], svd["U_high"]))
    if adapter in buffers["_osf_V_high"]:
        frozen.append((buffers["_osf_V_high"][adapter], svd["V_high"]))
    for target, value in frozen:
        _check_fits(target, value)
        _fill(target, value.detach())
        _same_on_every_process(target)
    if factors:  # the caller holds them whole, rank 0's write kept (zero.writing_adapters)
        params = layer.osf_svd_params[adapter]
        for name in FACTORS:
            _fill(params[name].data, svd[name].detach())
    layer.effective_rank[adapter] = k


def _check_fits(target: torch.Tensor, value: torch.Tensor) -> None:
    if any(v > t for v, t in zip(value.shape, target.shape)):
        raise RuntimeError(
            f"OSF tensors of shape {tuple(target.shape)} cannot hold {tuple(value.shape)}: allocate_osf was sized for "
            "another sequence"
        )


class OsfSequence:
    """OSF's task operations for a sequence of `num_tasks` with maximum preserved fraction `fraction`; with
    `single_task`, every task preserves task 1's k (each is trained alone from the base model)."""

    def __init__(self, fraction: float, num_tasks: int, single_task: bool = False, adapter: str = "default"):
        self.fraction, self.num_tasks, self.single_task, self.adapter = fraction, num_tasks, single_task, adapter

    def rank(self, layer: OSFLayer, task_index: int) -> int:
        low = min(layer.out_features, layer.in_features)
        return preserved_rank(self.fraction, low, 1 if self.single_task else task_index + 1, self.num_tasks)

    def begin(self, model: torch.nn.Module, task_index: int) -> None:
        """The task's decomposition of every layer's current weight, into the factors and the frozen tensors. The
        factors must be whole on every process (`zero.writing_adapters`)."""
        for _, layer in iter_osf_layers(model):
            _decompose_into(layer, self.rank(layer, task_index), self.adapter, factors=True)

    def restore(self, model: torch.nn.Module, task_index: int) -> None:
        """A restart inside the task: the frozen tensors again (the checkpoint gave the factors back)."""
        for _, layer in iter_osf_layers(model):
            _decompose_into(layer, self.rank(layer, task_index), self.adapter, factors=False)

    def notes(self, model: torch.nn.Module, task_index: int) -> dict:
        """What the report says of the task: the preserved rank per layer and the trainable parameters it had
        (Σ (d_out + d_in + 1)·(min − k_t)), and those allocated (task 1's size)."""
        ranks, trainable, allocated = {}, 0, 0
        for name, layer in iter_osf_layers(model):
            k, low = self.rank(layer, task_index), min(layer.out_features, layer.in_features)
            ranks[name] = k
            per_rank = layer.out_features + layer.in_features + 1
            trainable += per_rank * (low - k)
            allocated += per_rank * osf_frozen_tensors(layer)["_osf_S_low_init"][self.adapter].numel()
        return {"osf_preserved_rank": ranks, "trainable_parameters": trainable, "allocated_parameters": allocated}

    def end(
        self,
        model: torch.nn.Module,
        on_layer: Callable[[str, LayerUpdate], None] | None = None,
        previous: Sequence[MergedTaskUpdate] = (),
    ) -> MergedTaskUpdate:
        """W ← W + get_delta_weight (PEFT's) for every OSF layer, one at a time; then the factors and their initial
        copies are zeroed (the adapter adds exactly 0). The factors must be whole on every process
        (`zero.writing_adapters`); each process writes its own entries of W. `on_layer` (main process) receives each
        layer's exact update (the ledger); the support statistics are those of the other methods' merges."""
        from .lifecycle import SupportTally

        update, main = MergedTaskUpdate(), is_main_process()
        supports = SupportTally(update, previous)
        for name, layer in iter_osf_layers(model):
            with torch.no_grad():
                delta = layer.get_delta_weight(self.adapter).float()
            weight = layer.get_base_layer().weight
            partition = weight_partition(weight, (layer.out_features, layer.in_features))
            local = partition.local(delta)
            write_weight_entries(weight, partition, local, add=True)
            if on_layer is not None and main:
                flat = delta.reshape(-1).cpu()
                indices = torch.nonzero(flat, as_tuple=True)[0]
                on_layer(name, LayerUpdate(tuple(delta.shape), 1.0, indices=indices, values=flat[indices].clone()))
            support = local != 0
            update.workspace_bytes = max(
                update.workspace_bytes, delta.numel() * delta.element_size() + support.numel()
            )
            del delta
            supports.add(name, support, partition)
            self.clear(layer)
        supports.finish()
        return update

    @torch.no_grad()
    def clear(self, layer: OSFLayer) -> None:
        for name in FACTORS:
            layer.osf_svd_params[self.adapter][name].data.zero_()
        for buffer_dict in osf_frozen_tensors(layer).values():
            if self.adapter in buffer_dict:
                buffer_dict[self.adapter].zero_()

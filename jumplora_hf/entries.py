"""Where each process keeps its part of JumpLoRA's per-entry state, and the collectives that move it.

For every adapted weight W (d_out × d_in) JumpLoRA carries state from task to task that has one value per entry of W:
the float32 merged weight (for bf16/fp16 W, which is re-cast from it after every merge), W_past (ELLA: the sum of the
past tasks' ΔW_final) and one support bit per finished task. Under DeepSpeed ZeRO-3 every process keeps only the
entries of its own partition of W, exactly the range DeepSpeed gives it (W flattened, padded to a multiple of the
partition group's size, cut into equal parts), so a merge writes the process's shard of W in place, with no gather of
W and no copy of the whole state on any process. Everywhere else (one process, DDP, ZeRO-1/2) W is whole on every
process and so is its state: the same code with a partition that covers everything.

The collectives run over `torch.distributed` (global rank 0 is the main process); with one process, or without an
initialised process group, they return their input. Messages are JSON (nothing is unpickled).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ._compat import (
    is_zero3_param,
    zero3_clear_secondary_partition,
    zero3_data_is_resident,
    zero3_is_quantized,
    zero3_local_shard,
    zero3_partition_group,
)


@dataclass(frozen=True)
class EntryPartition:
    """This process's part of one weight's entries: the flat range [start, end) of the weight flattened.

    `part` is the size of every process's range (the last one may hold fewer real entries: padding). With
    `world == 1` the partition is the whole weight and the state keeps the weight's own (d_out, d_in) shape.
    """

    shape: tuple[int, int]
    start: int
    end: int
    part: int
    rank: int = 0
    world: int = 1
    group: object = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.end - self.start,) if self.sharded else self.shape

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This process's entries of a whole (d_out, d_in) tensor, in the state's layout (a view, no copy)."""
        return full.reshape(-1)[self.start : self.end] if self.sharded else full.reshape(self.shape)


def whole_partition(shape: tuple[int, int]) -> EntryPartition:
    numel = shape[0] * shape[1]
    return EntryPartition(tuple(shape), 0, numel, numel)


def partition_for_rank(shape: tuple[int, int], rank: int, world: int, group=None) -> EntryPartition:
    """DeepSpeed ZeRO-3's partition of a weight for process `rank` of `world`: equal parts of ceil(numel / world)."""
    if world <= 1:
        return whole_partition(shape)
    numel = shape[0] * shape[1]
    part = math.ceil(numel / world)
    start = min(rank * part, numel)
    return EntryPartition(tuple(shape), start, min(start + part, numel), part, rank, world, group)


def weight_partition(weight: torch.Tensor, shape: tuple[int, int]) -> EntryPartition:
    """The partition of `weight` (a ZeRO-3 parameter: DeepSpeed's own; anything else: the whole weight)."""
    if not is_zero3_param(weight):
        return whole_partition(shape)
    if zero3_is_quantized(weight):
        raise NotImplementedError(
            "JumpLoRA merges into the base weights, which DeepSpeed holds quantised here "
            "(zero_quantized_nontrainable_weights); turn that option off"
        )
    group = zero3_partition_group(weight)
    world = torch.distributed.get_world_size(group=group)
    partition = partition_for_rank(shape, torch.distributed.get_rank(group=group), world, group)
    if zero3_local_shard(weight).numel() != partition.part:
        raise NotImplementedError(
            f"DeepSpeed partitions a {shape} weight into {zero3_local_shard(weight).numel()} entries per process, not "
            f"the {partition.part} of its equal-parts rule; this DeepSpeed layout is not supported"
        )
    return partition


# ----------------------------------------------------------------------------- the weight's entries
def read_weight_entries(weight: torch.Tensor, partition: EntryPartition) -> torch.Tensor:
    """This process's entries of `weight` in the state's layout (the ZeRO-3 shard without its padding)."""
    if is_zero3_param(weight):
        return zero3_local_shard(weight)[: partition.end - partition.start].view(partition.local_shape)
    return partition.local(weight)


@torch.no_grad()
def write_weight_entries(weight: torch.Tensor, partition: EntryPartition, values: torch.Tensor, add=False) -> None:
    """Set (or, with `add`, increase) this process's entries of `weight`. For a ZeRO-3 parameter only the shard is
    written, unless DeepSpeed keeps the whole weight resident (persistent small parameters, or one gathered now):
    then every process also rebuilds the whole weight from all the shards (one all-gather of this weight)."""
    target = read_weight_entries(weight, partition)
    if add:
        target.add_(values.to(target.dtype))
    else:
        target.copy_(values.to(target.dtype))
    if not is_zero3_param(weight):
        return
    zero3_clear_secondary_partition(weight)  # ZeRO++ hpZ: rebuilt from the primary shards at the next gather
    if zero3_data_is_resident(weight):
        shard = zero3_local_shard(weight)
        whole = all_gather_entries(shard, partition)
        weight.data.copy_(whole.view(partition.shape).to(weight.device))


# ----------------------------------------------------------------------------- collectives
def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    return not distributed() or torch.distributed.get_rank() == 0


def _comm_device(group=None) -> torch.device:
    """NCCL moves CUDA tensors only; gloo (the CPU backend) moves CPU tensors."""
    backend = str(torch.distributed.get_backend(group))
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def all_gather_entries(local: torch.Tensor, partition: EntryPartition) -> torch.Tensor:
    """The whole weight's entries (flat, unpadded) from every process's part."""
    device = _comm_device(partition.group)
    padded = torch.zeros(partition.part, dtype=local.dtype, device=device)
    padded[: local.numel()] = local.reshape(-1)[: partition.part].to(device)
    out = torch.empty(partition.part * partition.world, dtype=local.dtype, device=device)
    # torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; older torch has only the former
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(out, padded, group=partition.group)
    return out[: partition.numel].to(local.device)


def gather_entries_to_main(local: torch.Tensor, partition: EntryPartition) -> torch.Tensor | None:
    """The whole (d_out, d_in) tensor on the main process (None elsewhere) from every process's part, on the CPU.

    Every process of the partition must call it; a whole partition needs no communication (the main process has it)."""
    if not partition.sharded:
        return local.detach().cpu() if is_main_process() else None
    device = _comm_device(partition.group)
    padded = torch.zeros(partition.part, dtype=local.dtype, device=device)
    padded[: local.numel()] = local.reshape(-1).to(device)
    main = torch.distributed.get_global_rank(partition.group, 0) if partition.group is not None else 0
    if partition.rank != 0:
        torch.distributed.gather(padded, None, dst=main, group=partition.group)
        return None
    out = torch.empty(partition.part * partition.world, dtype=local.dtype, device=device)
    torch.distributed.gather(padded, list(out.chunk(partition.world)), dst=main, group=partition.group)
    return out[: partition.numel].view(partition.shape).cpu()


def broadcast_from_main(tensor: torch.Tensor | None, shape, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` of the main process on every process (CPU); the others pass None, with its shape and dtype."""
    if not distributed() or torch.distributed.get_world_size() == 1:
        return tensor
    device = _comm_device()
    buffer = tensor.to(device) if is_main_process() else torch.empty(shape, dtype=dtype, device=device)
    torch.distributed.broadcast(buffer, src=0)
    return buffer.cpu()


def all_reduce_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    """The sum over the processes of `group` (a copy; unchanged with one process)."""
    if not distributed():
        return values.clone()
    device = _comm_device(group)
    buffer = values.to(device).clone()
    torch.distributed.all_reduce(buffer, group=group)
    return buffer.to(values.device)


def broadcast_json(obj=None):
    """The main process's JSON-serialisable `obj` on every process (the others pass None)."""
    if not distributed() or torch.distributed.get_world_size() == 1:
        return obj
    device = _comm_device()
    payload = json.dumps(obj).encode("utf-8") if is_main_process() else b""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    torch.distributed.broadcast(length, src=0)
    buffer = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        if is_main_process()
        else torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    )
    if int(length.item()):
        torch.distributed.broadcast(buffer, src=0)
    return json.loads(buffer.cpu().numpy().tobytes().decode("utf-8"))

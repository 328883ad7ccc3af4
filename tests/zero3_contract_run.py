"""The DeepSpeed ZeRO-3 parameter attributes jumplora_hf relies on (_compat.py), on a real partitioned parameter:
one process over gloo, a Linear built under `deepspeed.zero.Init`. Run by tests/test_compat.py in a subprocess
(DeepSpeed's process group and global state stay out of the test process)."""

import os

os.environ.update(
    MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29555"), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
)
import deepspeed
import torch

from jumplora_hf import _compat
from jumplora_hf.entries import read_weight_entries, weight_partition, write_weight_entries

deepspeed.init_distributed(dist_backend="gloo")
with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 1}):
    layer = torch.nn.Linear(5, 7)
w = layer.weight
assert _compat.is_zero3_param(w) and not _compat.zero3_is_quantized(w)
assert not _compat.zero3_data_is_resident(w) and w.data.numel() == 0
assert torch.distributed.get_world_size(_compat.zero3_partition_group(w)) == 1
partition = weight_partition(w, (7, 5))
assert (partition.start, partition.end, partition.world) == (0, 35, 1)
values = torch.arange(35, dtype=torch.float32).view(7, 5)
write_weight_entries(w, partition, values)
assert torch.equal(read_weight_entries(w, partition), values)
with deepspeed.zero.GatheredParameters([w]):
    assert _compat.zero3_data_is_resident(w) and torch.equal(w.data, values)
print("ok")

"""The per-entry state's partition (entries.py), the streaming safetensors writer (files.py), the in-place threshold
of the merge, τ's gradient before S_start, and the merge's counts (supports, overlap)."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_t5

from jumplora_hf import JumpLoraConfig, get_jumplora_model
from jumplora_hf.entries import partition_for_rank, whole_partition
from jumplora_hf.files import SafetensorsWriter, write_atomic
from jumplora_hf.gate import hard_threshold, hard_threshold_
from jumplora_hf.layer import iter_jumplora_layers
from jumplora_hf.lifecycle import end_task
from jumplora_hf.metrics import pack_support, support_jaccard


@pytest.mark.parametrize("shape,world", [((7, 5), 4), ((4, 4), 2), ((3, 3), 16), ((8, 6), 1)])
def test_partitions_cover_every_entry_once_as_deepspeed_cuts_them(shape, world):
    numel = shape[0] * shape[1]
    parts = [partition_for_rank(shape, rank, world) for rank in range(world)]
    assert all(p.part == (numel + world - 1) // world if world > 1 else numel for p in parts)  # ceil(numel / world)
    covered = torch.cat([torch.arange(p.start, p.end) for p in parts])
    assert torch.equal(covered, torch.arange(numel))
    full = torch.arange(numel, dtype=torch.float32).view(shape)
    if world == 1:
        assert parts[0] == whole_partition(shape) and parts[0].local(full).shape == shape
    else:
        assert torch.equal(torch.cat([p.local(full) for p in parts]), full.reshape(-1))
        assert parts[0].local(full).data_ptr() == full.data_ptr()  # a view, no copy


@pytest.mark.parametrize("declared", [True, False])
def test_streamed_safetensors_file_loads_and_a_failure_leaves_nothing(tmp_path, declared):
    tensors = {
        "a": torch.randn(3, 4),
        "bits": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "b": torch.randn(5).to(torch.bfloat16),
        "i": torch.arange(6, dtype=torch.int32),
    }
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()] if declared else None
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(str(path), specs) as writer:
        writer.set_metadata({"format": "2"})
        for key, value in tensors.items():
            writer.add(key, value)
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no temporary file left

    with pytest.raises(ValueError if declared else RuntimeError):
        with SafetensorsWriter(str(path), specs) as writer:
            writer.add("a", tensors["a"])
            if declared:
                writer.add("a2", tensors["a"])  # not what was declared next
            raise RuntimeError("the disk is full")
    assert os.listdir(tmp_path) == ["x.safetensors"] and torch.equal(load_file(path)["a"], tensors["a"])


def test_atomic_write_leaves_no_temporary_file_on_failure(tmp_path):
    (tmp_path / "target").mkdir()
    with pytest.raises(OSError):
        write_atomic(str(tmp_path / "target"), "x")  # a folder cannot be replaced by a file
    assert os.listdir(tmp_path) == ["target"]


def test_in_place_threshold_equals_the_reference():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 48, generator=gen)
    log_tau = torch.tensor([0.3]).log()
    delta[0, :4] = torch.tensor([0.3, -0.3, 0.30001, -0.30001])  # at and just past τ, both signs
    expected = hard_threshold(delta, log_tau)
    assert torch.equal(hard_threshold_(delta.clone(), log_tau), expected)


def test_tau_gets_no_gradient_before_s_start_outside_zero3():
    # Adam on τ starts at S_start (its first gradient); only under ZeRO-3 does τ get an explicit zero gradient before
    # (tested by the bit-identical ZeRO-3 restarts of test_distributed.py)
    model = get_jumplora_model(
        tiny_t5(), JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_jumprelu=True)
    )
    ids = torch.tensor([[5, 6, 7, 1]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.lora_log_tau["default"].grad is None for _, layer in iter_jumplora_layers(model))
    assert all(layer.lora_A["default"].weight.grad is not None for _, layer in iter_jumplora_layers(model))


def test_the_merge_counts_supports_and_overlap_from_the_layers_it_merged():
    model = get_jumplora_model(
        tiny_t5(), JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_jumprelu=True)
    )
    updates = []
    for task in range(3):
        gen = torch.Generator().manual_seed(task)
        for _, layer in iter_jumplora_layers(model):
            with torch.no_grad():
                layer.lora_B["default"].weight.normal_(generator=gen)
                layer.set_log_tau("default", float(np.log(0.5)))
        updates.append(end_task(model, accumulate_w_past=True, previous=updates))
    for name, packed in updates[2].supports.items():
        numel = updates[2].numels[name]
        assert (
            updates[2].nonzeros[name] == int(np.bitwise_count(packed).sum()) and 0 < updates[2].nonzeros[name] < numel
        )
        expected = np.mean([support_jaccard(packed, u.supports[name]) for u in updates[:2]])
        assert updates[2].jaccard[name] == pytest.approx(expected)
        assert packed.tobytes() == pack_support(np.unpackbits(packed, count=numel).astype(bool)).tobytes()
    assert not updates[0].jaccard

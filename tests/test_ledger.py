"""The task ledger: written by a run, rebuilt / reverted / composed / verified from the base model, continued by a
resumed run, and the CLI. Tiny T5 and Llama, generated tasks."""

import os

import pytest
import torch
from tiny import TINY_MODELS, continual_args, task_stream, tokenizer

from jumplora_hf import ContinualTrainer, JumpLoraConfig
from jumplora_hf.layer import iter_jumplora_layers
from jumplora_hf.ledger import TaskLedger
from jumplora_hf.ledger import main as ledger_cli

TARGETS = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}


def _train(out, arch, method, tasks=3, dtype=torch.float32):
    args = continual_args(out, method)
    model = TINY_MODELS[arch]().to(dtype)
    trainer = ContinualTrainer(
        model, args, tokenizer(), peft_config=JumpLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch])
    )
    trainer.train_continual(task_stream(3)[:tasks])
    return trainer


def _merged(trainer) -> dict[str, torch.Tensor]:
    return {
        name.removeprefix("base_model.model.") + ".weight": layer.get_base_layer().weight.detach().clone()
        for name, layer in iter_jumplora_layers(trainer.model)
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(arch, method):
        if (arch, method) not in cache:
            out = tmp_path_factory.mktemp(f"{arch}_{method}")
            cache[arch, method] = (out, _merged(_train(out, arch, method)))
        return cache[arch, method]

    return get


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("method", ["jumplora_inclora", "inclora"])
def test_rebuild_is_bit_identical_and_revert_matches_composing_the_others(runs, arch, method):
    out, merged = runs(arch, method)
    ledger = TaskLedger(str(out))
    entries = ledger.entries()
    assert [e.name for e in entries] == ["task0", "task1", "task2"] and [e.index for e in entries] == [0, 1, 2]
    assert all(
        e.metadata["method"] == method and e.metadata["steps"] == 4 and e.metadata["examples"] == 16 for e in entries
    )
    assert all(len(e.metadata["data_fingerprint"]) == 64 for e in entries)
    sparse = method.startswith("jumplora")
    for entry in entries:
        for update in entry.layers().values():
            assert update.is_sparse == sparse
        assert (entry.metadata["tau"] != {}) == sparse and (entry.metadata["sparsity_mean"] > 0.2) == sparse

    rebuilt = dict(ledger.compose(TINY_MODELS[arch]()).named_parameters())
    for key, weight in merged.items():
        assert torch.equal(rebuilt[key], weight), key  # bit-identical to the trained model
    assert ledger.verify(_as_model(arch, merged), TINY_MODELS[arch]()) == 0.0

    base = dict(TINY_MODELS[arch]().named_parameters())
    reverted = dict(ledger.revert(_as_model(arch, merged), "task1").named_parameters())
    others = dict(ledger.compose(TINY_MODELS[arch](), ["task0", 3]).named_parameters())
    first_only = dict(ledger.compose(TINY_MODELS[arch](), [1]).named_parameters())
    for key in merged:
        assert torch.allclose(reverted[key], others[key], atol=1e-6), key  # W − Δ_2 = W0 + Δ_1 + Δ_3
        assert not torch.equal(others[key], merged[key]) and not torch.equal(first_only[key], base[key])


def _as_model(arch, weights):
    model = TINY_MODELS[arch]()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, value in weights.items():
            params[key].copy_(value)
    return model


def test_summary_and_cli(runs, tmp_path, capsys):
    out, merged = runs("llama", "jumplora_inclora")
    rows = TaskLedger(str(out)).summary()
    assert [r["name"] for r in rows] == ["task0", "task1", "task2"] and rows[0]["jaccard_with_earlier"] is None
    assert all(0.0 < r["jaccard_with_earlier"] < 1.0 for r in rows[1:]) and all(r["bytes"] > 0 for r in rows)
    assert ledger_cli(["show", str(out), "--layers"]) == 0
    shown = capsys.readouterr().out
    assert "task 2 task1 (jumplora_inclora): sparsity" in shown and "Jaccard with earlier" in shown

    base_dir, merged_dir = tmp_path / "base", tmp_path / "merged"
    TINY_MODELS["llama"]().save_pretrained(base_dir)
    _as_model("llama", merged).save_pretrained(merged_dir)
    assert ledger_cli(["verify", str(out), "--base", str(base_dir), "--model", str(merged_dir)]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert (
        ledger_cli(
            ["rebuild", str(out), "--base", str(base_dir), "--tasks", "task0,task2", "--out", str(tmp_path / "r")]
        )
        == 0
    )
    assert (
        ledger_cli(["revert", str(out), "--base", str(base_dir), "--task", "task1", "--out", str(tmp_path / "v")]) == 0
    )
    from transformers import LlamaForCausalLM

    a = LlamaForCausalLM.from_pretrained(tmp_path / "r").state_dict()
    b = LlamaForCausalLM.from_pretrained(tmp_path / "v").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # rebuilding {1, 3} is reverting 2
    assert ledger_cli(["verify", str(out), "--base", str(base_dir), "--model", str(tmp_path / "v")]) == 1
    assert (
        ledger_cli(["revert", str(out), "--base", str(base_dir), "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    )
    assert "no task 'nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_resumed_run_continues_the_same_ledger(tmp_path, runs):
    full_out, _ = runs("t5", "jumplora_inclora")
    part = tmp_path / "part"
    _train(part, "t5", "jumplora_inclora", tasks=2)
    first_two = {name: os.stat(part / "ledger" / name).st_mtime_ns for name in os.listdir(part / "ledger")}
    _train(part, "t5", "jumplora_inclora", tasks=3)  # resumed: trains the third task only
    files = sorted(os.listdir(part / "ledger"))
    assert files == sorted(os.listdir(full_out / "ledger"))
    assert all(
        os.stat(part / "ledger" / name).st_mtime_ns == stamp for name, stamp in first_two.items()
    )  # not rewritten
    for name in files:
        ours = TaskLedger(str(part)).select([name.split("-", 2)[2].removesuffix(".safetensors")])[0].layers()
        full = TaskLedger(str(full_out)).select([name.split("-", 2)[2].removesuffix(".safetensors")])[0].layers()
        for module, update in ours.items():
            assert torch.equal(update.indices, full[module].indices) and torch.equal(
                update.values, full[module].values
            )


@pytest.mark.parametrize("density", [0.01, 0.4])
def test_sparse_updates_round_trip_in_either_encoding(tmp_path, density):
    from jumplora_hf.metrics import pack_support
    from jumplora_hf.updates import LayerUpdate, MergedTaskUpdate

    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 96, generator=gen) * (torch.rand(64, 96, generator=gen) < density)
    flat = dense.reshape(-1)
    indices = torch.nonzero(flat, as_tuple=True)[0]
    update = MergedTaskUpdate(
        supports={"base_model.model.l": pack_support((dense != 0).numpy())},
        numels={"base_model.model.l": dense.numel()},
        nonzeros={"base_model.model.l": len(indices)},
    )
    layers = {"base_model.model.l": LayerUpdate((64, 96), 2.0, indices=indices, values=flat[indices])}
    path = TaskLedger(str(tmp_path)).write_task(0, "t", "jumplora_inclora", update, layers)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert ("l.mask" in f.keys()) == (density > 1 / 32) and ("l.indices" in f.keys()) == (density <= 1 / 32)
    loaded = TaskLedger(str(tmp_path)).entries()[0].layers()["l"]
    assert torch.equal(loaded.indices, indices) and torch.equal(loaded.dense(), dense)

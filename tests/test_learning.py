"""The whole pipeline learns: train → merge → generate → exact match, on a trivially learnable task."""

import pytest
import torch
from tiny import TINY_MODELS, keyword_task, tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from jumplora_hf import ContinualConfig, ContinualTrainer, JumpLoraConfig

SETUPS = {
    # untied T5 head: a tied one would be changed by every merge into the embeddings
    "t5": (dict(tie_word_embeddings=False), ["q", "k", "v", "o", "wi", "wo"], AutoModelForSeq2SeqLM),
    # a 0.02 init caps the frozen random head's logits near 0.6: nothing can be learned with confidence
    "llama": (
        dict(initializer_range=0.2),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        AutoModelForCausalLM,
    ),
}


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_tiny_model_learns_and_saves_a_plain_merged_checkpoint(tmp_path, arch):
    overrides, targets, auto_class = SETUPS[arch]
    args = ContinualConfig(
        output_dir=str(tmp_path / "run"),
        method="jumplora_inclora",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        per_device_train_batch_size=8,
        per_device_eval_batch_size=64,
        num_train_epochs=1,
        logging_steps=50,
        report_to="none",
        use_cpu=True,
        seed=1,
        disable_tqdm=True,
    )
    trainer = ContinualTrainer(
        TINY_MODELS[arch](**overrides),
        args,
        tokenizer(),
        peft_config=JumpLoraConfig(r=8, lora_alpha=16, target_modules=targets),
    )
    task = keyword_task("keyword", ["yes", "no"], ["sun", "moon"], n_train=1600, n_eval=64, filler=(0, 3))  # 200 steps
    report = trainer.train_continual([task])
    assert report["accuracy_matrix"][0][0] >= 0.9
    assert report["per_task"][0]["sparsity"]["mean"] > 0.2

    ids = torch.tensor([trainer.train_dataset[0]["input_ids"]])
    inputs = {"input_ids": ids, **({"decoder_input_ids": torch.zeros_like(ids[:, :1])} if arch == "t5" else {})}
    with torch.no_grad():
        expected = trainer.model(**inputs).logits
    trainer.model.unload().save_pretrained(tmp_path / "merged")
    reloaded = auto_class.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-5)

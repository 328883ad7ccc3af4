"""The README's plain-Trainer lines in a script, for a 2-process launch (tests/test_integration.py):

accelerate launch --multi_gpu --num_processes 2 tests/plain_trainer_run.py OUT_DIR
"""

import json
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from tiny import task_stream, tiny_llama, tokenizer  # noqa: E402

from jumplora_hf import JumpLoraConfig, attach_jumplora, finish_task, get_jumplora_model  # noqa: E402
from jumplora_hf.data import (
    ContinualDataCollator,  # noqa: E402
    encode_task,  # noqa: E402
)


def main():
    out = sys.argv[1]
    model = get_jumplora_model(tiny_llama(), JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    encoded = encode_task(task_stream(1, n_train=40)[0], tokenizer(), False, 128)
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_steps=10,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        seed=11,
        disable_tqdm=True,
        average_tokens_across_devices=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encoded.train,
        data_collator=ContinualDataCollator(tokenizer().pad_token_id, False),
    )
    attach_jumplora(trainer)
    trainer.train()
    update = finish_task(trainer, merged_dir=os.path.join(out, "merged"))
    # every rank holds the same merged weights: compare them across ranks
    weights = torch.cat(
        [p.detach().flatten() for n, p in trainer.model.named_parameters() if "base_layer.weight" in n]
    )
    gathered = [torch.zeros_like(weights) for _ in range(trainer.args.world_size)]
    torch.distributed.all_gather(gathered, weights)
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(
                {
                    "world_size": trainer.args.world_size,
                    "log_history": trainer.state.log_history,
                    "ranks_equal": all(torch.equal(g, gathered[0]) for g in gathered),
                    "sparsity": sum(update.sparsity().values()) / len(update.supports),
                },
                f,
            )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

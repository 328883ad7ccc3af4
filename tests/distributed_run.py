"""A tiny 3-task sequence for the multi-process tests; rank 0 writes what the tests compare.

python tests/distributed_run.py OUT_DIR [--method M]
accelerate launch --multi_gpu --num_processes 2 tests/distributed_run.py OUT_DIR
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from tiny import SurvivorProbe, keyword_task, tiny_t5, tokenizer  # noqa: E402

from jumplora_hf import (  # noqa: E402
    ContinualCallback,
    ContinualSeq2SeqConfig,
    ContinualSeq2SeqTrainer,
    JumpLoraConfig,
    iter_jumplora_layers,
)
from jumplora_hf.zero import gathered_adapters  # noqa: E402


class TaskStartProbe(ContinualCallback):
    """Max |B| over all adapters when every task begins: 0 when the task starts from ΔW = 0; and the optimizer state."""

    def __init__(self):
        self.max_abs_b, self.optimizer_states = [], []

    def on_task_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        with gathered_adapters(model):
            self.max_abs_b.append(
                max(layer.lora_B["default"].weight.abs().max().item() for _, layer in iter_jumplora_layers(model))
            )
        self.optimizer_states.append(len(innermost_optimizer(optimizer).state))


def innermost_optimizer(optimizer):
    """The torch optimizer inside accelerate's and DeepSpeed's wrappers (for ZeRO: over the flat fp32 shards)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def deepspeed_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--method", default="jumplora_ella")
    parser.add_argument("--threshold_mode", default="per_block")
    parser.add_argument(
        "--optim", default="sgd", help="sgd: updates linear in the gradient, so backends agree closely"
    )
    parser.add_argument(
        "--zero_stage", type=int, default=0, help="2 or 3: DeepSpeed ZeRO from the arguments (no config file)"
    )
    parser.add_argument("--tau_lr_multiplier", type=float, default=1.0)
    cli = parser.parse_args()
    args = ContinualSeq2SeqConfig(
        output_dir=cli.out,
        method=cli.method,
        ella_lambda=[0.0, 100.0, 100.0] if "ella" in cli.method else None,
        per_device_train_batch_size=8 // int(os.environ.get("WORLD_SIZE", 1)),
        per_device_eval_batch_size=4,
        learning_rate=0.5 if cli.optim == "sgd" else 1e-2,
        optim=cli.optim,
        lr_scheduler_type="constant",
        num_train_epochs=1,
        logging_steps=1,
        report_to="none",
        seed=3,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        # the Trainer multiplies the loss by the world size for token averaging; on MULTI_CPU (gloo) we measured
        # the gradient doubled by it, so compare backends without it (equal-length examples make it moot)
        average_tokens_across_devices=False,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available() else None,
        deepspeed=deepspeed_config(cli.zero_stage) if cli.zero_stage else None,
        tau_lr_multiplier=cli.tau_lr_multiplier,
        bf16=os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16",  # launched with --mixed_precision bf16
    )
    probe, survivors = TaskStartProbe(), SurvivorProbe()
    config = JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], threshold_mode=cli.threshold_mode)
    trainer = ContinualSeq2SeqTrainer(
        tiny_t5(tie_word_embeddings=False), args, tokenizer(), peft_config=config, callbacks=[probe, survivors]
    )
    # every example has the same length, so every rank holds as many answer tokens as any other and the
    # per-rank loss normalisation equals the global one: the backends can then agree to float precision
    tasks = [
        keyword_task(f"task{i}", options, triggers, n_train=32, n_eval=12, seed=i, filler=(0, 0))
        for i, (options, triggers) in enumerate(
            [(["aa", "bb"], ["xx", "yy"]), (["cc", "dd"], ["uu", "vv"]), (["ee", "ff"], ["ss", "tt"])]
        )
    ]
    report = trainer.train_continual(tasks)
    with gathered_adapters(trainer.model, include_base=True):
        weights = {
            name: layer.get_base_layer().weight.detach().cpu().clone()
            for name, layer in iter_jumplora_layers(trainer.model)
        }
    trainer.save_merged_model(os.path.join(cli.out, "merged"))
    if trainer.is_world_process_zero():
        steps = [int(s["step"]) for s in innermost_optimizer(trainer.optimizer).state.values() if "step" in s]
        save_file(weights, os.path.join(cli.out, "weights.safetensors"))
        result = {
            "report": report,
            "task_start_max_abs_b": probe.max_abs_b,
            "task_start_optimizer_states": probe.optimizer_states,
            "last_task_steps": trainer.task_spans[-1].num_steps,
            "optimizer_step_counts": steps,
            "world_size": trainer.args.world_size,
            "group_lrs": [g["lr"] for g in innermost_optimizer(trainer.optimizer).param_groups],
            "learning_rate": trainer.args.learning_rate,
            "survivors_at_s_start": survivors.counts,
        }
        with open(os.path.join(cli.out, "result.json"), "w") as f:
            json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # every result is written: skip the interpreter's teardown, where a C++ thread of the DeepSpeed / gloo stack
        # was destroyed while joinable now and then ("terminate called without an active exception", rank 1 only)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

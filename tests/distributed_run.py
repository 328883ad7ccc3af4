"""A tiny 3-task sequence for the multi-process tests; rank 0 writes what the tests compare.

python tests/distributed_run.py OUT_DIR [--method M]
accelerate launch --multi_gpu --num_processes 2 tests/distributed_run.py OUT_DIR
"""

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import T5ForConditionalGeneration

sys.path.insert(0, os.path.dirname(__file__))
from tiny import SurvivorProbe, keyword_task, tiny_t5, tokenizer  # noqa: E402

from jumplora_hf import ContinualCallback, ContinualConfig, ContinualTrainer, JumpLoraConfig, run_directory  # noqa: E402
from jumplora_hf.layer import iter_jumplora_layers  # noqa: E402
from jumplora_hf.osf import iter_adapted_layers, iter_osf_layers  # noqa: E402
from jumplora_hf.zero import gathered_adapters  # noqa: E402


class FirstStep(ContinualCallback):
    """The optimizer step this process trained first (a restart: where it continued)."""

    def __init__(self):
        self.step = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.step is None:
            self.step = state.global_step


class TaskStartProbe(ContinualCallback):
    """Max |B| over all adapters when every task begins (OSF: max |get_delta_weight|): 0 when the task starts from
    ΔW = 0; and the optimizer state."""

    def __init__(self):
        self.max_abs_b, self.optimizer_states = [], []

    def on_task_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        with gathered_adapters(model):
            values = [layer.lora_B["default"].weight.abs().max().item() for _, layer in iter_jumplora_layers(model)]
            values += [layer.get_delta_weight("default").abs().max().item() for _, layer in iter_osf_layers(model)]
            self.max_abs_b.append(max(values))
        self.optimizer_states.append(len(innermost_optimizer(optimizer).state))


def pause(folder: str, state) -> None:
    """Write `paused-rank<R>` (this process's pid and the optimizer step) into `folder` and sleep: the test kills the
    whole job (kill -9) at this point."""
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(folder, f"paused-rank{rank}.tmp"), "w") as f:
        json.dump({"pid": os.getpid(), "step": state.global_step}, f)
    os.replace(os.path.join(folder, f"paused-rank{rank}.tmp"), os.path.join(folder, f"paused-rank{rank}"))
    while True:
        time.sleep(60)


class PauseAt(ContinualCallback):
    """Stops the job at a point of task `task` (0-based), for a kill test:

    - "step:S": before step S of the task (every process);
    - "checkpoint:G": right after the Trainer checkpoint of optimizer step G is written (every process);
    - "merge": inside the task's merge, after its first layer (the main process; the others wait in the merge);
    - "state": between the task's ledger file and its run state (every process);
    - "evaluation": in the evaluation after the task's merge (every process).
    """

    def __init__(self, task: int, point: str, folder: str, state_module):
        self.task, self.point, self.folder = task, point, folder
        self.merged = False
        self.state = None
        if point == "state":  # the run directory writes the run state right after the ledger file
            original = state_module.write_state

            def write_state(output_dir, record, *args, **kwargs):
                if len(record.tasks) == self.task + 1:
                    pause(self.folder, self.state)
                return original(output_dir, record, *args, **kwargs)

            state_module.write_state = write_state

    def on_step_begin(self, args, state, control, **kwargs):
        self.state = state

    def on_task_step(self, args, state, control, task=None, step=0, **kwargs):
        if self.point == f"step:{step}" and task.index == self.task:
            pause(self.folder, state)

    def on_save(self, args, state, control, **kwargs):
        if self.point == f"checkpoint:{state.global_step}":
            pause(self.folder, state)

    def on_task_layer_merged(self, args, state, control, task=None, **kwargs):
        if self.point == "merge" and task.index == self.task:
            pause(self.folder, state)

    def on_task_end(self, args, state, control, task=None, **kwargs):
        self.merged = task.index == self.task

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.point == "evaluation" and self.merged:
            pause(self.folder, state)


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
    parser.add_argument("--steps_per_task", type=int, default=4, help="optimizer steps per task (8 examples each)")
    parser.add_argument("--pause", default=None, help="TASK,POINT,FOLDER: stop there (PauseAt) for a kill test")
    parser.add_argument("--save_steps", type=int, default=0, help="a Trainer checkpoint every this many steps")
    parser.add_argument(
        "--from_pretrained",
        default=None,
        help="load the tiny model saved here after the training arguments exist: under ZeRO-3 it is built "
        "partitioned (zero.Init), as from_pretrained does for a large model",
    )
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--d_model", type=int, default=32)
    parser.add_argument(
        "--memory_report", action="store_true", help="every process writes the bytes of JumpLoRA's state it holds"
    )
    cli = parser.parse_args()
    args = ContinualConfig(
        output_dir=cli.out,
        method=cli.method,
        ella_lambda=[0.0] + [100.0] * (cli.tasks - 1) if "ella" in cli.method else None,
        per_device_train_batch_size=8 // int(os.environ.get("WORLD_SIZE", 1)),
        per_device_eval_batch_size=4,
        # osf: its factors are orthonormal SVD factors and its steps products of two of them, so SGD's 0.5 (clipped to
        # unit gradient norm) moves them far, and the SVD at the next task amplifies rounding where singular values near the cut are close (measured ~1e-4 between backends at 0.5, 1e-5 at 0.05); 0.02 keeps the
        # updates in the range of the other methods'
        learning_rate=(0.02 if cli.method == "osf" else 0.5) if cli.optim == "sgd" else 1e-2,
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
        save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500,
    )
    probe, survivors, first = TaskStartProbe(), SurvivorProbe(), FirstStep()
    callbacks = [probe, survivors, first]
    if cli.pause:
        task, point, folder = cli.pause.split(",", 2)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"pid-rank{os.environ.get('RANK', 0)}"), "w") as f:
            f.write(str(os.getpid()))
        callbacks.append(
            PauseAt(
                int(task), point if ":" in point or not point.isdigit() else f"step:{point}", folder, run_directory
            )
        )
    config = JumpLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], threshold_mode=cli.threshold_mode)
    if cli.from_pretrained:
        model = T5ForConditionalGeneration.from_pretrained(cli.from_pretrained)
    else:
        model = tiny_t5(d_model=cli.d_model, tie_word_embeddings=False)
    built_partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    trainer = ContinualTrainer(model, args, tokenizer(), peft_config=config, callbacks=callbacks)
    # every example has the same length, so every rank holds as many answer tokens as any other and the
    # per-rank loss normalisation equals the global one: the backends can then agree to float precision
    tasks = [
        keyword_task(f"task{i}", options, triggers, n_train=8 * cli.steps_per_task, n_eval=12, seed=i, filler=(0, 0))
        for i, (options, triggers) in enumerate(
            [(["aa", "bb"], ["xx", "yy"]), (["cc", "dd"], ["uu", "vv"]), (["ee", "ff"], ["ss", "tt"])][: cli.tasks]
        )
    ]
    report = trainer.train_continual(tasks)
    if cli.memory_report:
        layers = [layer for _, layer in iter_jumplora_layers(trainer.model)]
        memory = {
            "state_bytes": sum(layer.entry_state_nbytes() for layer in layers),
            "support_bytes": sum(update.support_nbytes() for update in trainer.record.updates),
            "workspace_bytes": max(update.workspace_bytes for update in trainer.record.updates),
        }
        os.makedirs(cli.out, exist_ok=True)
        with open(os.path.join(cli.out, f"memory-rank{int(os.environ.get('RANK', 0))}.json"), "w") as f:
            json.dump(memory, f)
    with gathered_adapters(trainer.model, include_base=True):
        weights = {
            name: layer.get_base_layer().weight.detach().cpu().clone()
            for name, layer in iter_adapted_layers(trainer.model)
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
            "built_partitioned": built_partitioned,
            "first_step": first.step,
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

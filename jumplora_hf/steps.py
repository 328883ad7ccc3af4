"""A task sequence as optimizer steps: which steps belong to which task, their batches and LR.

`ContinualTrainer` trains every task inside a single `Trainer.train()` call, so that one
optimizer and one engine (DDP or DeepSpeed) serve the whole sequence. Each task owns a contiguous
range of optimizer steps, its batches never mix with another task's, and its LR schedule restarts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Sampler
from transformers import get_scheduler


@dataclass(frozen=True)
class TaskSpan:
    """Task `index` (named `name`) owns the optimizer steps first_step .. first_step + num_steps − 1 of the run."""

    index: int
    num_examples: int
    first_step: int
    num_steps: int
    name: str = ""
    steps_per_epoch: int = 0  # optimizer steps of one pass over the task's examples

    @property
    def end_step(self) -> int:
        return self.first_step + self.num_steps


def plan_task_spans(
    num_examples: Sequence[int],
    first_index: int,
    per_device_batch_size: int,
    num_processes: int,
    gradient_accumulation_steps: int,
    num_train_epochs: float,
    max_steps_per_task: int = -1,
    names: Sequence[str] | None = None,
) -> list[TaskSpan]:
    """Steps per task: `max_steps_per_task` when > 0, else `num_train_epochs` passes over the task's data.

    One optimizer step consumes `gradient_accumulation_steps` batches on each of the `num_processes`
    processes; a task's last step is completed with examples from its own start (as accelerate's
    `even_batches` does), so that no step mixes two tasks.
    """
    spans, step = [], 0
    for offset, n in enumerate(num_examples):
        batches_per_epoch = math.ceil(n / per_device_batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / (num_processes * gradient_accumulation_steps))
        steps = max_steps_per_task if max_steps_per_task > 0 else max(1, math.ceil(num_train_epochs * steps_per_epoch))
        name = names[offset] if names else f"task{first_index + offset}"
        spans.append(TaskSpan(first_index + offset, n, step, steps, name, steps_per_epoch))
        step += steps
    return spans


class TaskBatchSampler(Sampler[list[int]]):
    """Batches of indices into the concatenation of the tasks' datasets, task after task.

    Yields per-process batches in the order accelerate's `BatchSamplerShard` deals them out (batch b
    goes to process b mod num_processes), so with N processes of batch size B a step sees the same
    examples as one process of batch size N·B. Each task draws a fresh permutation per epoch from a
    generator seeded by (seed, task index, epoch): the data order of a task does not depend on the
    tasks before it, nor on whether the run was resumed. With `start_step`, the batches of the optimizer steps
    before it are left out (a run restarted at a task boundary).
    """

    def __init__(
        self,
        spans: Sequence[TaskSpan],
        per_device_batch_size: int,
        num_processes: int,
        gradient_accumulation_steps: int,
        seed: int,
        start_step: int = 0,
    ):
        # no `batch_size` attribute: accelerate then deals our batches out whole instead of re-batching them
        self.spans = list(spans)
        self.per_device_batch_size = per_device_batch_size
        self.batches_per_step = num_processes * gradient_accumulation_steps
        self.seed = seed
        self.start_step = start_step  # the batches of the steps before it are left out (a run resumed there)

    def __len__(self) -> int:
        return max(0, self.spans[-1].end_step - self.start_step) * self.batches_per_step if self.spans else 0

    def _task_batches(self, span: TaskSpan) -> Iterator[list[int]]:
        """The task's batches (local indices), epoch after epoch; an epoch's last batch may be smaller."""
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + span.index * 10_007 + epoch)
            order = torch.randperm(span.num_examples, generator=generator).tolist()
            for start in range(0, span.num_examples, self.per_device_batch_size):
                yield order[start : start + self.per_device_batch_size]
            epoch += 1

    def __iter__(self) -> Iterator[list[int]]:
        offset = 0
        for span in self.spans:
            batches = self._task_batches(span)
            for step in range(span.first_step, span.end_step):
                for _ in range(self.batches_per_step):
                    batch = next(batches)  # drawn even when skipped: a task's order depends on nothing else
                    if step >= self.start_step:
                        yield [offset + i for i in batch]
            offset += span.num_examples


def task_restarting_schedule(
    optimizer: torch.optim.Optimizer,
    spans: Sequence[TaskSpan],
    scheduler_type: str,
    warmup: Callable[[int], int],
    scheduler_kwargs: dict | None = None,
) -> LambdaLR:
    """One LR multiplier function over the run: the HF schedule `scheduler_type` restarted at every task.

    `warmup(num_steps)` gives a task's warmup steps. The per-task multipliers are read from HF's
    `get_scheduler` built on a throwaway optimizer, so every HF schedule type works unchanged.
    """
    multipliers = []
    for span in spans:
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = get_scheduler(
            scheduler_type,
            probe,
            num_warmup_steps=warmup(span.num_steps),
            num_training_steps=span.num_steps,
            scheduler_specific_kwargs=scheduler_kwargs or {},
        )
        multipliers.append(schedule.lr_lambdas[0])
    firsts = [span.first_step for span in spans]

    def multiplier(step: int) -> float:
        task = max(0, sum(first <= step for first in firsts) - 1)
        return multipliers[task](step - firsts[task])

    return LambdaLR(optimizer, multiplier)


def reset_optimizer_state(optimizer) -> None:
    """Empty the state (moments, step counts) of the innermost torch optimizer; it is rebuilt at the next step.

    Wrappers (accelerate's AcceleratedOptimizer, DeepSpeed's ZeRO optimizers) keep the torch optimizer
    under `.optimizer`; for ZeRO its parameters are the flat fp32 partitions, whose state this empties too.
    """
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    inner.state.clear()

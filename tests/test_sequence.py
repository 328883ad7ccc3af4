"""The task sequence as one run: step spans, per-task batches and the restarting LR schedule."""

import pytest
import torch

from jumplora_hf.steps import TaskBatchSampler, plan_task_spans, reset_optimizer_state, task_restarting_schedule


@pytest.mark.parametrize(
    "processes,accumulation,epochs,max_steps,expected",
    [(1, 1, 1, -1, [3, 2]), (2, 1, 1, -1, [2, 1]), (1, 2, 1, -1, [2, 1]), (1, 1, 2, -1, [6, 4]), (2, 1, 1, 5, [5, 5])],
)
def test_plan_gives_each_task_its_own_steps(processes, accumulation, epochs, max_steps, expected):
    spans = plan_task_spans([10, 7], 3, 4, processes, accumulation, epochs, max_steps)
    assert [s.num_steps for s in spans] == expected
    assert [s.index for s in spans] == [3, 4]
    assert spans[0].first_step == 0 and spans[1].first_step == spans[0].end_step


def _global_steps(sizes, batch_size, processes):
    """The examples of each optimizer step, as accelerate deals batch b to process b mod processes."""
    spans = plan_task_spans(sizes, 0, batch_size, processes, 1, 1)
    batches = list(TaskBatchSampler(spans, batch_size, processes, 1, seed=5))
    assert len(batches) == len(TaskBatchSampler(spans, batch_size, processes, 1, seed=5))
    return [sorted(i for b in batches[k : k + processes] for i in b) for k in range(0, len(batches), processes)], spans


def test_two_processes_see_the_batches_of_one_process_with_twice_the_batch():
    one, _ = _global_steps([16, 24], 8, 1)
    two, _ = _global_steps([16, 24], 4, 2)
    assert one == two and len(one) == 5


def test_batches_stay_within_their_task_and_cover_it():
    steps, spans = _global_steps([10, 7], 4, 1)
    first, second = steps[: spans[0].num_steps], steps[spans[0].num_steps :]
    assert sorted(i for s in first for i in s) == list(range(10))
    assert sorted(i for s in second for i in s) == list(range(10, 17))


def test_a_task_order_does_not_depend_on_the_tasks_before_it():
    both = plan_task_spans([10, 7], 0, 4, 1, 1, 1)
    alone = plan_task_spans([7], 1, 4, 1, 1, 1)  # the second task, resumed on its own
    from_both = list(TaskBatchSampler(both, 4, 1, 1, seed=5))[both[1].first_step :]
    from_alone = list(TaskBatchSampler(alone, 4, 1, 1, seed=5))
    assert [[i - 10 for i in b] for b in from_both] == from_alone


def test_lr_schedule_restarts_at_every_task():
    spans = plan_task_spans([8, 12], 0, 4, 1, 1, 1)  # 2 then 3 steps
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = task_restarting_schedule(optimizer, spans, "linear", warmup=lambda steps: 1)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([0.0, 1.0, 0.0, 1.0, 0.5])


def test_optimizer_state_reset_reaches_the_wrapped_optimizer():
    param = torch.nn.Parameter(torch.ones(2))
    inner = torch.optim.AdamW([param])
    param.grad = torch.ones(2)
    inner.step()

    class Wrapper:  # as accelerate's and DeepSpeed's wrappers keep it
        optimizer = inner

    reset_optimizer_state(Wrapper())
    assert len(inner.state) == 0
    inner.step()
    assert int(inner.state[param]["step"]) == 1

"""Where a restarted task sequence continues: a Trainer checkpoint inside a task, or the last finished task.

A run dir holds two kinds of resume points. The run state (`continual_state.json`, state.py) is written after every
task: the merged weights and the record of the finished tasks. The Trainer's checkpoints (`checkpoint-<step>`, every
`save_steps` optimizer steps, numbered over the whole sequence so that no two collide) hold the adapters, γ and τ, the
optimizer, the LR scheduler and the RNG states in the middle of a task; `TaskSequence` adds `jumplora_state.json`
(what identifies the run, and its listeners' state inside the task). A restart continues from the latest checkpoint
at or after the end of the last finished task, so a kill costs at most `save_steps` steps; without one it starts the
first unfinished task afresh (its adapters and data order depend only on the seed and the task).

The main process decides, from its run dir; every process must hold the chosen checkpoint (shared storage, or
`save_on_each_node=True` on node-local disks), or the restart falls back to the task boundary and says why.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .entries import all_reduce_sum, broadcast_json, is_main_process
from .files import read_json
from .sequence import CHECKPOINT_STATE_FILE
from .state import run_differences

logger = logging.getLogger(__name__)
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME


@dataclass
class ResumePoint:
    """Where training continues: `step` (an optimizer step of the whole sequence) and, when it is inside or at the end
    of a task, the Trainer checkpoint to restore (`checkpoint`, with the listeners' saved `listeners`)."""

    step: int
    checkpoint: str | None = None
    listeners: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the Trainer checkpoints in `output_dir`, latest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found, reverse=True)


def _check_checkpoint(path: str, boundary: int, total: int, run: dict) -> tuple[int, dict] | str:
    """(step, listeners' state) of a usable checkpoint, or why it cannot be used."""
    trainer_state = os.path.join(path, TRAINER_STATE_FILE)
    ours = os.path.join(path, CHECKPOINT_STATE_FILE)
    if not os.path.isfile(trainer_state) or not os.path.isfile(ours):
        return f"{path} is incomplete (no {TRAINER_STATE_FILE} or {CHECKPOINT_STATE_FILE}: the save was interrupted)"
    step = int(read_json(trainer_state)["global_step"])
    saved = read_json(ours)
    if not boundary <= step <= total:
        return (
            f"{path} (step {step}) is not between the last finished task's end (step {boundary}) and the end ({total})"
        )
    if saved.get("total_steps") not in (None, total) and step >= saved["total_steps"]:
        # written at the end of a shorter sequence: its LR schedule state is that sequence's, not this one's
        return f"{path} ends a shorter sequence of {saved['total_steps']} steps (this one has {total})"
    differences = run_differences(saved.get("run"), run)
    if differences:
        return f"{path} was written by a run with other settings: " + "; ".join(differences)
    world = (saved.get("run") or {}).get("world_size")
    if world is not None and world != run.get("world_size"):
        return f"{path} was written by {world} processes, this run has {run.get('world_size')}"
    return step, saved.get("listeners", {})


def _choose(output_dir: str, requested, boundary: int, total: int, run: dict) -> dict:
    """The main process's choice, as JSON: {"step", "checkpoint", "listeners", "notes"} or {"error"}."""
    notes = []
    if requested is False:
        return {"step": boundary, "checkpoint": None, "listeners": {}, "notes": ["checkpoints not used (False)"]}
    if isinstance(requested, str):
        checked = _check_checkpoint(requested, boundary, total, run)
        if isinstance(checked, str):
            return {"error": f"resume_from_checkpoint={requested!r} cannot continue this run: {checked}"}
        return {"step": checked[0], "checkpoint": requested, "listeners": checked[1], "notes": notes}
    for step, path in _checkpoints(output_dir):
        if step < boundary:
            break  # older than the last finished task: the run state is newer
        checked = _check_checkpoint(path, boundary, total, run)
        if isinstance(checked, str):
            notes.append(f"skipped {checked}")
            continue
        return {"step": checked[0], "checkpoint": path, "listeners": checked[1], "notes": notes}
    if requested is True and boundary == 0:
        return {
            "error": f"resume_from_checkpoint=True, but {output_dir} holds no checkpoint or finished task of this run"
        }
    return {"step": boundary, "checkpoint": None, "listeners": {}, "notes": notes}


def find_resume_point(output_dir: str, requested, boundary: int, total: int, run: dict) -> ResumePoint:
    """Where this run continues (every process must call it; they all get the same answer).

    `requested`: None or True (the latest usable checkpoint at or after `boundary`, else `boundary`), False (the
    boundary: the run state only), or a checkpoint's path. `boundary` is the step where the first unfinished task
    starts, `total` the sequence's last step, `run` this run's fingerprint.
    """
    choice = _choose(output_dir, requested, boundary, total, run) if is_main_process() else None
    choice = broadcast_json(choice)
    if "error" in choice:
        raise ValueError(choice["error"])
    point = ResumePoint(choice["step"], choice["checkpoint"], choice["listeners"], choice["notes"])
    if point.checkpoint is not None:
        here = torch.tensor([int(os.path.isfile(os.path.join(point.checkpoint, TRAINER_STATE_FILE)))])
        everywhere = int(all_reduce_sum(here).item()) == (
            torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        )
        if not everywhere:
            point.notes.append(
                f"{point.checkpoint} is not on every node (keep checkpoints on shared storage, or set "
                "save_on_each_node=True, to continue inside a task)"
            )
            point.step, point.checkpoint, point.listeners = boundary, None, {}
    return point

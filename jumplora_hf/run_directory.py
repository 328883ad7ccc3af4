"""`RunDirectory`: the listener that writes the run dir after every task (config, ledger file, resume state, report)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .callback import ContinualCallback
from .entries import is_main_process
from .files import write_json_atomic
from .ledger import TaskLedger
from .state import METRICS_FILE, sha256_file, write_state
from .updates import MergedTaskUpdate


# ----------------------------------------------------------------------------- the run directory
class RunDirectory(ContinualCallback):
    """Writes, after every task (main process), the run's config, the task's ledger file, the resume state and the
    report, and with a per-task Hub strategy hands the model after the task to the publisher (hub.HubPublisher).

    The ledger file is streamed during the merge (each layer's exact update as it is merged) and appears before the
    state that lists it; readers ignore a file the state does not list. A resumed run continues the same ledger: the
    files of finished tasks are listed in the state and never written again.
    """

    def __init__(
        self,
        output_dir: str,
        task_metadata: dict[str, dict] | None = None,
        write_ledger: bool = True,
        ledger: Sequence[dict] = (),
        run_config: dict | None = None,
        publisher=None,
        run: dict | None = None,
    ):
        self.output_dir = output_dir
        self.run = run
        self.task_metadata = task_metadata or {}
        self.write_ledger = write_ledger
        self.ledger_files = list(ledger)
        self.run_config = run_config
        self.publisher = publisher
        self._pending: MergedTaskUpdate | None = None
        self._ledger = None

    def on_task_layer_merged(self, args, state, control, task=None, name=None, layer_update=None, record=None, **kw):
        if not self.write_ledger:
            return
        if self._ledger is None:
            method = record.method if record is not None else getattr(args, "method", "")
            self._ledger = TaskLedger(self.output_dir).writer(task.index, task.name, method)
        self._ledger.add(name, layer_update)

    def on_task_end(self, args, state, control, update=None, **kwargs):
        self._pending = update

    def on_task_evaluated(self, args, state, control, task=None, record=None, model=None, **kwargs):
        if is_main_process():
            if self.run_config is not None:
                write_json_atomic(os.path.join(self.output_dir, "run_config.json"), self.run_config)
            if self._ledger is not None:
                meta = {
                    **self.task_metadata.get(task.name, {}),
                    "steps": task.num_steps,
                    "examples": task.num_examples,
                }
                path = self._ledger.close(self._pending, meta)
                self.ledger_files = [e for e in self.ledger_files if e["index"] != task.index]
                self.ledger_files.append(
                    {"index": task.index, "file": os.path.relpath(path, self.output_dir), "sha256": sha256_file(path)}
                )
        self._ledger = None
        # every process: the layers are gathered to the main one
        write_state(self.output_dir, record, model, self.ledger_files, self.run)
        if is_main_process():
            write_json_atomic(os.path.join(self.output_dir, METRICS_FILE), record.report())
        self._pending = None
        if self.publisher is not None and self.publisher.per_task:
            self.publisher.push_task(task.index, task.name, record.report())  # every process: the model is gathered

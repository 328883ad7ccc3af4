"""Publishing a continual run to the Hugging Face Hub, with the Trainer's own flags (`push_to_hub`, `hub_model_id`,
`hub_token`, `hub_private_repo`, `hub_strategy`).

One push is one commit (`upload_folder`) of a staged folder: the merged model as a plain transformers checkpoint
(safetensors; 16-bit gathered under ZeRO-3) with its tokenizer, the model card (README.md), continual_metrics.json,
the run's plots, and the ledger unless turned off. `hub_strategy="end"` pushes once, when `trainer.push_to_hub()` is
called (as in transformers' example scripts); any other strategy pushes after every task and tags that commit
`after-task-03-agnews`, so `from_pretrained(repo, revision=tag)` gives the model after any task. The pushed tasks are
recorded in the run dir (`hub_pushes.json`): a resumed run never pushes a finished task again. The client is any
object with `HfApi`'s `create_repo` / `upload_folder` / `create_tag` (huggingface_hub's `HfApi` by default); the
network and a write token are only needed for the calls themselves. `recipes/publish.py` publishes a finished run dir.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable

from .card import build_model_card
from .files import read_json, write_json_atomic
from .ledger import LEDGER_DIR, ledger_filename

PUSHES_FILE = "hub_pushes.json"
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "continual_metrics.json"


def task_tag(index: int, name: str) -> str:
    """`after-task-03-agnews` for the third task."""
    return "after-" + ledger_filename(index, name).removesuffix(".safetensors")


class HubPublisher:
    """Stages and pushes a run dir; `save_merged(folder)` writes the merged model (every process must call it)."""

    def __init__(
        self,
        run_dir: str,
        repo_id: str,
        api=None,
        token: str | None = None,
        private: bool | None = None,
        per_task: bool = False,
        push_ledger: bool = True,
        save_merged: Callable[[str], None] | None = None,
        is_main_process: bool = True,
    ):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.run_dir, self.repo_id, self.api = run_dir, repo_id, api
        self.token, self.private, self.per_task, self.push_ledger = token, private, per_task, push_ledger
        self.save_merged, self.is_main_process = save_merged, is_main_process
        self._created = False

    @classmethod
    def from_trainer(cls, trainer) -> HubPublisher:
        args = trainer.args
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy))
        return cls(
            args.output_dir,
            repo_id,
            api=trainer.hub_api,
            token=args.hub_token,
            private=args.hub_private_repo,
            per_task=strategy != "end",
            push_ledger=getattr(args, "hub_push_ledger", True),
            save_merged=trainer.save_merged_model,
            is_main_process=trainer.is_world_process_zero(),
        )

    def create_repo(self) -> str:
        if self.is_main_process and not self._created:
            url = self.api.create_repo(self.repo_id, token=self.token, private=self.private, exist_ok=True)
            self.repo_id = getattr(url, "repo_id", None) or self.repo_id
            self._created = True
        return self.repo_id

    # ----------------------------------------------------------------- what was pushed
    def pushes(self) -> dict:
        path = os.path.join(self.run_dir, PUSHES_FILE)
        return read_json(path) if os.path.exists(path) else {"repo_id": self.repo_id, "tasks": [], "final": None}

    def _record(self, pushes: dict) -> None:
        write_json_atomic(os.path.join(self.run_dir, PUSHES_FILE), pushes)

    # ----------------------------------------------------------------- staging
    def stage(self, folder: str, merged_dir: str | None, report: dict, tags: list[str]) -> str:
        """Assemble the folder of one push: merged model (+ tokenizer), card, metrics, plots, ledger."""
        if merged_dir is not None:
            for name in os.listdir(merged_dir):
                shutil.copy2(os.path.join(merged_dir, name), os.path.join(folder, name))
        write_json_atomic(os.path.join(folder, METRICS_FILE), report)
        plots = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.run_dir, "*.png")))
        for name in plots:
            shutil.copy2(os.path.join(self.run_dir, name), os.path.join(folder, name))
        ledger = os.path.join(self.run_dir, LEDGER_DIR)
        has_ledger = self.push_ledger and os.path.isdir(ledger)
        if has_ledger:
            shutil.copytree(ledger, os.path.join(folder, LEDGER_DIR), dirs_exist_ok=True)
        config_path = os.path.join(self.run_dir, RUN_CONFIG_FILE)
        run_config = read_json(config_path) if os.path.exists(config_path) else {}
        card = build_model_card(
            report, run_config, self.repo_id, plots=plots, has_ledger=has_ledger, tags_by_task=tags
        )
        card.save(os.path.join(folder, "README.md"))
        return folder

    def _push(self, report: dict, message: str, tag: str | None, tags: list[str]) -> str | None:
        """Stage (the merged model saved by every process) and push one commit; returns its id (main process)."""
        with tempfile.TemporaryDirectory(prefix="jumplora_push_") as tmp:
            merged = os.path.join(tmp, "merged")
            if self.save_merged is not None:
                self.save_merged(merged)
            if not self.is_main_process:
                return None
            self.create_repo()
            folder = os.path.join(tmp, "folder")
            os.makedirs(folder)
            self.stage(folder, merged if os.path.isdir(merged) else None, report, tags)
            commit = self.api.upload_folder(
                repo_id=self.repo_id, folder_path=folder, commit_message=message, token=self.token
            )
            oid = getattr(commit, "oid", None)
            if tag is not None:
                self.api.create_tag(self.repo_id, tag=tag, revision=oid, token=self.token, exist_ok=True)
            return oid

    def push_task(self, index: int, name: str, report: dict) -> None:
        """After task `index` (per-task strategy): one commit with the model after it, tagged. Every process calls
        it (the merged model is gathered); a task already recorded as pushed is not pushed again."""
        pushes = self.pushes()
        if any(t["index"] == index for t in pushes["tasks"]):
            return  # the same answer on every process: the file is written before the next task ends
        tag = task_tag(index, name)
        tags = [t["tag"] for t in pushes["tasks"]] + [tag]
        oid = self._push(report, f"after task {index + 1}: {name}", tag, tags)
        if self.is_main_process:
            pushes["tasks"].append({"index": index, "name": name, "tag": tag, "commit": oid})
            self._record(pushes)

    def push_final(self, report: dict, merged_dir: str | None = None) -> str | None:
        """One commit of the finished run (end strategy, or `recipes/publish.py`)."""
        pushes = self.pushes()
        tags = [t["tag"] for t in pushes["tasks"]]
        if merged_dir is not None:
            self.save_merged = lambda folder: shutil.copytree(merged_dir, folder)
        oid = self._push(report, f"continual run: {' → '.join(report['tasks'])}", None, tags)
        if self.is_main_process:
            pushes["final"] = oid
            self._record(pushes)
        return oid

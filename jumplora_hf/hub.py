"""Publishing a continual run to the Hugging Face Hub, with the Trainer's own flags (`push_to_hub`, `hub_model_id`,
`hub_token`, `hub_private_repo`, `hub_strategy`).

One push is one commit (`upload_folder`) of a staged folder: the merged model as a plain transformers checkpoint
(safetensors; 16-bit gathered under ZeRO-3) with its tokenizer, the model card (README.md), continual_metrics.json,
the run's plots, and the ledger unless turned off. `hub_strategy="end"` pushes once, when `trainer.push_to_hub()` is
called (as in transformers' example scripts); any other strategy pushes after every task and tags that commit
`after-task-03-agnews`, so `from_pretrained(repo, revision=tag)` gives the model after any task.

Uploads never hold up training. After a task every process helps stage its push (the merged model is gathered) into
`<run_dir>/hub_pending/<tag>/`; the main process then uploads it from a worker thread while the next task trains,
pushes one at a time in task order, and records each finished push in `hub_pushes.json` before deleting its staged
folder. A push that fails stays staged, and the pushes after it wait (the branch's history stays in task order): the
end of the run reports them, and a restart of the run (or `recipes/publish.py RUN_DIR --retry_pending`) uploads them,
skipping any whose tag the Hub already has (an upload that finished before the crash). The end of the run waits for
the uploads in short rounds that every process joins, so no process waits in a collective longer than a round.
The client is any object with `HfApi`'s `create_repo` / `upload_folder` / `create_tag` / `list_repo_refs`
(huggingface_hub's `HfApi` by default); network and a write token are only needed for the calls themselves.
`recipes/publish.py` publishes a finished run dir.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from .card import build_model_card
from .entries import broadcast_json
from .files import read_json, write_json_atomic
from .ledger import LEDGER_DIR, TaskLedger, ledger_filename

logger = logging.getLogger(__name__)

PUSHES_FILE = "hub_pushes.json"
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "continual_metrics.json"
PENDING_DIR = "hub_pending"
PUSH_FILE = "push.json"  # in a staged folder: what to push; written last, so a folder without it is incomplete
WAIT_ROUND_S = 10.0


def task_tag(index: int, name: str) -> str:
    """`after-task-03-agnews` for the third task."""
    return "after-" + ledger_filename(index, name).removesuffix(".safetensors")


class HubPublisher:
    """Stages and pushes a run dir; `save_merged(folder)` writes the merged model (every process must call it).

    Only the main process (`is_main_process`) reads or writes the run dir and talks to the Hub; every process must
    call `push_task`, `push_final`, `retry_pending` and `wait`, which take part in collectives."""

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
        self._worker: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._blocked = False  # a push failed: the later ones wait, staged, for a retry
        self.failures: list[str] = []

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

    def pending(self) -> list[dict]:
        """The staged pushes not uploaded yet, in task order (the final push last)."""
        staged = []
        for path in glob.glob(os.path.join(self.run_dir, PENDING_DIR, "*", PUSH_FILE)):
            try:
                staged.append({**read_json(path), "folder": os.path.join(os.path.dirname(path), "folder")})
            except FileNotFoundError:
                pass  # uploaded and removed by the worker meanwhile
        return sorted(staged, key=lambda p: (p["index"] is None, p["index"] or 0))

    def _hub_tags(self) -> set[str]:
        """The repo's tags on the Hub (empty when it cannot tell: no repo yet, offline, a client without refs)."""
        try:
            refs = self.api.list_repo_refs(self.repo_id, token=self.token)
        except Exception:  # the Hub's answer only saves an upload; without it the push is simply made again
            return set()
        return {getattr(tag, "name", str(tag)) for tag in getattr(refs, "tags", [])}

    # ----------------------------------------------------------------- staging
    def stage(self, folder: str, merged_dir: str | None, report: dict, tags: list[str], move: bool = False) -> str:
        """Assemble the folder of one push: merged model (+ tokenizer), card, metrics, plots, committed ledger."""
        if merged_dir is not None:
            for name in os.listdir(merged_dir):
                (shutil.move if move else shutil.copy2)(os.path.join(merged_dir, name), os.path.join(folder, name))
        write_json_atomic(os.path.join(folder, METRICS_FILE), report)
        plots = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.run_dir, "*.png")))
        for name in plots:
            shutil.copy2(os.path.join(self.run_dir, name), os.path.join(folder, name))
        has_ledger = self.push_ledger and os.path.isdir(os.path.join(self.run_dir, LEDGER_DIR))
        if has_ledger:
            os.makedirs(os.path.join(folder, LEDGER_DIR), exist_ok=True)
            for entry in TaskLedger(self.run_dir).entries():  # the committed tasks only
                shutil.copy2(entry.path, os.path.join(folder, LEDGER_DIR, os.path.basename(entry.path)))
        config_path = os.path.join(self.run_dir, RUN_CONFIG_FILE)
        run_config = read_json(config_path) if os.path.exists(config_path) else {}
        card = build_model_card(
            report, run_config, self.repo_id, plots=plots, has_ledger=has_ledger, tags_by_task=tags
        )
        card.save(os.path.join(folder, "README.md"))
        return folder

    def _stage_pending(self, key: str, push: dict, report: dict, tags: list[str]) -> None:
        """Every process: gather the merged model into `hub_pending/<key>/`; the main process stages the rest."""
        root = os.path.join(self.run_dir, PENDING_DIR, key)
        merged = os.path.join(root, "merged")
        if self.is_main_process:
            shutil.rmtree(root, ignore_errors=True)  # an incomplete staging of an earlier try
            os.makedirs(root)
        if self.save_merged is not None:
            self.save_merged(merged)
        if not self.is_main_process:
            return
        folder = os.path.join(root, "folder")
        os.makedirs(folder)
        self.stage(folder, merged if os.path.isdir(merged) else None, report, tags, move=True)
        shutil.rmtree(merged, ignore_errors=True)
        write_json_atomic(os.path.join(root, PUSH_FILE), push)

    # ----------------------------------------------------------------- uploading
    def _submit(self, push: dict) -> None:
        """Queue the upload of a staged push on the worker thread (main process)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jumplora-hub")
        self._futures.append(self._worker.submit(self._upload, push))

    def _upload(self, push: dict) -> str | None:
        if self._blocked:
            return None  # an earlier push failed: this one stays staged, after it
        try:
            tag = push.get("tag")
            if tag is not None and tag in self._hub_tags():
                oid = None  # uploaded before a crash: the Hub has it
            else:
                self.create_repo()
                commit = self.api.upload_folder(
                    repo_id=self.repo_id, folder_path=push["folder"], commit_message=push["message"], token=self.token
                )
                oid = getattr(commit, "oid", None)
                if tag is not None:
                    self.api.create_tag(self.repo_id, tag=tag, revision=oid, token=self.token, exist_ok=True)
            pushes = self.pushes()
            if push["index"] is None:
                pushes["final"] = oid
            else:
                pushes["tasks"] = [t for t in pushes["tasks"] if t["index"] != push["index"]]
                pushes["tasks"].append({"index": push["index"], "name": push["name"], "tag": tag, "commit": oid})
            self._record(pushes)
            shutil.rmtree(os.path.dirname(push["folder"]), ignore_errors=True)
            pending = os.path.join(self.run_dir, PENDING_DIR)
            if os.path.isdir(pending) and not os.listdir(pending):
                os.rmdir(pending)
            return oid
        except Exception as error:
            self._blocked = True
            what = f"task {push['index'] + 1} ({push['name']})" if push["index"] is not None else "the final push"
            self.failures.append(f"{what}: {type(error).__name__}: {error}")
            raise

    def push_task(self, index: int, name: str, report: dict) -> None:
        """After task `index` (per-task strategy): stage the model after it and queue its upload (tagged). Every
        process calls it; it returns once the push is staged, without waiting for the upload."""
        decision = None
        if self.is_main_process:
            pushes = self.pushes()
            done = any(t["index"] == index for t in pushes["tasks"])
            tags = [t["tag"] for t in pushes["tasks"]] + [p["tag"] for p in self.pending() if p["tag"]]
            decision = {"push": not done, "tags": tags + [task_tag(index, name)]}
        decision = broadcast_json(decision)
        if not decision["push"]:
            return
        tag = task_tag(index, name)
        push = {"index": index, "name": name, "tag": tag, "message": f"after task {index + 1}: {name}"}
        self._stage_pending(tag, push, report, decision["tags"])
        if self.is_main_process:
            self._submit({**push, "folder": os.path.join(self.run_dir, PENDING_DIR, tag, "folder")})

    def retry_pending(self, finished: int | None = None) -> int:
        """Queue the staged pushes a stopped run left (main process; the others return 0). With `finished`, only
        the per-task pushes of the first `finished` tasks. Returns how many were queued."""
        if not self.is_main_process:
            return 0
        queued = 0
        for push in self.pending():
            if finished is None or (push["index"] is not None and push["index"] < finished):
                self._submit(push)
                queued += 1
        if queued:
            logger.warning("re-uploading %d Hub push(es) a stopped run left in %s", queued, PENDING_DIR)
        return queued

    def wait(self) -> list[str]:
        """Wait for the queued uploads; every process calls it and they meet every `WAIT_ROUND_S` seconds, so no
        process waits in one collective for long. Returns the failures (each is also logged, with what to do)."""
        while True:
            done = None
            if self.is_main_process:
                done = not wait(self._futures, timeout=WAIT_ROUND_S).not_done
            if broadcast_json(done):
                break
        self._futures = []
        if self.failures:
            logger.error(
                "Hub uploads failed: %s. They stay staged in %s: run the same command again, or `python "
                "recipes/publish.py %s --retry_pending`, to upload them in order",
                "; ".join(self.failures),
                os.path.join(self.run_dir, PENDING_DIR),
                self.run_dir,
            )
        return list(self.failures)

    def push_final(self, report: dict, merged_dir: str | None = None) -> str | None:
        """One commit of the finished run (end strategy, or `recipes/publish.py`); waits for it. Returns its id."""
        tags = None
        if self.is_main_process:
            tags = [t["tag"] for t in self.pushes()["tasks"]]
        tags = broadcast_json(tags)
        if merged_dir is not None:
            self.save_merged = lambda folder: shutil.copytree(merged_dir, folder)
        push = {"index": None, "name": None, "tag": None, "message": f"continual run: {' → '.join(report['tasks'])}"}
        self._stage_pending("final", push, report, tags)
        if self.is_main_process:
            self._submit({**push, "folder": os.path.join(self.run_dir, PENDING_DIR, "final", "folder")})
        failures = self.wait()
        if failures:
            raise RuntimeError(f"the push to {self.repo_id} failed: {failures[-1]}")
        return self.pushes()["final"] if self.is_main_process else None

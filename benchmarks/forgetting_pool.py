"""The forgetting experiment's runs, several at a time on one GPU (or CPU), until done or a deadline.

`benchmarks/forgetting.py work` trains one run at a time with one thread. On a GPU machine this pool keeps `--jobs`
runs going at once, each its own `recipes/sc.py` process. The runs and their commands come from the
`benchmarks/forgetting.py` of the code tree that trains them, so each run executes the code its plan says:

- the protocol's runs (`plan()` of `--protocol_tree`, a copy of the protocol commit),
- the dev study of part 2 and the test runs of the variants that dev favours (this checkout, which has the options),
- last, a replica of every protocol run already finished in `--done_root` (the CPU runs), under `replica/`, to
  measure how much the machine alone moves a result.

A run that is finished (its report in its run dir, or in `--done_root`) is skipped; a run waiting for others (the
ELLA runs for the λ grid, the variants for the dev study) starts when they have finished. A run that fails is
logged and left; the others go on. At `--deadline` seconds the unfinished runs are stopped (their finished tasks
stay on disk, but a run is only used whole). Each run dir gets `run_info.json` with the commit and the machine.

    python benchmarks/forgetting_pool.py --protocol_tree ../exp --protocol_commit cb24254 --jobs 12 --device cuda \\
        --model models/SmolLM2-135M-Instruct --data_dir ../shared/cl_benchmark --deadline 420
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the runs inherit it: idle OpenMP threads sleep, not spin

import argparse
import dataclasses
import importlib.util
import json
import shlex
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_plans(tree: str, name: str):
    """The `benchmarks/forgetting.py` module of the code tree `tree`."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(tree, "benchmarks", "forgetting.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class Job:
    module: object  # the forgetting.py that plans and commands this run
    run: object  # its Run
    commit: str

    @property
    def root(self) -> str:
        return self.module.ROOT

    @property
    def run_dir(self) -> str:
        return os.path.join(self.root, self.run.output_dir)


def adapt_command(argv: list[str], device: str, model: str | None, data_dir: str | None) -> list[str]:
    """The plan's command for this machine: `--use_cpu true` off on a GPU, the model and data where they are here."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        if flag == "--use_cpu" and device != "cpu":
            i += 2
            continue
        if flag == "--model_name_or_path" and model:
            out += [flag, model]
            i += 2
            continue
        if flag == "--data_dir" and data_dir:
            out += [flag, data_dir]
            i += 2
            continue
        out.append(flag)
        i += 1
    if device == "cpu" and "--use_cpu" not in out:
        out += ["--use_cpu", "true"]
    return out


def record_start(job: Job, argv: list[str], machine: str) -> None:
    path = os.path.join(job.run_dir, "run_info.json")
    info = {"starts": []}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    info["starts"].append(
        {"commit": job.commit, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine, "command": argv[1:]}
    )
    os.makedirs(job.run_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)


def record_end(job: Job, seconds: float, returncode: int) -> None:
    path = os.path.join(job.run_dir, "run_info.json")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    info["starts"][-1].update(seconds=round(seconds, 1), returncode=returncode)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)


class Pool:
    def __init__(self, args):
        self.args = args
        self.protocol = load_plans(args.protocol_tree, "protocol_forgetting")
        self.head = load_plans(HERE, "head_forgetting")
        # the dev study's grid-λ arm reads the λ grid, which the protocol's tree trains
        os.environ["GRID_ROOT"] = self.protocol.ROOT
        self.running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
        self.durations: list[float] = []  # seconds of each run finished here
        self.done: dict[str, str] = {}  # run name -> "finished" | "failed (exit N)" | "stopped at the deadline"
        self.start = time.monotonic()

    def queue(self) -> list[Job | None]:
        """Every job in priority order; None stands for the variants while the dev study runs."""
        done_root = self.args.done_root
        jobs, replicas = [], []
        for run in self.protocol.plan():
            if done_root and self.head.is_finished(run, done_root):
                replica = dataclasses.replace(run, name=f"replica/{run.name}")
                replicas.append(Job(self.protocol, replica, self.args.protocol_commit))
            else:
                jobs.append(Job(self.protocol, run, self.args.protocol_commit))
        if self.args.skip_dev:
            return jobs + replicas
        jobs += [Job(self.head, run, self.args.head_commit) for run in self.head.plan("dev")]
        variants = self.head.variant_plan()
        jobs += [None] if variants is None else [Job(self.head, run, self.args.head_commit) for run in variants]
        return jobs + replicas

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.0f} s] {message}", flush=True)

    def env(self, job: Job) -> dict:
        path = os.environ.get("PYTHONPATH")
        return {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": job.root + (os.pathsep + path if path else ""),
        }

    def launch(self, job: Job, argv: list[str]) -> None:
        argv = adapt_command(argv, self.args.device, self.args.model, self.args.data_dir) + self.args.extra
        record_start(job, argv, self.args.machine)
        log = open(os.path.join(job.run_dir, "train.log"), "a", encoding="utf-8")
        process = subprocess.Popen(argv, cwd=job.root, env=self.env(job), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.running[job.run.name] = (job, process, time.monotonic())
        self.log(f"start {job.run.name} ({len(self.running)} running)")

    def reap(self) -> None:
        for name, (job, process, started) in list(self.running.items()):
            if process.poll() is None:
                continue
            del self.running[name]
            seconds = time.monotonic() - started
            record_end(job, seconds, process.returncode)
            finished = process.returncode == 0 and job.module.is_finished(job.run)
            self.done[name] = "finished" if finished else f"failed (exit {process.returncode})"
            if finished:
                self.durations.append(seconds)
            self.log(f"{self.done[name]}: {name} in {seconds:.0f} s")

    def fill(self) -> bool:
        """Starts what can start now; False when nothing runs (so nothing that waits can become ready)."""
        # a run starts only if it can finish by the deadline, judged by the runs finished so far
        expected = statistics.median(self.durations) if self.durations else 0.0
        late = bool(self.args.deadline) and self.elapsed() + max(self.args.last_start, expected) > self.args.deadline
        for job in self.queue():
            if late or len(self.running) >= self.args.jobs:
                break
            if job is None or job.run.name in self.running or job.run.name in self.done:
                continue
            if job.module.is_finished(job.run):
                continue
            argv = job.module.command(job.run)
            if argv is not None:
                self.launch(job, argv)
        return bool(self.running)

    def stop_all(self) -> None:
        for name, (job, process, started) in self.running.items():
            process.send_signal(signal.SIGTERM)
        for name, (job, process, started) in self.running.items():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            record_end(job, time.monotonic() - started, process.returncode)
            self.done[name] = "stopped at the deadline"
            self.log(f"stopped at the deadline: {name}")
        self.running.clear()

    def serve(self) -> dict[str, str]:
        while True:
            self.reap()
            if self.args.deadline and self.elapsed() > self.args.deadline:
                self.stop_all()
                break
            if not self.fill():
                break
            time.sleep(1)
        left = [job for job in self.queue() if job is None or job.run.name not in self.done]
        left = [job for job in left if job is None or not job.module.is_finished(job.run)]
        finished = sum(state == "finished" for state in self.done.values())
        self.log(f"{finished} finished here, {len(left)} not run (waiting, failed before, or no time)")
        return self.done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol_tree", required=True, help="a copy of the code at the protocol commit")
    parser.add_argument("--protocol_commit", required=True, help="that commit (recorded in each run's run_info.json)")
    parser.add_argument("--head_commit", default=None, help="this checkout's commit (default: git rev-parse HEAD)")
    parser.add_argument(
        "--done_root",
        default=None,
        help="a folder of runs finished elsewhere (like runs/forgetting): skipped, then replicated",
    )
    parser.add_argument("--skip_dev", action="store_true", help="only the protocol's runs (and the replicas)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--machine", default=None, help="what trained the runs, for run_info.json")
    parser.add_argument("--model", default=None, help="the converted model's folder (default: the plan's)")
    parser.add_argument("--data_dir", default=None, help="the cl_benchmark folder (default: the plan's)")
    parser.add_argument(
        "--extra",
        type=shlex.split,
        default=[],
        help="flags added to every run (a rehearsal: '--max_train_examples 8')",
    )
    parser.add_argument("--deadline", type=float, default=0, help="seconds; 0: none")
    parser.add_argument(
        "--last_start", type=float, default=0, help="no run starts later than this before the deadline"
    )
    args = parser.parse_args(argv)
    for flag in ("protocol_tree", "done_root", "model", "data_dir"):
        value = getattr(args, flag)
        if value is not None:
            if not os.path.exists(value):
                parser.error(f"--{flag} {value}: no such folder")
            setattr(args, flag, os.path.abspath(value))
    if args.head_commit is None:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True)
        args.head_commit = done.stdout.strip() or "unknown"
    args.machine = args.machine or args.device
    done = Pool(args).serve()
    failed = [name for name, state in done.items() if state.startswith("failed")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

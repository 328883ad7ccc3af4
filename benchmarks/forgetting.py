"""The pre-registered forgetting experiment of docs/RESULTS.md: its runs, a resumable worker, and their status.

Every run is `recipes/sc.py` with the protocol's flags. A worker takes the first run that is neither finished nor
held by another worker (a lock file), trains it with one thread, and starts over, until nothing is left that it
can run. Runs resume from their last finished task, so a worker can be stopped at any time. Each run dir gets
`run_info.json` with the commit of the code that trained it (one entry per start).

    python benchmarks/forgetting.py list                     # the runs, in priority order, with their state
    nohup python benchmarks/forgetting.py work > runs/forgetting/worker1.log 2>&1 &
    nohup nice -n 19 python benchmarks/forgetting.py work > runs/forgetting/worker2.log 2>&1 &   # a second, low priority
    python benchmarks/forgetting.py work --plan dev          # the dev study of τ's learning rate and auto-λ
    python benchmarks/forgetting.py work --plan variants     # then the test runs of what dev favours (if any)
    python benchmarks/forgetting.py work --plan comparison   # issue 25: O-LoRA, OSF, and the Long Sequence pair
    python benchmarks/forgetting.py work --plan comparison --prefix test/order4   # a worker for the Long Sequence runs

The dev plan's "grid λ" arm reads the λ grid's runs from GRID_ROOT/runs/forgetting (default: this checkout's).

Needs the converted model (make demo writes models/SmolLM2-135M-Instruct) and ../shared/cl_benchmark.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join("runs", "forgetting")
SEEDS_MAIN = (42, 43, 44, 45, 46)
SEEDS_3 = (42, 43, 44)
LAMBDA_GRID = ("3e4", "3e5", "3e6")
# The protocol's fixed settings (docs/RESULTS.md, "Protocol").
COMMON = [
    "--model_name_or_path",
    "models/SmolLM2-135M-Instruct",
    "--data_dir",
    os.path.join("..", "shared", "cl_benchmark"),
    "--max_train_examples",
    "256",
    "--max_eval_examples",
    "128",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
    "--max_source_length",
    "128",
    "--jumplora_target_modules",
    "q_proj",
    "v_proj",
    "--jumplora_r",
    "8",
    "--jumplora_alpha",
    "32",
    "--learning_rate",
    "3e-3",
    "--lr_scheduler_type",
    "constant",
    "--jumplora_s_start",
    "0.2",
    "--jumplora_s_final",
    "0.8",
    "--use_cpu",
    "true",
    "--logging_steps",
    "2",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--save_merged",
    "false",
]


@dataclass
class Run:
    name: str  # also its folder under runs/forgetting
    order: str
    method: str
    seed: int
    split: str = "test"
    flags: list[str] = field(default_factory=list)
    ella_lambda: str | None = None  # "best": the λ chosen on dev by the grid runs
    single_task: bool = False

    @property
    def output_dir(self) -> str:
        return os.path.join(RUNS, self.name)

    def n_tasks(self) -> int:
        return 15 if self.order in LONG_SEQUENCE_ORDERS else 4  # Long Sequence: orders 4-6; Standard CL: 1-3


LONG_SEQUENCE_ORDERS = ("order4", "order5", "order6")
TAU_LR_MULTIPLIERS = ("1", "10", "100")
SEEDS_DEV = (42, 43)


def dev_plan() -> list[Run]:
    """The dev study (part 2 of the protocol): τ's learning-rate multiplier, auto-λ against the grid's λ."""
    runs = []
    for multiplier in TAU_LR_MULTIPLIERS:
        for seed in SEEDS_DEV:
            runs.append(
                Run(
                    f"dev_taulr{multiplier}/order1/jumplora_inclora/seed{seed}",
                    "order1",
                    "jumplora_inclora",
                    seed,
                    split="dev",
                    flags=["--tau_lr_multiplier", multiplier],
                )
            )
    for arm, lam in (("auto", "auto"), ("gridlambda", "best")):
        for seed in SEEDS_DEV:
            for method in ("ella", "jumplora_ella"):
                runs.append(
                    Run(f"dev_{arm}/order1/{method}/seed{seed}", "order1", method, seed, split="dev", ella_lambda=lam)
                )
    return runs


# The protocol's rule for part 2: a variant is favoured on dev if its mean dev OA over SEEDS_DEV is at least this
# many points above the default's and its mean dev BWT is not lower.
FAVOURED_OA_MARGIN = 2.0
# Each option's arms on dev: (the default's runs, {variant label: the variant's runs}), per method.
VARIANT_ARMS = {
    ("taulr", "jumplora_inclora"): ("dev_taulr1", {"10": "dev_taulr10", "100": "dev_taulr100"}),
    ("auto", "ella"): ("dev_gridlambda", {"auto": "dev_auto"}),
    ("auto", "jumplora_ella"): ("dev_gridlambda", {"auto": "dev_auto"}),
}


def _dev_means(prefix: str, method: str, runs_dir: str | None = None) -> tuple[float, float] | None:
    """Mean dev OA and BWT (in %) of one dev arm over SEEDS_DEV; None until all of its runs have finished."""
    runs = [Run(f"{prefix}/order1/{method}/seed{seed}", "order1", method, seed, split="dev") for seed in SEEDS_DEV]
    if not all(is_finished(r, runs_dir) for r in runs):
        return None
    reports = [_report(r, runs_dir) for r in runs]
    oa = sum(r["overall_accuracy"] for r in reports) / len(reports)
    bwt = sum(r["backward_transfer"] for r in reports) / len(reports)
    return 100 * oa, 100 * bwt


def favoured_variants(runs_dir: str | None = None) -> list[tuple[str, str, str]] | None:
    """(option, method, variant) of every variant the dev study favours; None until the dev study has finished."""
    favoured = []
    for (option, method), (default_prefix, variants) in VARIANT_ARMS.items():
        default = _dev_means(default_prefix, method, runs_dir)
        if default is None:
            return None
        for variant, prefix in variants.items():
            means = _dev_means(prefix, method, runs_dir)
            if means is None:
                return None
            if means[0] >= default[0] + FAVOURED_OA_MARGIN and means[1] >= default[1]:
                favoured.append((option, method, variant))
    return favoured


def variant_plan(runs_dir: str | None = None) -> list[Run] | None:
    """The test runs of the variants favoured on dev (labelled `variant_*`); None while the dev study runs."""
    favoured = favoured_variants(runs_dir)
    if favoured is None:
        return None
    runs = []
    for option, method, variant in favoured:
        if option == "taulr":
            for seed in SEEDS_MAIN:
                runs.append(
                    Run(
                        f"variant_taulr{variant}/order1/{method}/seed{seed}",
                        "order1",
                        method,
                        seed,
                        flags=["--tau_lr_multiplier", variant],
                    )
                )
        else:
            for seed in SEEDS_3:
                runs.append(
                    Run(f"variant_auto/order1/{method}/seed{seed}", "order1", method, seed, ella_lambda="auto")
                )
    return runs


# The comparison of issue 25 (docs/RESULTS.md, "Against O-LoRA and PEFT's OSF"): the methods' own grids, on dev.
OLORA_LAMBDA1_GRID = ("0.05", "0.5", "5")
OLORA_LAMBDA1_DEFAULT = "0.5"  # O-LoRA's scripts/order_1.sh (with λ2 = 0)
COMPARISON_ELLA_LAMBDA = "3e6"  # the forgetting experiment's dev-grid choice, kept
OSF_GRID = [(lr, fraction) for lr in ("1e-5", "1e-4") for fraction in ("0.5", "0.9")]


def comparison_plan() -> list[Run]:
    """The comparison's runs, in the order a worker takes them."""
    runs = [Run("repro/order1/jumplora_inclora/seed42", "order1", "jumplora_inclora", 42)]
    for lam in OLORA_LAMBDA1_GRID:
        runs.append(
            Run(
                f"dev_olora_lambda{lam}/order1/olora/seed42",
                "order1",
                "olora",
                42,
                split="dev",
                flags=["--olora_lambda1", lam, "--olora_lambda2", "0"],
            )
        )
    for lr, fraction in OSF_GRID:
        runs.append(
            Run(
                f"dev_osf_lr{lr}_f{fraction}/order1/osf/seed42",
                "order1",
                "osf",
                42,
                split="dev",
                flags=["--learning_rate", lr, "--osf_max_preserved_fraction", fraction],
            )
        )
    # the reproduction check failed (docs/RESULTS.md, amendment 2): the finished Standard CL runs are trained again
    for seed in SEEDS_MAIN:
        for method in ("olora", "jumplora_olora", "osf"):
            runs.append(Run(f"test/order1/{method}/seed{seed}", "order1", method, seed, flags=["<best>"]))
        for method in ("inclora", "jumplora_inclora"):
            runs.append(Run(f"test/order1/{method}/seed{seed}", "order1", method, seed))
        if seed in SEEDS_3:
            for method in ("ella", "jumplora_ella"):
                runs.append(
                    Run(f"test/order1/{method}/seed{seed}", "order1", method, seed, ella_lambda=COMPARISON_ELLA_LAMBDA)
                )
    for seed in SEEDS_3:
        runs.append(Run(f"test/order1/single_task/seed{seed}", "order1", "inclora", seed, single_task=True))
    # amendment 4: the Long Sequence runs evaluate each task after it and all 15 after the last (29 evaluations, not 120)
    for seed in SEEDS_3:
        for method in ("inclora", "jumplora_inclora"):
            runs.append(
                Run(f"test/order4/{method}/seed{seed}", "order4", method, seed, flags=["--eval_seen_tasks", "at_end"])
            )
    return runs


def _best_dev_flags(method: str) -> list[str] | None:
    """The flags of the dev grid's best run for `method` (by dev OA, ties as the protocol says); None until the
    grid has finished."""
    runs = [r for r in comparison_plan() if r.split == "dev" and r.method == ("osf" if method == "osf" else "olora")]
    if not all(is_finished(r) for r in runs):
        return None
    if method == "osf":  # ties: the smaller lr, then the smaller fraction
        key = lambda r: (_report(r)["overall_accuracy"], -float(r.flags[1]), -float(r.flags[3]))  # noqa: E731
    else:  # ties: O-LoRA's value, then the smaller λ1
        key = lambda r: (  # noqa: E731
            _report(r)["overall_accuracy"],
            r.flags[1] == OLORA_LAMBDA1_DEFAULT,
            -float(r.flags[1]),
        )
    return max(runs, key=key).flags


def plan(name: str = "main") -> list[Run]:
    """All runs, in the order a worker takes them (the main comparison first, paired by seed)."""
    if name == "dev":
        return dev_plan()
    if name == "variants":
        return variant_plan() or []
    if name == "comparison":
        return comparison_plan()
    runs = []
    for seed in SEEDS_MAIN:
        for method in ("inclora", "jumplora_inclora"):
            runs.append(Run(f"test/order1/{method}/seed{seed}", "order1", method, seed))
    for lam in LAMBDA_GRID:
        runs.append(Run(f"dev_lambda{lam}/order1/ella/seed42", "order1", "ella", 42, split="dev", ella_lambda=lam))
    for seed in SEEDS_3:
        runs.append(Run(f"test/order1/single_task/seed{seed}", "order1", "inclora", seed, single_task=True))
    for seed in SEEDS_3:
        for method in ("inclora", "jumplora_inclora"):
            runs.append(Run(f"test/order2/{method}/seed{seed}", "order2", method, seed))
    for seed in SEEDS_3:
        for method in ("ella", "jumplora_ella"):
            runs.append(Run(f"test/order1/{method}/seed{seed}", "order1", method, seed, ella_lambda="best"))
    return runs


def _report(run: Run, runs_dir: str | None = None) -> dict | None:
    """The run's report, read from `runs_dir` (a folder of run names like runs/forgetting; default: this tree's)."""
    path = os.path.join(runs_dir or os.path.join(ROOT, RUNS), run.name, "continual_metrics.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_finished(run: Run, runs_dir: str | None = None) -> bool:
    report = _report(run, runs_dir)
    if report is None:
        return False
    if run.single_task:
        return len(report.get("single_task_accuracies") or []) == run.n_tasks()
    last = report["accuracy_matrix"][-1] if report["accuracy_matrix"] else []
    return len(report["tasks"]) == run.n_tasks() and all(v is not None for v in last)


def best_lambda() -> str | None:
    """The grid's λ with the best dev OA (ties: the smaller λ); None until every grid run has finished."""
    grid_runs = os.path.join(os.environ.get("GRID_ROOT", ROOT), RUNS)
    grid = [r for r in plan() if r.name.startswith("dev_lambda")]
    if not all(is_finished(r, grid_runs) for r in grid):
        return None
    scores = {r.ella_lambda: _report(r, grid_runs)["overall_accuracy"] for r in grid}
    return max(LAMBDA_GRID, key=lambda lam: (scores[lam], -float(lam)))


def command(run: Run) -> list[str] | None:
    """The recipe's command line for `run`; None while it waits (for a dev grid, or for its method to exist)."""
    from jumplora_hf.methods import METHODS

    if run.method not in METHODS:
        return None
    extra = run.flags
    if extra == ["<best>"]:
        extra = _best_dev_flags(run.method)
        if extra is None:
            return None
    flags = [*COMMON, "--order", run.order, "--eval_split", run.split, "--seed", str(run.seed), "--method", run.method]
    flags += ["--output_dir", run.output_dir, *extra]
    if run.single_task:
        flags += ["--single_task_baselines", "true"]
    else:
        flags += ["--single_task_dir", "none"]  # FWT is computed afterwards, from the a0 runs
    if run.method.endswith("ella"):
        lam = best_lambda() if run.ella_lambda == "best" else run.ella_lambda
        if lam is None:
            return None
        if lam == "auto":
            flags += ["--ella_lambda", "auto"]
        else:
            flags += ["--ella_lambda", "0", *([lam] * (run.n_tasks() - 1))]  # no W_past during the first task
    return [sys.executable, os.path.join("recipes", "sc.py"), *flags]


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# Machines of one kind (same CPU name, same kernels) have given runs that part in the 7th digit of the loss after a
# few steps and end several OA points apart (docs/RESULTS.md, amendment 2 and "Results so far"). The hash of one
# forward and backward pass at the runs' shapes, computed as the runs compute (their environment), tells whether two
# machines compute alike.
NUMERICS_PROBE = """
import hashlib, torch
torch.manual_seed(0)
x = torch.randn(8, 128, 576, requires_grad=True)
w_q, w_v, w_up = torch.randn(576, 576) / 24, torch.randn(192, 576) / 24, torch.randn(1536, 576) / 24
for w in (w_q, w_v, w_up):
    w.requires_grad_(True)
q, v = x @ w_q.T, x @ w_v.T
attention = torch.softmax(q[..., :192] @ q[..., 192:384].transpose(1, 2) / 8, dim=-1)
loss = (torch.nn.functional.silu(torch.nn.functional.rms_norm(x, (576,)) @ w_up.T).sum() + (attention @ v).square().sum())
loss.backward()
digest = hashlib.sha256()
for t in (loss.detach(), x.grad, w_q.grad, w_v.grad, w_up.grad):
    digest.update(t.detach().numpy().tobytes())
print(digest.hexdigest()[:16])
"""


def numerics_fingerprint(env: dict[str, str]) -> str:
    """The probe's hash on this machine with the runs' environment (threads, kernels)."""
    done = subprocess.run([sys.executable, "-c", NUMERICS_PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _record_start(run: Run, argv: list[str], numerics: str | None = None) -> None:
    path = os.path.join(ROOT, run.output_dir, "run_info.json")
    info = {"starts": []}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    start = {"commit": _commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": argv[1:]}
    if numerics is not None:
        start["numerics"] = numerics
    info["starts"].append(start)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)


def _try_lock(run: Run):
    os.makedirs(os.path.join(ROOT, run.output_dir), exist_ok=True)
    handle = open(os.path.join(ROOT, run.output_dir, ".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def native_cpu_kernels() -> dict[str, str]:
    """The machine's own CPU kernels for the runs (a value set by the user is kept; MKL then keeps its default path):
    the experiments' runs so far used them, before the recipes pinned AVX2 kernels on x86-64 (recipes/demo.py says
    why); a run of a comparison must compute as the others did (docs/RESULTS.md, amendment 3)."""
    import torch

    return {
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", torch.backends.cpu.get_cpu_capability().lower())
    }


def work(plan_name: str = "main", prefix: str = "") -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": ROOT,
        **native_cpu_kernels(),
    }
    numerics = numerics_fingerprint(env)
    print(f"[{time.strftime('%H:%M:%S')}] this machine's numerics fingerprint: {numerics}", flush=True)
    while True:
        waiting = False
        for run in plan(plan_name):
            if is_finished(run) or not run.name.startswith(prefix):
                continue
            argv = command(run)
            if argv is None:
                waiting = True
                continue
            lock = _try_lock(run)
            if lock is None:
                continue
            try:
                if is_finished(run):
                    continue
                _record_start(run, argv, numerics)
                print(f"[{time.strftime('%H:%M:%S')}] start {run.name}", flush=True)
                with open(os.path.join(ROOT, run.output_dir, "train.log"), "a", encoding="utf-8") as log:
                    done = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                print(f"[{time.strftime('%H:%M:%S')}] {run.name}: exit {done.returncode}", flush=True)
                if done.returncode != 0:
                    raise SystemExit(f"{run.name} failed; see {run.output_dir}/train.log")
            finally:
                lock.close()
            break  # start over from the top: a higher-priority run may have become free
        else:
            if not waiting:
                print("nothing left to run", flush=True)
                return
            time.sleep(60)


def list_runs(plan_name: str = "main") -> None:
    for run in plan(plan_name):
        state = "finished" if is_finished(run) else ("started" if _report(run) else "-")
        lam = f" λ={best_lambda() or 'after the grid'}" if run.ella_lambda == "best" else ""
        print(f"{state:9} {run.name}{lam}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["list", "work"])
    parser.add_argument("--plan", choices=["main", "dev", "variants", "comparison"], default="main")
    parser.add_argument("--prefix", default="", help="work: only the runs whose name starts with it (test/order4)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    work(args.plan, args.prefix) if args.action == "work" else list_runs(args.plan)


if __name__ == "__main__":
    main()

"""Real multi-process runs on CPU, launched through the shipped accelerate_configs/ files (2 processes over gloo:
DDP, DeepSpeed ZeRO-2, ZeRO-3 and the multi-node ZeRO-3 file on one node), against one process launched through
single_gpu.yaml. The CPU overrides each needs: `--num_processes` (1 or 2), `--mixed_precision no` (the
comparison is in float32; bf16 is tests/test_precision.py's), and for the multi-node file one machine on
127.0.0.1. The runs use `use_cpu=True` and gloo (tests/distributed_run.py).

Selected with `-m distributed`; they run in CI as part of the whole suite. DeepSpeed JIT-builds a CPU
communication op once; TORCH_EXTENSIONS_DIR keeps that build for the whole test session.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import T5ForConditionalGeneration

RUNNER = os.path.join(os.path.dirname(__file__), "distributed_run.py")
ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIGS = os.path.join(ROOT, "accelerate_configs")
pytestmark = pytest.mark.distributed
BACKENDS = {
    "ddp": "multi_gpu.yaml",
    "zero2": "zero2.yaml",
    "zero3": "zero3.yaml",
    "zero3_multi_node": "multi_node_zero3.yaml",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config_file: str, processes: int, precision: str = "no", port: int | None = None) -> list[str]:
    """`accelerate launch --config_file accelerate_configs/<file>` with the overrides a CPU machine needs."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(CONFIGS, config_file),
        "--num_processes",
        str(processes),
        "--mixed_precision",
        precision,
    ]
    if config_file == "multi_node_zero3.yaml" and port is None:
        command += ["--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1"]
    return command + ["--main_process_port", str(port or _free_port())]


@pytest.fixture(scope="session")
def extensions_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_extensions")


def _run(out_dir, method, extensions_dir, backend=None, optim="sgd", extra=(), precision="no"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    launcher = (
        launch_command(BACKENDS[backend], 2, precision) if backend else launch_command("single_gpu.yaml", 1, precision)
    )
    command = [*launcher, RUNNER, str(out_dir), "--method", method, "--optim", optim, *extra]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out_dir / "result.json").read_text())
    result["weights"] = load_file(out_dir / "weights.safetensors")
    return result


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, extensions_dir):
    cache = {}

    def run(method):
        if method not in cache:
            cache[method] = _run(tmp_path_factory.mktemp(f"single_{method}"), method, extensions_dir)
        return cache[method]

    return run


# every backend with both methods, except the multi-node file, checked with one (zero3 covers inclora)
TWO_PROCESS_CASES = [
    (backend, method)
    for backend in sorted(BACKENDS)
    for method in ("inclora", "jumplora_ella")
    if not (backend == "zero3_multi_node" and method == "inclora")
] + [("ddp", "olora"), ("zero3", "jumplora_olora"), ("ddp", "osf"), ("zero2", "osf"), ("zero3", "osf")]


@pytest.mark.parametrize(("backend", "method"), TWO_PROCESS_CASES)
def test_two_processes_match_one_process(tmp_path, single_process, extensions_dir, backend, method):
    single = single_process(method)
    multi = _run(tmp_path, method, extensions_dir, backend)
    assert (single["world_size"], multi["world_size"]) == (1, 2)
    # SGD on equal-length examples: both runs see the same global batches and normalisation, so the merged
    # weights agree to float32 rounding (measured: DDP and ZeRO-2 ~2e-7, ZeRO-3 ~3e-6, from its partitioned
    # reductions); a rank-local threshold, a merge applied twice, a write lost to ZeRO's fp32 master copy or
    # unsynchronised gradients would move them by the size of an update (1e-2 and more)
    for name, weight in single["weights"].items():
        assert torch.allclose(multi["weights"][name], weight, atol=1e-5), name
    assert multi["report"]["accuracy_matrix"] == single["report"]["accuracy_matrix"]
    sparsity = [t["sparsity"]["mean"] for t in multi["report"]["per_task"]]
    single_sparsity = [t["sparsity"]["mean"] for t in single["report"]["per_task"]]
    if method.startswith("jumplora"):  # the gate's zeros are decisions: a rank-local τ would change them
        assert sparsity == single_sparsity and all(s > 0.2 for s in sparsity)
    else:  # a dense update's rare exact zeros are float32 rounding (osf: measured 8e-5 on one rank, 0 on the other)
        assert all(s < 0.01 for s in sparsity + single_sparsity)
    assert (
        multi["task_start_max_abs_b"] == single["task_start_max_abs_b"] == [0.0, 0.0, 0.0]
    )  # every task starts at ΔW = 0
    assert multi["task_start_optimizer_states"] == [0, 0, 0]
    if method.startswith("jumplora"):  # log τ in its own parameter group of the DDP / ZeRO optimizer
        assert len(multi["group_lrs"]) >= 2 and len(single["group_lrs"]) >= 2  # ZeRO drops the empty group

    # the final merged model is a plain transformers checkpoint (16-bit gathered under ZeRO-3)
    merged = T5ForConditionalGeneration.from_pretrained(tmp_path / "merged").state_dict()
    for name, weight in single["weights"].items():
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.allclose(merged[key].float(), weight, atol=1e-5), key
    # the ledger written by rank 0 rebuilds the 2-process merged weights exactly, so the 1-process ones within 1e-5
    assert sorted(os.listdir(tmp_path / "ledger")) == [
        "task-01-task0.safetensors",
        "task-02-task1.safetensors",
        "task-03-task2.safetensors",
    ]
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import tiny_t5

    from jumplora_hf.ledger import TaskLedger

    rebuilt = dict(TaskLedger(str(tmp_path)).compose(tiny_t5(tie_word_embeddings=False)).named_parameters())
    for name, weight in multi["weights"].items():
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.equal(rebuilt[key], weight) and torch.allclose(
            rebuilt[key], single["weights"][name], atol=1e-5
        ), key


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_adam_state_restarts_at_every_task_and_tau_gets_its_learning_rate(tmp_path, extensions_dir, backend):
    # Adam amplifies float-rounding differences, so the backends are not compared weight by weight here (measured:
    # 1.5e-2 apart after 12 steps); what matters is that every task starts with an empty optimizer state, that
    # the Adam step counts at the end are those of the last task alone, not of the whole sequence, and that log τ
    # trains at learning_rate × tau_lr_multiplier inside the DDP / ZeRO optimizer
    result = _run(
        tmp_path, "jumplora_ella", extensions_dir, backend, optim="adamw_torch", extra=["--tau_lr_multiplier", "10"]
    )
    assert result["task_start_optimizer_states"] == [0, 0, 0]
    assert result["optimizer_step_counts"] and max(result["optimizer_step_counts"]) == result["last_task_steps"] == 4
    assert result["task_start_max_abs_b"] == [0.0, 0.0, 0.0]
    assert result["group_lrs"][-1] == pytest.approx(10 * result["learning_rate"])
    assert all(lr == pytest.approx(result["learning_rate"]) for lr in result["group_lrs"][:-1])


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_bf16_engine_keeps_the_count_at_s_start_and_rounds_the_merges_once(tmp_path, extensions_dir, backend):
    # DeepSpeed's bf16 engine casts every parameter and floating buffer to bf16 (on CPU too): the base weights, A, B
    # and the learnable part of log τ. The anchor of log τ is kept as integer bits and the merges accumulate in float32
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import tiny_t5

    from jumplora_hf.ledger import TaskLedger

    result = _run(tmp_path, "jumplora_inclora", extensions_dir, backend, precision="bf16")
    counts = result["survivors_at_s_start"]
    assert len(counts) == 3 * 4 and all(survivors == budget for survivors, budget in counts)  # per_block: 4 groups
    base = tiny_t5(tie_word_embeddings=False).to(torch.bfloat16)  # the engine's cast of the same initial model
    rebuilt = dict(TaskLedger(str(tmp_path)).compose(base).named_parameters())
    for name, weight in result["weights"].items():
        assert weight.dtype == torch.bfloat16
        # the float32 merge of the three tasks' updates, rounded once: nothing beyond that single rounding
        assert torch.equal(weight, rebuilt[name.removeprefix("base_model.model.") + ".weight"]), name


def test_the_prepared_gpu_check_runs_on_cpu(extensions_dir):
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", script, "--device", "cpu", "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "jump_fused/lora: time" in out and "0 failed check(s)" in out
    for label in ("fp32, CPU (reference)", "accelerate bf16", "DeepSpeed ZeRO-2 bf16", "DeepSpeed ZeRO-3 bf16"):
        assert f"| {label} |" in out and "| yes | yes |" in out.split(f"| {label} |")[1].splitlines()[0]


# ----------------------------------------------------------------------------- several machines, no shared disk
def two_machine_command(config_file: str, machine_rank: int, port: int, precision: str) -> list[str]:
    """One of two "machines" on localhost: one process each, as on two nodes of one GPU each."""
    command = launch_command(config_file, 2, precision, port=port)
    return command + ["--num_machines", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]


def _two_machines(prefix, config_file, precision, extensions_dir, runner_args, pause=None):
    """Run both machines, each with its own output dir (`<prefix>-node0`, `-node1`: node-local disks). With `pause`
    (task, step), stop both machines there and kill -9 every process of the job (launchers and workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    port = _free_port()
    marks = f"{prefix}-pause"
    os.makedirs(marks, exist_ok=True)
    launchers = []
    for rank in (0, 1):
        command = [*two_machine_command(config_file, rank, port, precision), RUNNER, f"{prefix}-node{rank}"]
        command += runner_args + (["--pause", f"{pause[0]},{pause[1]},{marks}"] if pause else [])
        log = open(f"{prefix}-node{rank}.log", "w")
        launchers.append(
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    if pause is None:
        codes = [p.wait(timeout=900) for p in launchers]
        assert codes == [0, 0], open(f"{prefix}-node0.log").read()[-3000:] + open(f"{prefix}-node1.log").read()[-3000:]
        return
    deadline = time.monotonic() + 600
    paused = [os.path.join(marks, f"paused-rank{r}") for r in (0, 1)]
    while not all(os.path.exists(p) and open(p).read() for p in paused):
        assert time.monotonic() < deadline and all(p.poll() is None for p in launchers), "the run did not pause"
        time.sleep(0.5)
    workers = [json.loads(open(p).read())["pid"] for p in paused]  # the workers run in sessions of their own
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    for launcher in launchers:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=60)


TWO_MACHINE_CASES = {
    # backend: (config file, precision, runner arguments)
    "ddp": ("multi_gpu.yaml", "no", []),
    "zero2": ("zero2.yaml", "no", []),
    # built partitioned (zero.Init), bf16: the float32 merge copies are sharded too
    "zero3": ("zero3.yaml", "bf16", ["--from_pretrained", "{model}"]),
    "zero3_multi_node": ("multi_node_zero3.yaml", "no", []),
}


@pytest.fixture(scope="session")
def saved_tiny_t5(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import tiny_t5

    folder = tmp_path_factory.mktemp("tiny_t5")
    tiny_t5(tie_word_embeddings=False).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("backend", sorted(TWO_MACHINE_CASES))
def test_two_machines_without_a_shared_disk_restart_bit_identically(tmp_path, extensions_dir, saved_tiny_t5, backend):
    # Two "machines" on localhost, each writing to its own output dir; 3 tasks of 20 Adam steps. The job is killed
    # (every process, kill -9) at step 5 of task 2 and launched again: the main machine's run dir alone must bring
    # both machines back to the end of task 1, and the result must equal the uninterrupted run's bit for bit
    config_file, precision, extra = TWO_MACHINE_CASES[backend]
    runner_args = [
        "--method",
        "jumplora_ella",
        "--optim",
        "adamw_torch",
        "--steps_per_task",
        "20",
        *[a.format(model=saved_tiny_t5) for a in extra],
    ]
    _two_machines(str(tmp_path / "full"), config_file, precision, extensions_dir, runner_args)
    _two_machines(str(tmp_path / "part"), config_file, precision, extensions_dir, runner_args, pause=(1, 5))
    state = json.loads((tmp_path / "part-node0" / "continual_state.json").read_text())
    assert state["tasks"] == ["task0"]  # killed inside task 2, after task 1 was committed
    assert not (tmp_path / "part-node1").exists() or "continual_state.json" not in os.listdir(tmp_path / "part-node1")
    _two_machines(str(tmp_path / "part"), config_file, precision, extensions_dir, runner_args)

    full = json.loads((tmp_path / "full-node0" / "result.json").read_text())
    resumed = json.loads((tmp_path / "part-node0" / "result.json").read_text())
    assert full["world_size"] == resumed["world_size"] == 2  # one job over both machines, not two single ones
    assert resumed["report"]["accuracy_matrix"] == full["report"]["accuracy_matrix"]
    assert [t["sparsity"] for t in resumed["report"]["per_task"]] == [
        t["sparsity"] for t in full["report"]["per_task"]
    ]
    weights = load_file(tmp_path / "full-node0" / "weights.safetensors")
    for name, weight in load_file(tmp_path / "part-node0" / "weights.safetensors").items():
        assert torch.equal(weight, weights[name]), name
    if "--from_pretrained" in runner_args:
        assert resumed["built_partitioned"]  # from_pretrained under ZeRO-3 built the model partitioned
        assert all(survivors == budget for survivors, budget in resumed["survivors_at_s_start"])
        # the ledger: base + every task's exact update, rounded once to bf16, is the trained model
        base = T5ForConditionalGeneration.from_pretrained(saved_tiny_t5).to(torch.bfloat16)
        from jumplora_hf.ledger import TaskLedger

        rebuilt = dict(TaskLedger(str(tmp_path / "part-node0")).compose(base).named_parameters())
        merged = T5ForConditionalGeneration.from_pretrained(tmp_path / "part-node0" / "merged").state_dict()
        for name, weight in weights.items():
            key = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(rebuilt[key], weight) and torch.equal(merged[key], weight), key


def test_the_state_each_process_holds_falls_as_one_over_the_processes(tmp_path):
    # benchmarks/entry_memory.py --measure: 1, 2 and 4 gloo processes under ZeRO-3 bf16 on a tiny T5 whose weights
    # do not split evenly in 4; each process counts the bytes of the float32 merge copies, W_past and supports it holds
    out = tmp_path / "memory.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "benchmarks", "entry_memory.py")
    done = subprocess.run(
        [sys.executable, script, "--measure_only", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    measured = json.loads(out.read_text())["measured"]
    single = next(r for r in measured if r["processes"] == 1)
    for processes in (2, 4):
        ranks = [r for r in measured if r["processes"] == processes]
        assert len(ranks) == processes
        total = sum(r["state_bytes"] for r in ranks)
        assert single["state_bytes"] <= total <= single["state_bytes"] + 4 * 4 * 8 * processes  # + padding only
        for r in ranks:
            assert r["state_bytes"] <= single["state_bytes"] / processes + 4 * 4 * 8  # 8 layers × ≤ 3 padded entries
            assert r["support_bytes"] <= single["support_bytes"] / processes + 2 * 8 * 2  # packing rounds up a byte


# ----------------------------------------------------------------------------- preemption: kill -9 at every point
FAULT_ARGS = ["--method", "jumplora_ella", "--optim", "adamw_torch", "--steps_per_task", "10", "--save_steps", "4"]
FAULT_POINTS = ["checkpoint:12", "step:7", "merge", "state", "evaluation"]  # of task 2 (optimizer steps 10-19)
FAULT_CASES = [("single", p) for p in FAULT_POINTS] + [("zero3", p) for p in FAULT_POINTS]
FAULT_CASES += [("ddp", "step:7"), ("zero2", "step:7")]
# method osf ("<backend>+osf"): its frozen SVD tensors are recomputed on a restart inside a task
FAULT_CASES += [("zero3+osf", "step:7"), ("zero3+osf", "merge"), ("ddp+osf", "step:7")]


def _fault_command(backend: str) -> list[str]:
    backend = backend.split("+")[0]
    if backend == "single":
        return [sys.executable]
    return launch_command(BACKENDS[backend], 2)


def _fault_run(out, backend, extensions_dir, pause=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    command = [*_fault_command(backend), RUNNER, str(out), *FAULT_ARGS]
    if backend.endswith("+osf"):
        command += ["--method", "osf"]  # the last --method wins
    if pause is None:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads((out / "result.json").read_text())
    marks = f"{out}-pause"
    job = subprocess.Popen(
        [*command, "--pause", f"1,{pause},{marks}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not os.path.exists(os.path.join(marks, "paused-rank0")):
        assert time.monotonic() < deadline and job.poll() is None, f"the run did not reach {pause}"
        time.sleep(0.2)
    paused = json.loads(open(os.path.join(marks, "paused-rank0")).read())
    for name in os.listdir(marks):  # every worker (own sessions under accelerate), then the launcher
        if name.startswith("pid-rank"):
            try:
                os.kill(int(open(os.path.join(marks, name)).read()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    return paused


@pytest.fixture(scope="module")
def fault_references(tmp_path_factory, extensions_dir):
    cache = {}

    def reference(backend):
        if backend not in cache:
            out = tmp_path_factory.mktemp(f"uninterrupted_{backend}")
            cache[backend] = _fault_run(out, backend, extensions_dir)
            cache[backend]["weights"] = load_file(out / "weights.safetensors")
        return cache[backend]

    return reference


@pytest.mark.parametrize(("backend", "point"), FAULT_CASES)
def test_a_kill_anywhere_costs_at_most_one_checkpoint_and_the_result_is_unchanged(
    tmp_path, extensions_dir, fault_references, backend, point
):
    # 3 tasks of 10 Adam steps, a Trainer checkpoint every 4 steps (numbered over the sequence: 4, 8, 12, ...); the
    # job is killed (kill -9, every process) at `point` of task 2, then launched again with the same command
    reference = fault_references(backend)
    out = tmp_path / "run"
    paused = _fault_run(out, backend, extensions_dir, pause=point)
    state = json.loads((out / "continual_state.json").read_text())
    assert state["tasks"] == ["task0"]  # task 2 was not committed
    if point == "state":  # its ledger file was written, the state that would list it was not
        from jumplora_hf.ledger import TaskLedger

        assert (out / "ledger" / "task-02-task1.safetensors").exists()
        with pytest.warns(UserWarning, match="task-02-task1.safetensors.*ignored"):
            assert [e.name for e in TaskLedger(str(out)).entries()] == ["task0"]
    resumed = _fault_run(out, backend, extensions_dir)
    redone = paused["step"] - resumed["first_step"]
    assert 0 <= redone <= 4  # at most save_steps steps are trained again
    assert resumed["report"]["accuracy_matrix"] == reference["report"]["accuracy_matrix"]
    weights = load_file(out / "weights.safetensors")
    for name, weight in reference["weights"].items():
        assert torch.equal(weights[name], weight), name
    assert [e["index"] for e in json.loads((out / "continual_state.json").read_text())["ledger"]] == [0, 1, 2]
    table = os.environ.get("JUMPLORA_FAULT_TABLE")
    if table:
        with open(table, "a") as f:
            f.write(
                json.dumps({"backend": backend, "point": point, "killed_at": paused["step"], "redone": redone}) + "\n"
            )

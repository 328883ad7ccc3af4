"""The forgetting experiment's tooling: the pre-registered dev rule (benchmarks/forgetting.py) and the parallel pool
(benchmarks/forgetting_pool.py) over a fake plan whose runs are tiny Python commands."""

import json
import os
import subprocess
import sys
import textwrap

from tiny import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    return load_script(f"benchmarks/{name}.py")


forgetting = _load("forgetting")
pool = _load("forgetting_pool")


def _write_report(runs_dir, name, oa, bwt):
    os.makedirs(os.path.join(runs_dir, name), exist_ok=True)
    report = {
        "tasks": ["a", "b", "c", "d"],
        "accuracy_matrix": [[0.5, None, None, None]] * 3 + [[0.5, 0.5, 0.5, 0.5]],
        "overall_accuracy": oa / 100,
        "backward_transfer": bwt / 100,
    }
    with open(os.path.join(runs_dir, name, "continual_metrics.json"), "w") as f:
        json.dump(report, f)


def _dev_study(runs_dir, arms):
    for prefix, method, oa, bwt in arms:
        for seed in forgetting.SEEDS_DEV:
            _write_report(runs_dir, f"{prefix}/order1/{method}/seed{seed}", oa, bwt)


BASE_ARMS = [
    ("dev_taulr1", "jumplora_inclora", 50.0, -20.0),
    ("dev_gridlambda", "ella", 50.0, -20.0),
    ("dev_gridlambda", "jumplora_ella", 50.0, -20.0),
]


def test_a_variant_is_favoured_only_by_two_oa_points_without_losing_bwt(tmp_path):
    runs = str(tmp_path)
    _dev_study(runs, BASE_ARMS)
    assert forgetting.favoured_variants(runs) is None  # the variants have not run
    _dev_study(
        runs,
        [
            ("dev_taulr10", "jumplora_inclora", 52.0, -20.0),  # +2 OA, same BWT: favoured
            ("dev_taulr100", "jumplora_inclora", 55.0, -20.5),  # more OA but lower BWT: not favoured
            ("dev_auto", "ella", 51.9, -10.0),  # < 2 points: not favoured
            ("dev_auto", "jumplora_ella", 60.0, -19.0),  # favoured
        ],
    )
    assert forgetting.favoured_variants(runs) == [
        ("taulr", "jumplora_inclora", "10"),
        ("auto", "jumplora_ella", "auto"),
    ]
    plan = forgetting.variant_plan(runs)
    taulr = [r for r in plan if r.name.startswith("variant_taulr10/")]
    assert [r.seed for r in taulr] == list(forgetting.SEEDS_MAIN)
    assert all(r.split == "test" and r.flags == ["--tau_lr_multiplier", "10"] for r in taulr)
    auto = [r for r in plan if r.name.startswith("variant_auto/")]
    assert [(r.method, r.seed, r.ella_lambda) for r in auto] == [
        ("jumplora_ella", s, "auto") for s in forgetting.SEEDS_3
    ]
    assert "--ella_lambda" in forgetting.command(auto[0]) and "auto" in forgetting.command(auto[0])


def test_an_unfinished_dev_run_keeps_the_variants_waiting(tmp_path):
    runs = str(tmp_path)
    _dev_study(
        runs, BASE_ARMS + [("dev_taulr10", "jumplora_inclora", 70, 0), ("dev_taulr100", "jumplora_inclora", 70, 0)]
    )
    _write_report(runs, "dev_auto/order1/ella/seed42", 70, 0)  # seed 43 of this arm is missing
    _dev_study(runs, [("dev_auto", "jumplora_ella", 70, 0)])
    assert forgetting.favoured_variants(runs) is None and forgetting.variant_plan(runs) is None


def test_commands_are_adapted_to_the_machine():
    argv = [
        "py",
        "sc.py",
        "--model_name_or_path",
        "models/m",
        "--use_cpu",
        "true",
        "--data_dir",
        "../d",
        "--seed",
        "1",
    ]
    gpu = pool.adapt_command(argv, "cuda", "/abs/model", "/abs/data")
    assert gpu == ["py", "sc.py", "--model_name_or_path", "/abs/model", "--data_dir", "/abs/data", "--seed", "1"]
    cpu = pool.adapt_command(["py", "sc.py", "--seed", "1"], "cpu", None, None)
    assert cpu == ["py", "sc.py", "--seed", "1", "--use_cpu", "true"]


# A plan module shaped like benchmarks/forgetting.py: "b" waits for "a"; "fail" exits 3; "slow" sleeps.
FAKE_PLAN = """
import json, os, sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join("runs", "forgetting")

@dataclass
class Run:
    name: str
    single_task: bool = False
    flags: list = field(default_factory=list)

    @property
    def output_dir(self):
        return os.path.join(RUNS, self.name)

    def n_tasks(self):
        return 4

def plan(name="main"):
    return [Run("test/a"), Run("test/b"), Run("test/fail"), Run("test/done_elsewhere"), Run("test/slow")]

def is_finished(run, runs_dir=None):
    return os.path.exists(os.path.join(runs_dir or os.path.join(ROOT, RUNS), run.name, "continual_metrics.json"))

def command(run):
    if run.name == "test/b" and not is_finished(Run("test/a")):
        return None
    code = {"test/fail": "raise SystemExit(3)", "test/slow": "import time; time.sleep(60)"}.get(run.name, "")
    code += (
        "\\nimport json, os, sys; d = sys.argv[sys.argv.index('--output_dir') + 1]; os.makedirs(d, exist_ok=True)"
        "\\njson.dump({'argv': sys.argv[1:]}, open(os.path.join(d, 'continual_metrics.json'), 'w'))"
    )
    return [sys.executable, "-c", code, "--use_cpu", "true", "--output_dir", run.output_dir]
"""


def test_the_pool_respects_waits_goes_on_after_a_failure_replicates_and_stops_at_the_deadline(tmp_path):
    tree = tmp_path / "protocol"
    (tree / "benchmarks").mkdir(parents=True)
    (tree / "benchmarks" / "forgetting.py").write_text(textwrap.dedent(FAKE_PLAN))
    done_root = tmp_path / "done"
    _write_report(str(done_root), "test/done_elsewhere", 50, -10)
    argv = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "forgetting_pool.py"),
        "--protocol_tree",
        str(tree),
        "--protocol_commit",
        "abc123",
        "--head_commit",
        "def456",
        "--done_root",
        str(done_root),
        "--skip_dev",
        "--jobs",
        "2",
        "--device",
        "cuda",
        "--machine",
        "test GPU",
        "--deadline",
        "8",
        "--extra",
        "--seed 7",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # one run failed
    log = done.stdout
    assert "failed (exit 3): test/fail" in log
    assert "stopped at the deadline: test/slow" in log
    runs = tree / "runs" / "forgetting"
    # b started only after a had finished
    assert log.index("finished: test/a") < log.index("start test/b")
    for name in ("test/a", "test/b", "replica/test/done_elsewhere"):
        report = json.loads((runs / name / "continual_metrics.json").read_text())
        assert "--use_cpu" not in report["argv"] and report["argv"][-2:] == ["--seed", "7"]
        info = json.loads((runs / name / "run_info.json").read_text())["starts"][-1]
        assert (info["commit"], info["machine"], info["returncode"]) == ("abc123", "test GPU", 0)
    assert not (runs / "test" / "done_elsewhere").exists()  # finished elsewhere: only its replica runs here
    assert json.loads((runs / "test" / "fail" / "run_info.json").read_text())["starts"][-1]["returncode"] == 3


def test_the_pool_refuses_a_missing_tree(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "forgetting_pool.py"),
            "--protocol_tree",
            str(tmp_path / "x"),
        ]
        + ["--protocol_commit", "abc"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "no such folder" in done.stderr


def test_the_device_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_forgetting.sh")], check=True)


report_tool = _load("forgetting_report")


def _full_report(runs_dir, name, diagonal, last_row, machine=None, sparsity=0.0):
    """A finished 4-task run: accuracy a[i][i] = diagonal[i], the last row given, earlier rows copy the diagonal."""
    matrix = [[diagonal[j] if j <= i else None for j in range(4)] for i in range(3)] + [list(last_row)]
    per_task = [
        {"sparsity": {"mean": sparsity}, "jaccard_with_previous": {"mean": 0.1 if i else None}, "ella_lambda": None}
        for i in range(4)
    ]
    folder = os.path.join(runs_dir, name)
    os.makedirs(folder, exist_ok=True)
    report = {"method": name.split("/")[-2], "tasks": ["a", "b", "c", "d"], "accuracy_matrix": matrix}
    report.update(per_task=per_task, single_task_baselines=False)
    with open(os.path.join(folder, "continual_metrics.json"), "w") as f:
        json.dump(report, f)
    if machine:
        with open(os.path.join(folder, "run_info.json"), "w") as f:
            json.dump({"starts": [{"commit": "x", "machine": machine}]}, f)
    with open(os.path.join(folder, "log_history.jsonl"), "w") as f:
        for task in range(4):
            for step in (2, 4):
                f.write(
                    json.dumps(
                        {
                            "loss": 1,
                            "step": 4 * task + step,
                            "task": task,
                            "task_step": step,
                            "jump/tau_mean": 1e-3,
                            "jump/sparsity": 0.9,
                        }
                    )
                    + "\n"
                )


def test_the_report_pairs_by_seed_gives_the_t_interval_and_compares_machines(tmp_path):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    diag = [0.9, 0.5, 0.6, 0.8]
    forgetting_per_seed = {42: (0.2, 0.3), 43: (0.4, 0.45), 44: (0.3, 0.4)}  # task a after all: IncLoRA, JumpLoRA
    for seed, (plain, jump) in forgetting_per_seed.items():
        _full_report(runs, f"test/order1/inclora/seed{seed}", diag, [plain, 0.5, 0.6, 0.8])
        _full_report(runs, f"test/order1/jumplora_inclora/seed{seed}", diag, [jump, 0.5, 0.6, 0.8], sparsity=0.75)
    # seed 42 of IncLoRA again on the other machine: task a after all 0.2 → 0.5 moves OA by 0.3/4, BWT by 0.3/3
    _full_report(runs, "replica/test/order1/inclora/seed42", diag, [0.5, 0.5, 0.6, 0.8], machine="one NVIDIA H200")
    for seed in forgetting_per_seed:  # a variant chosen on dev, on test: compared with its default and its base
        _full_report(runs, f"variant_taulr10/order1/jumplora_inclora/seed{seed}", diag, [0.9, 0.5, 0.6, 0.8])
    report_tool.main(["--root", runs, "--out", out])
    text = open(os.path.join(out, "report.md")).read()
    variants = text[text.index("### Variants chosen on dev") :]
    assert "| order1 | JumpLoRA + IncLoRA (τ lr ×10) − JumpLoRA + IncLoRA | 42, 43, 44 |" in variants
    assert "| order1 | JumpLoRA + IncLoRA (τ lr ×10) − IncLoRA | 42, 43, 44 |" in variants
    # ΔBWT per seed = (jump - plain) / 3 on task a: +3.3, +1.7, +3.3 points; mean 2.78, sd 0.96, t(2) = 4.303
    row = next(line for line in text.splitlines() if "JumpLoRA + IncLoRA − IncLoRA" in line)
    assert "+2.8 [+0.4, +5.2]" in row and "42:+ 43:+ 44:+" in row
    assert "| order1 | IncLoRA | 42 | 52.5 | 60.0 | -23.3 | -13.3 | +7.5 | +10.0 |" in text  # CPU vs GPU
    assert "the GPU runs alone" in text and "the CPU runs alone" not in text
    # published: every run's reports under out/runs, the replica in its own folder
    assert os.path.exists(os.path.join(out, "runs", "replica", "test", "order1", "inclora", "seed42", "run_info.json"))
    assert os.path.exists(os.path.join(out, "tau_and_density_order1.png"))


comparison_tool = _load("comparison_report")


def _ls_report(runs_dir, name, first_task_after_all):
    """A finished 15-task run evaluated as the protocol's amendment 4 says (each task after it, all after the last):
    every task 0.8 when trained, all kept but the first."""
    n = 15
    matrix = [[0.8 if j == i or (i == n - 1 and j < i) else None for j in range(n)] for i in range(n)]
    matrix[-1][0] = first_task_after_all
    per_task = [{"sparsity": {"mean": 0.0}, "jaccard_with_previous": {"mean": 1.0 if i else None}} for i in range(n)]
    os.makedirs(os.path.join(runs_dir, name), exist_ok=True)
    report = {"tasks": [f"t{i}" for i in range(n)], "accuracy_matrix": matrix, "per_task": per_task}
    with open(os.path.join(runs_dir, name, "continual_metrics.json"), "w") as f:
        json.dump(report, f)


def test_the_comparison_report_has_every_method_the_protocol_pairs_and_the_long_sequence(tmp_path):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    diag = [0.9, 0.5, 0.6, 0.8]
    for seed, (olora, jump) in {42: (0.2, 0.3), 43: (0.4, 0.45), 44: (0.3, 0.4)}.items():
        _full_report(runs, f"test/order1/olora/seed{seed}", diag, [olora, 0.5, 0.6, 0.8])
        _full_report(runs, f"test/order1/jumplora_olora/seed{seed}", diag, [jump, 0.5, 0.6, 0.8], sparsity=0.75)
        _ls_report(runs, f"test/order4/inclora/seed{seed}", 0.2)
        _ls_report(runs, f"test/order4/jumplora_inclora/seed{seed}", 0.8 - 0.1 * (seed - 42))
    # a run with a task not yet evaluated is left out and listed
    _full_report(runs, "test/order1/osf/seed42", diag, [0.3, 0.5, 0.6, None])
    for seed in (42, 43):  # the a0 runs of FWT, for two of the three seeds: each task 10 points below the diagonal
        os.makedirs(os.path.join(runs, f"test/order1/single_task/seed{seed}"))
        a0 = {
            "tasks": ["a", "b", "c", "d"],
            "single_task_baselines": True,
            "single_task_accuracies": [0.8, 0.4, 0.5, 0.7],
        }
        with open(os.path.join(runs, f"test/order1/single_task/seed{seed}/continual_metrics.json"), "w") as f:
            json.dump(a0, f)
    # where a run came from: restarted once on another machine, and one from before fingerprints were recorded
    starts = [
        {"commit": "a" * 40, "time": "2026-12-06 06:20:11", "numerics": "6b952b65f754148e"},
        {"commit": "b" * 40, "time": "2026-12-06 09:01:00", "numerics": "b89a64009b81b91d"},
    ]
    with open(os.path.join(runs, "test/order1/olora/seed43/run_info.json"), "w") as f:
        json.dump({"starts": starts}, f)
    with open(os.path.join(runs, "test/order1/olora/seed42/run_info.json"), "w") as f:
        json.dump({"starts": [{"commit": "c" * 40, "time": "2026-12-05 18:33:19"}]}, f)
    cost = tmp_path / "cost.json"
    row = dict(method="inclora", trainable=460800, step_s=3.0, step_ratio=1.0, switch_s=0.2, peak_bytes=2**30)
    run = dict(device="cpu", threads=1)
    options = dict(model=None, batch=8, seq_len=128, steps=6, rounds=2)
    cost.write_text(json.dumps({"options": options, "methods": [dict(row, runs=[run])]}))
    comparison_tool.main(["--root", runs, "--out", out, "--cost", str(cost)])
    text = open(os.path.join(out, "report.md")).read()
    for method in ("IncLoRA", "ELLA", "O-LoRA", "OSF (PEFT)", "JumpLoRA + ELLA", "JumpLoRA + O-LoRA"):
        assert f"| {method} |" in text
    # ΔBWT per seed = (jump − olora) / 3 on task a: +3.3, +1.7, +3.3 points; t(2) = 4.303
    pair = next(line for line in text.splitlines() if "| JumpLoRA + O-LoRA − O-LoRA |" in line)
    assert "+2.8 [+0.4, +5.2]" in pair and "42:+ 43:+ 44:+" in pair
    assert "| OSF (PEFT) − IncLoRA | – |" in text and "- `test/order1/osf/seed42`" in text
    olora_row = next(line for line in text.splitlines() if line.startswith("| O-LoRA | 42, 43, 44 |"))
    assert "| 10.0 ± 0.0 (n=2) |" in olora_row  # FWT where the seed has its a0 run
    assert "| 43 | 80.0 40.0 50.0 70.0 | – | – | – |" in text[text.index("the single-task runs (a0") :]
    # Long Sequence, per seed: ΔOA = (0.6 − 0.1·k) / 15 (4.0, 3.3, 2.7 points), ΔBWT = (0.6 − 0.1·k) / 14
    long_sequence = text[text.index("## Long Sequence") :]
    ls_pair = next(line for line in long_sequence.splitlines() if "JumpLoRA + IncLoRA − IncLoRA" in line)
    assert "| 42, 43, 44 | +3.3 [+1.7, +5.0] | +3.6 [+1.8, +5.3] |" in ls_pair
    assert "| IncLoRA | 460,800 | 3.00 | 1.00 | 0.20 | 1024 |" in text
    runs_section = text[text.index("## The runs") :]
    # O-LoRA seed 43: task a after all 0.4 → OA (0.4+0.5+0.6+0.8)/4, BWT (0.4−0.9)/3
    assert (
        "| O-LoRA | 43 | 57.5 | -16.7 | aaaaaaa, bbbbbbb | 6b952b65f754148e, b89a64009b81b91d | 2026-12-06 06:20 |"
        in runs_section
    )
    assert "| O-LoRA | 42 | 52.5 | -23.3 | ccccccc | not recorded | 2026-12-05 18:33 |" in runs_section
    assert "| JumpLoRA + O-LoRA | 44 | 57.5 | -16.7 | – | – | – |" in runs_section
    assert runs_section.count("| JumpLoRA + IncLoRA | 4") == 3  # the Long Sequence runs, one row per seed


def test_the_committed_comparison_report_is_what_the_kept_run_reports_give(tmp_path):
    """docs/results/comparison/report.md is regenerated from the reports copied into the repo, nothing else."""
    kept = os.path.join(ROOT, "docs", "results", "comparison")
    cost = os.path.join(kept, "method_cost.json")
    comparison_tool.main(["--root", os.path.join(kept, "runs"), "--cost", cost, "--out", str(tmp_path)])
    with open(os.path.join(kept, "report.md"), encoding="utf-8") as committed:
        assert (tmp_path / "report.md").read_text(encoding="utf-8") == committed.read()


def test_the_comparison_report_refuses_a_missing_root(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        comparison_tool.main(["--root", str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_method_cost_counts_each_methods_trainable_parameters_and_times_them_side_by_side(tmp_path):
    out = tmp_path / "cost.json"
    argv = ["--methods", "inclora", "olora", "osf", "jumplora_olora", "--rounds", "1", "--steps", "2", "--layers", "1"]
    argv += ["--seq_len", "64", "--batch", "2", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "method_cost.py"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads(out.read_text())["methods"]}
    # one SmolLM2 layer, r 8 on q (576 × 576) and v (192 × 576): 8·(576 + 576) + 8·(576 + 192)
    assert rows["inclora"]["trainable"] == rows["olora"]["trainable"] == 15360
    assert rows["jumplora_olora"]["trainable"] == 15361  # + the global τ
    # OSF, task 2 of 2 at f 0.5: (d_out + d_in + 1)·(min − k_2), k_2 = min / 2; allocated at task 1's rank (k_1 = min / 4)
    osf = rows["osf"]["runs"][0]
    assert rows["osf"]["trainable"] == 1153 * 288 + 769 * 96 and osf["allocated_trainable"] == 1153 * 432 + 769 * 144
    assert rows["inclora"]["step_ratio"] == 1.0 and all(r["step_s"] > 0 and r["switch_s"] > 0 for r in rows.values())
    assert "osf" in done.stdout and "× inclora" in done.stdout


def test_the_long_sequence_runs_evaluate_at_the_end_and_the_standard_cl_runs_every_task():
    runs = {run.name: run for run in forgetting.comparison_plan()}
    long_sequence = [name for name in runs if name.startswith("test/order4/")]
    assert len(long_sequence) == 6
    for name in long_sequence:
        argv = forgetting.command(runs[name])
        assert argv[argv.index("--eval_seen_tasks") + 1] == "at_end", name
    assert "--eval_seen_tasks" not in forgetting.command(runs["test/order1/inclora/seed43"])


def test_the_numerics_fingerprint_is_stable_and_tells_kernels_apart():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"}
    first = forgetting.numerics_fingerprint(env)
    assert len(first) == 16 and first == forgetting.numerics_fingerprint(env)
    assert forgetting.numerics_fingerprint({**env, "ATEN_CPU_CAPABILITY": "default"}) != first

"""The benchmark recipes, launched as scripts on a tiny model and a generated folder in the standard layout."""

import json
import os
import subprocess
import sys

import pytest
from tiny import keyword_task, tiny_t5, tokenizer
from transformers import T5ForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(__file__))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _script(name, *args, launcher=()):
    return subprocess.run(
        [*launcher, os.path.join(ROOT, "recipes", name), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "name,launcher", [("sc.py", (sys.executable,)), ("ls.py", (sys.executable, "-m", "accelerate.commands.launch"))]
)
def test_help(name, launcher):
    done = _script(name, "--help", launcher=launcher)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--method" in done.stdout and "--order" in done.stdout and "--ella_lambda" in done.stdout


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    model_dir = root / "model"
    tiny_t5(tie_word_embeddings=False).save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    data = root / "data"
    for i, (options, triggers) in enumerate([(["yes", "no"], ["sun", "moon"]), (["red", "blue"], ["cat", "dog"])]):
        task = keyword_task(f"t{i}", options, triggers, n_train=16, n_eval=8, seed=i, filler=(0, 0))
        (data / f"t{i}").mkdir(parents=True)
        (data / f"t{i}" / "train.json").write_text(json.dumps(task.train_dataset))
        for split in ("dev", "test"):
            (data / f"t{i}" / f"{split}.json").write_text(json.dumps(task.eval_dataset))
        (data / f"t{i}" / "labels.json").write_text(json.dumps(options))
    (data / "orders.json").write_text(json.dumps({"order1": ["t0", "t1"], "order4": ["t1", "t0"]}))
    return root


@pytest.mark.parametrize("name,order", [("sc.py", ["t0", "t1"]), ("ls.py", ["t1", "t0"])])
def test_tiny_run_of_each_recipe(tiny_setup, name, order):
    out = tiny_setup / f"out_{name}"
    done = _script(
        name,
        "--model_name_or_path",
        str(tiny_setup / "model"),
        "--data_dir",
        str(tiny_setup / "data"),
        "--output_dir",
        str(out),
        "--method",
        "jumplora_ella",
        "--ella_lambda",
        "0",
        "100",
        "--per_device_train_batch_size",
        "4",
        "--max_source_length",
        "128",
        "--jumplora_target_modules",
        "q",
        "v",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
        launcher=(sys.executable,),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "continual_metrics.json").read_text())
    assert report["tasks"] == order  # the default order of each recipe, read from orders.json
    assert report["method"] == "jumplora_ella" and len(report["accuracy_matrix"]) == 2
    merged = T5ForConditionalGeneration.from_pretrained(out / "merged")  # the final merged model, a plain checkpoint
    assert not any("lora" in name for name in merged.state_dict())
    for name in (
        "accuracy_matrix.csv",
        "accuracy_matrix.json",
        "per_task.csv",
        "accuracy_matrix.png",
        "sparsity_by_depth.png",
    ):
        assert (out / name).exists(), name  # the run's reports
    logged = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    steps = [entry["step"] for entry in logged if "loss" in entry]
    assert (
        steps == sorted(steps) and steps[0] >= 1 and {entry["task"] for entry in logged if "loss" in entry} == {0, 1}
    )


def test_osf_run_of_the_sc_recipe_with_the_comparison_plan_flags(tiny_setup):
    # the flags of benchmarks/forgetting.py's comparison plan for osf: --learning_rate LR --osf_max_preserved_fraction F
    out = tiny_setup / "out_osf"
    done = _script(
        "sc.py",
        *("--model_name_or_path", str(tiny_setup / "model"), "--data_dir", str(tiny_setup / "data")),
        *(
            "--output_dir",
            str(out),
            "--method",
            "osf",
            "--learning_rate",
            "1e-4",
            "--osf_max_preserved_fraction",
            "0.5",
        ),
        *("--per_device_train_batch_size", "4", "--max_source_length", "128", "--jumplora_target_modules", "q", "v"),
        *("--use_cpu", "--disable_tqdm", "true"),
        launcher=(sys.executable,),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "continual_metrics.json").read_text())
    assert report["method"] == "osf" and len(report["accuracy_matrix"]) == 2
    # 12 adapted 32×32 weights (q, v of 2 encoder self-, 2 decoder self- and 2 cross-attention blocks), k_t 8, 16
    assert [t["trainable_parameters"] for t in report["per_task"]] == [12 * 65 * (32 - 8), 12 * 65 * (32 - 16)]
    config = json.loads((out / "run_config.json").read_text())
    assert config["adapters"]["osf_max_preserved_fraction"] == 0.5 and config["adapters"]["target_modules"] == [
        "q",
        "v",
    ]
    merged = T5ForConditionalGeneration.from_pretrained(out / "merged")
    assert not any("osf" in name for name in merged.state_dict())
    assert (out / "ledger" / "task-02-t1.safetensors").exists()


def test_unloadable_model_names_the_offline_way(tiny_setup):
    done = _script(
        "sc.py",
        "--model_name_or_path",
        str(tiny_setup / "missing"),
        "--data_dir",
        str(tiny_setup / "data"),
        "--output_dir",
        str(tiny_setup / "never"),
        "--use_cpu",
        launcher=(sys.executable,),
    )
    assert done.returncode != 0
    assert "no such model folder" in done.stderr and "make demo" in done.stderr
    assert "Traceback" not in done.stderr and not (tiny_setup / "never").exists()


def test_single_task_accuracies_are_read_only_from_a_finished_baseline_of_the_same_tasks(tmp_path):
    from jumplora_hf.bench.recipe import read_single_task_accuracies

    assert read_single_task_accuracies(str(tmp_path / "absent"), ["t0"], explicit=False) is None
    with pytest.raises(FileNotFoundError, match="--single_task_baselines true"):
        read_single_task_accuracies(str(tmp_path / "absent"), ["t0"], explicit=True)
    (tmp_path / "continual_metrics.json").write_text(
        json.dumps({"single_task_baselines": True, "tasks": ["t0", "t1"], "single_task_accuracies": [0.5, 0.75]})
    )
    assert read_single_task_accuracies(str(tmp_path), ["t0", "t1"], explicit=True) == [0.5, 0.75]
    assert (
        read_single_task_accuracies(str(tmp_path), ["t0", "t1", "t2"], explicit=False) is None
    )  # unfinished / other tasks
    with pytest.raises(ValueError, match="not a finished --single_task_baselines run"):
        read_single_task_accuracies(str(tmp_path), ["t1", "t0"], explicit=True)


def test_help_is_light_and_lists_the_recipes_flags_first():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['sc.py', '--help']\n"
        "try:\n    runpy.run_path('recipes/sc.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'TORCH-NOT-IMPORTED')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert "TORCH-NOT-IMPORTED" in done.stdout  # the heavy imports happen after the flags are parsed
    lines = done.stdout.splitlines()
    assert len(lines) < 120 and "--per_device_train_batch_size " not in done.stdout.split("training (")[0]
    full = _script("sc.py", "--help-all", launcher=(sys.executable,))
    assert full.returncode == 0 and full.stdout.index("--data_dir") < full.stdout.index(
        "--per_device_train_batch_size"
    )


def _user_error(*args, output_dir):
    done = _script("sc.py", *args, "--output_dir", str(output_dir), launcher=(sys.executable,))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines() if "[WARNING]" not in line]  # DeepSpeed's import note
    assert "Traceback" not in done.stderr and len(lines) == 2
    assert lines[0].startswith("error: ") and lines[1].startswith("usage: sc.py")
    assert not output_dir.exists()  # nothing written
    return lines[0]


def test_missing_data_says_how_to_get_it(tmp_path):
    err = _user_error("--data_dir", str(tmp_path / "nowhere"), output_dir=tmp_path / "out")
    assert "no benchmark folder at" in err and "recipes/build_cl_benchmark.py" in err and "--data_dir" in err


def test_default_data_location_is_user_facing(tmp_path):
    env = {**ENV, "JUMPLORA_DATA_DIR": str(tmp_path / "mine")}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "sc.py"), "--output_dir", str(tmp_path / "o")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and f"no benchmark folder at '{tmp_path / 'mine'}'" in done.stderr
    env.pop("JUMPLORA_DATA_DIR")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "sc.py"), "--output_dir", str(tmp_path / "o")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "no benchmark folder at 'data/cl_benchmark'" in done.stderr


def test_unknown_order_lists_the_valid_ones(tiny_setup, tmp_path):
    err = _user_error("--data_dir", str(tiny_setup / "data"), "--order", "order9", output_dir=tmp_path / "out")
    assert "Valid orders: order1, order4" in err and "tasks: t0, t1" in err


def test_a_typo_in_one_target_is_refused_before_anything_is_written(tiny_setup, tmp_path):
    err = _user_error(
        "--model_name_or_path",
        str(tiny_setup / "model"),
        "--data_dir",
        str(tiny_setup / "data"),
        "--jumplora_target_modules",
        "q",
        "vv",
        "--use_cpu",
        "true",
        output_dir=tmp_path / "out",
    )
    assert "'vv' (closest: ['v'" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--no_such_flag", "1"], "--no_such_flag"),
        (["--method", "ewc"], "ewc"),
        (["--jumplora_s_start", "0.9", "--jumplora_s_final", "0.5"], "s_start"),
        (["--ella_lambda", "big", "--method", "ella"], "numbers or 'auto'"),
    ],
)
def test_bad_flags_give_one_message(tiny_setup, tmp_path, args, message):
    err = _user_error(
        "--model_name_or_path",
        str(tiny_setup / "model"),
        "--data_dir",
        str(tiny_setup / "data"),
        *args,
        output_dir=tmp_path / "out",
    )
    assert message in err

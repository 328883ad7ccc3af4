"""Per-run reports and the mean ± std table over seeds, on hand-built continual_metrics.json files."""

import json
import os
import subprocess
import sys

import pytest
from tiny import load_script

from jumplora_hf.bench.aggregation import (
    PAPER_OA,
    aggregate_runs,
    format_paired_differences,
    format_table,
    paired_differences,
)
from jumplora_hf.bench.reports import parse_layer_name, trained_matrix, write_run_reports

ROOT = os.path.dirname(os.path.dirname(__file__))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["accuracy_matrix.png", "bwt_per_task.png", "sparsity_overlap_per_task.png", "sparsity_by_depth.png"]

T5_LAYERS = [
    f"base_model.model.{stack}.block.{depth}.layer.{sub}.{attention}.{module}"
    for stack, subs in (
        ("encoder", [(0, "SelfAttention")]),
        ("decoder", [(0, "SelfAttention"), (1, "EncDecAttention")]),
    )
    for depth in (0, 1)
    for sub, attention in subs
    for module in ("q", "v")
]
LLAMA_LAYERS = [
    f"base_model.model.model.layers.{depth}.self_attn.{module}"
    for depth in range(4)
    for module in ("q_proj", "v_proj")
]
ACC = [[0.9, None, None], [0.7, 0.8, None], [0.5, 0.6, 1.0]]  # OA 0.7, BWT ((0.5-0.9)+(0.6-0.8))/2 = -0.3


def _per_layer(layers, mean):
    """Values mean ∓ 0.05 alternating over the layers (an even count), so that their mean is exactly `mean`."""
    return {name: mean + (0.05 if i % 2 else -0.05) for i, name in enumerate(layers)}


def make_report(
    acc=ACC,
    tasks=("t0", "t1", "t2"),
    method="jumplora_inclora",
    layers=T5_LAYERS,
    sparsity=(0.5, 0.6, 0.8),
    jaccard=(None, 0.1, 0.05),
    single_task=None,
):
    """A report in the shape ContinualTrainer.continual_report() returns (rows padded to the whole sequence)."""
    per_task = []
    for i, name in enumerate(tasks):
        overlap = None if jaccard[i] is None else {"mean": jaccard[i], "per_layer": _per_layer(layers, jaccard[i])}
        per_task.append(
            {
                "name": name,
                "overall_accuracy": None,
                "backward_transfer": None,
                "sparsity": {"mean": sparsity[i], "per_layer": _per_layer(layers, sparsity[i])},
                "jaccard_with_previous": overlap,
            }
        )
    return {
        "method": method,
        "tasks": list(tasks),
        "accuracy_matrix": acc,
        "overall_accuracy": None,
        "backward_transfer": None,
        "forward_transfer": None,
        "single_task_accuracies": single_task,
        "per_task": per_task,
    }


def write_run(run_dir, report):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "continual_metrics.json"), "w") as f:
        json.dump(report, f)
    return str(run_dir)


def assert_png(path, min_colours: int = 3):
    """A decodable PNG of a drawn figure: the expected size class and more than a blank page's colours."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 400, (path, pixels.shape)
    colours = {tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[:: max(1, pixels.size // 200000)].round(2)}
    assert len(colours) >= min_colours, path
    return pixels


def test_parse_layer_name_t5_and_llama():
    assert parse_layer_name("base_model.model.encoder.block.3.layer.0.SelfAttention.q") == ("encoder", 3, "q")
    assert parse_layer_name("base_model.model.decoder.block.11.layer.1.EncDecAttention.v") == (
        "decoder",
        11,
        "cross-v",
    )
    assert parse_layer_name("base_model.model.model.layers.7.self_attn.q_proj") == ("", 7, "q_proj")
    assert parse_layer_name("base_model.model.lm_head") is None


def test_run_reports_tables_and_plots(tmp_path):
    report = make_report(single_task=[1.0, 1.0, 1.0])
    written = write_run_reports(str(tmp_path), report)

    assert sorted(os.path.basename(p) for p in written) == sorted(
        ["accuracy_matrix.csv", "accuracy_matrix.json", "per_task.csv", *PLOTS]
    )
    assert (tmp_path / "accuracy_matrix.csv").read_text() == (
        ",t0,t1,t2\nafter t0,0.9,,\nafter t1,0.7,0.8,\nafter t2,0.5,0.6,1\n"
    )
    assert (tmp_path / "per_task.csv").read_text() == (
        "task,overall_accuracy,backward_transfer,sparsity_mean,jaccard_mean\n"
        "t0,0.9,,0.5,\n"
        "t1,0.75,-0.2,0.6,0.1\n"
        "t2,0.7,-0.3,0.8,0.05\n"
    )
    saved = json.loads((tmp_path / "accuracy_matrix.json").read_text())
    assert saved["tasks"] == ["t0", "t1", "t2"] and saved["accuracy_matrix"] == ACC
    assert saved["overall_accuracy"] == pytest.approx(0.7)
    assert saved["backward_transfer"] == pytest.approx(-0.3)
    assert saved["forward_transfer"] == pytest.approx(((0.9 - 1) + (0.8 - 1) + (1.0 - 1)) / 3)
    for name in PLOTS:
        assert_png(tmp_path / name)
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_llama_layers_dense_updates_and_single_task(tmp_path):
    dense = make_report(method="inclora", layers=LLAMA_LAYERS, sparsity=(0.0, 0.0, 0.0), jaccard=(None, 1.0, 1.0))
    for part in dense["per_task"]:  # IncLoRA merges dense updates: sparsity exactly 0 everywhere, still plotted
        part["sparsity"]["per_layer"] = dict.fromkeys(LLAMA_LAYERS, 0.0)
    written = write_run_reports(str(tmp_path / "dense"), dense)
    assert len(written) == 7
    assert_png(tmp_path / "dense" / "sparsity_by_depth.png")
    assert_png(tmp_path / "dense" / "sparsity_overlap_per_task.png")

    single = make_report(acc=[[0.9]], tasks=("t0",), sparsity=(0.5,), jaccard=(None,))
    written = write_run_reports(str(tmp_path / "single"), single)
    assert "bwt_per_task.png" not in {os.path.basename(p) for p in written}
    assert not (tmp_path / "single" / "bwt_per_task.png").exists()
    assert (tmp_path / "single" / "per_task.csv").read_text().splitlines()[1] == "t0,0.9,,0.5,"
    assert json.loads((tmp_path / "single" / "accuracy_matrix.json").read_text())["backward_transfer"] is None
    for name in ("accuracy_matrix.png", "sparsity_overlap_per_task.png", "sparsity_by_depth.png"):
        assert_png(tmp_path / "single" / name)


def _last_row(a, b):
    return [[0.9, None, None], [0.7, 0.8, None], [a, b, 1.0]]


@pytest.fixture
def runs(tmp_path):
    """order1: jumplora_inclora × 3 seeds (OA 0.6/0.7/0.8, BWT -0.45/-0.3/-0.15) and inclora × 2 seeds; order4: ella × 1."""
    root = tmp_path / "runs"
    dirs = []
    for seed, (a, b) in zip((42, 43, 44), [(0.3, 0.5), (0.5, 0.6), (0.7, 0.7)]):
        dirs.append(write_run(root / "order1" / "jumplora_inclora" / f"seed{seed}", make_report(acc=_last_row(a, b))))
    for seed in (42, 43):
        dirs.append(
            write_run(
                root / "order1" / "inclora" / f"seed{seed}",
                make_report(method="inclora", sparsity=(0.0, 0.0, 0.0), single_task=[1.0, 1.0, 1.0]),
            )
        )
    dirs.append(write_run(root / "order4" / "ella" / "seed42", make_report(method="ella", tasks=("t2", "t1", "t0"))))
    return dirs


def test_aggregate_mean_and_sample_std(runs):
    table = aggregate_runs(runs)
    assert [(g.order, g.method, g.n) for g in table] == [
        ("order1", "inclora", 2),
        ("order1", "jumplora_inclora", 3),
        ("order4", "ella", 1),
    ]
    jump = table[1]
    assert jump.overall_accuracy.mean == pytest.approx(0.7) and jump.overall_accuracy.std == pytest.approx(0.1)
    assert jump.backward_transfer.mean == pytest.approx(-0.3) and jump.backward_transfer.std == pytest.approx(0.15)
    assert jump.forward_transfer is None
    assert jump.sparsity.mean == pytest.approx(0.8) and jump.sparsity.std == pytest.approx(0.0)
    assert table[0].forward_transfer.mean == pytest.approx(-0.1) and table[0].forward_transfer.n == 2
    assert table[2].overall_accuracy.std is None and table[2].tasks == ["t2", "t1", "t0"]

    markdown = format_table(table, paper=PAPER_OA)
    oa = markdown.split("### Backward")[0]
    assert "| Method | order1 | order1 (paper) | order4 | order4 (paper) |" in oa
    assert oa.index("| IncLoRA |") < oa.index("| ELLA |") < oa.index("| JumpLoRA + IncLoRA |")
    assert "| JumpLoRA + IncLoRA | 70.0 ± 10.0 (n=3) | 70.76 |  | 65.35 |" in oa
    assert "| ELLA |  | 78.09 | 70.0 (n=1) | 72.64 |" in oa
    assert "-30.0 ± 15.0 (n=3)" in markdown and "### Forward transfer" in markdown and "-10.0 ± 0.0 (n=2)" in markdown
    assert "sample standard deviation (ddof=1)" in markdown

    lines = format_table(table, fmt="csv").splitlines()
    assert lines[0] == (
        "order,method,n,oa_mean,oa_std,bwt_mean,bwt_std,fwt_mean,fwt_std,sparsity_mean,sparsity_std,paper_oa,notes"
    )
    assert lines[1].startswith("order1,inclora,2,") and lines[2].startswith(
        "order4,ella,1,"
    )  # methods in the paper's order
    assert lines[3] == "order1,jumplora_inclora,3,70,10,-30,15,,,80,0,,"


def test_paired_differences_use_the_seeds_both_methods_finished(runs, tmp_path):
    unfinished = make_report(
        method="inclora",
        acc=[[0.9, None, None], [0.7, 0.8, None]],
        tasks=("t0", "t1"),
        sparsity=(0.0, 0.0),
        jaccard=(None, 1.0),
    )
    runs = runs + [write_run(tmp_path / "runs" / "order1" / "inclora" / "seed44", unfinished)]
    (pair,) = paired_differences(aggregate_runs(runs, allow_partial=True))  # no jumplora_ella on order4: no pair there
    # jumplora_inclora seeds 42, 43 (OA 0.6, 0.7; BWT -0.45, -0.3) against inclora (OA 0.7, BWT -0.3); seed 44 unfinished
    assert (pair.order, pair.method, pair.baseline, pair.seeds) == (
        "order1",
        "jumplora_inclora",
        "inclora",
        ["seed42", "seed43"],
    )
    assert pair.overall_accuracy.mean == pytest.approx(-0.05) and pair.overall_accuracy.std == pytest.approx(
        0.1 / 2**0.5
    )
    assert pair.backward_transfer.mean == pytest.approx(-0.075) and pair.backward_transfer.n == 2
    assert (
        "| order1 | JumpLoRA + IncLoRA − IncLoRA | 42, 43 | -5.0 ± 7.1 | -7.5 ± 10.6 |"
        in format_paired_differences([pair])
    )
    assert format_paired_differences([]) == ""


def test_single_task_baselines_give_fwt_and_are_not_rows(runs, tmp_path):
    baseline = {
        "method": "jumplora_inclora",
        "tasks": ["t0", "t1", "t2"],
        "single_task_baselines": True,
        "single_task_accuracies": [1.0, 1.0, 1.0],
        "per_task": [{"name": n, "sparsity": {"mean": 0.5}} for n in ("t0", "t1", "t2")],
    }
    extra = [write_run(tmp_path / "runs" / "order1" / "single_task" / f"seed{seed}", baseline) for seed in (42, 43)]
    table = aggregate_runs(runs + extra)
    assert [(g.order, g.method) for g in table] == [
        ("order1", "inclora"),
        ("order1", "jumplora_inclora"),
        ("order4", "ella"),
    ]
    fwt = table[1].forward_transfer  # seeds 42 and 43 have a baseline, seed 44 has none
    assert fwt.n == 2 and fwt.mean == pytest.approx(-0.1) and fwt.std == pytest.approx(0.0)
    assert "| JumpLoRA + IncLoRA | -10.0 ± 0.0 (n=2) |" in format_table(table)
    with pytest.raises(ValueError, match="single-task baselines"):
        write_run_reports(extra[0])


def test_aggregate_refuses_mismatched_and_unfinished_runs(runs, tmp_path):
    other = write_run(
        tmp_path / "runs" / "order1" / "jumplora_inclora" / "seed45", make_report(tasks=("t0", "t2", "t1"))
    )
    with pytest.raises(ValueError, match="different task lists"):
        aggregate_runs(runs + [other])

    unfinished_report = make_report(
        acc=[[0.9, None, None], [0.7, 0.8, None]], tasks=("t0", "t1"), sparsity=(0.5, 0.6), jaccard=(None, 0.1)
    )
    assert trained_matrix(unfinished_report) == [[0.9, None], [0.7, 0.8]]
    unfinished = write_run(tmp_path / "runs" / "order1" / "jumplora_inclora" / "seed46", unfinished_report)
    with pytest.raises(ValueError, match="unfinished.*seed46.*2/3 tasks.*allow_partial"):
        aggregate_runs(runs + [unfinished])
    group = aggregate_runs(runs + [unfinished], allow_partial=True)[1]
    assert group.n == 4 and group.overall_accuracy.n == 4 and "1 of 4 runs unfinished" in group.notes[0]
    assert group.overall_accuracy.mean == pytest.approx((0.6 + 0.7 + 0.8 + 0.75) / 4)
    assert "Notes:" in format_table([group])


def test_order_label_from_mapping_or_layout(tmp_path):
    loose = write_run(tmp_path / "somewhere", make_report())
    with pytest.raises(ValueError, match="--label"):
        aggregate_runs([loose])
    assert aggregate_runs([loose], labels={loose: "order2"})[0].order == "order2"
    quickstart = write_run(tmp_path / "runs" / "quickstart" / "jumplora_inclora", make_report())
    assert aggregate_runs([quickstart])[0].order == "quickstart"


def test_aggregate_script(tmp_path):
    seeds = [
        write_run(tmp_path / "runs" / "order1" / "jumplora_inclora" / f"seed{seed}", make_report(acc=_last_row(a, b)))
        for seed, (a, b) in ((42, (0.3, 0.5)), (43, (0.7, 0.7)))
    ]
    out = tmp_path / "docs" / "results_table.md"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "aggregate.py"), *seeds, "--out", str(out), "--plots"],
        cwd=ROOT,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "| JumpLoRA + IncLoRA | 70.0 ± 14.1 |" in done.stdout and "n = 2 run(s) per cell unless shown" in done.stdout
    )
    assert out.read_text() == done.stdout
    for seed in seeds:
        for name in PLOTS:
            assert_png(os.path.join(seed, name))

    recipe = load_script("recipes/aggregate.py")
    csv_text = recipe.main([*seeds, "--format", "csv"])
    assert csv_text.splitlines()[1].startswith("order1,jumplora_inclora,2,70,14.142136,")
    with pytest.raises(SystemExit, match="different task lists"):
        recipe.main(
            [
                *seeds,
                write_run(
                    tmp_path / "runs" / "order1" / "jumplora_inclora" / "seed44", make_report(tasks=("t1", "t0", "t2"))
                ),
            ]
        )


def test_mean_matrices_script_averages_finished_runs(runs, tmp_path, capsys):
    script = load_script("benchmarks/mean_matrices.py")
    unfinished = make_report(
        acc=[[0.1, None, None], [0.1, 0.1, None]], tasks=("t0", "t1"), sparsity=(0.5, 0.6), jaccard=(None, 0.1)
    )
    write_run(tmp_path / "runs" / "order1" / "jumplora_inclora" / "seed45", unfinished)
    script.main([str(tmp_path / "runs"), "order1"])
    out = capsys.readouterr().out
    assert "**order1 · JumpLoRA + IncLoRA** (mean of seeds 42, 43, 44)" in out  # seed 45 is unfinished
    assert "| t2 | 50.0 | 60.0 | 100.0 |" in out  # last rows (0.3, 0.5), (0.5, 0.6), (0.7, 0.7) and a[2][2] = 1
    assert "(%): 50.0, 60.0, 80.0. Mean Jaccard overlap with the earlier tasks' supports: 0.100, 0.050." in out
    assert "**order1 · IncLoRA** (mean of seeds 42, 43)" in out and "order4" not in out

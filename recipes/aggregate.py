"""Mean ± std over seeds of continual runs: methods × task orders, the shape of the paper's Tables 1-2.

The markdown output ends with JumpLoRA's effect on its base method (IncLoRA, ELLA) paired by seed.

Each run directory holds the `continual_metrics.json` that ContinualTrainer writes after every task. The
task order of a run is read from the layout the recipes write, `runs/<order>/<method>/seed<seed>` (or given with
--label). The std is the sample standard deviation (ddof=1) over the runs of a cell.

    python recipes/aggregate.py runs/order1/*/seed* runs/order4/*/seed* --out docs/results_table.md
    python recipes/aggregate.py runs/order*/*/seed* --paper                # the paper's Table 1 OA beside each order
    python recipes/aggregate.py runs/order1/*/seed* --format csv --out results.csv
    python recipes/aggregate.py runs/order1/*/seed* --plots                # also (re)write each run's CSV/JSON/PNG reports
    python recipes/aggregate.py runs/order4/*/seed* --allow-partial        # include unfinished runs, with a note
    python recipes/aggregate.py my/run_a my/run_b --label my/run_a=order1 --label my/run_b=order1
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse
import os
import sys

from jumplora_hf.bench.aggregation import (
    PAPER_OA,
    aggregate_runs,
    format_paired_differences,
    format_table,
    paired_differences,
)
from jumplora_hf.bench.reports import write_run_reports
from jumplora_hf.files import write_atomic


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories, each holding continual_metrics.json")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument(
        "--plots", action="store_true", help="(re)write each run's tables and plots into its directory"
    )
    parser.add_argument("--paper", action="store_true", help="add the paper's Table 1 OA next to each order")
    parser.add_argument(
        "--allow-partial", action="store_true", help="report unfinished runs and differing task lists with a note"
    )
    parser.add_argument(
        "--label", action="append", default=[], metavar="RUN_DIR=ORDER", help="task order label of a run dir"
    )
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    labels = {}
    for item in args.label:
        run_dir, sep, label = item.rpartition("=")
        if not sep or not run_dir or not label:
            sys.exit(f"error: --label takes RUN_DIR=ORDER, got {item!r}")
        labels[run_dir] = label
    try:
        table = aggregate_runs(args.run_dirs, labels=labels, allow_partial=args.allow_partial)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.plots:
        written = [path for group in table for run_dir in group.run_dirs for path in write_run_reports(run_dir)]
        print(f"wrote {len(written)} report files in {sum(g.n for g in table)} run directories", file=sys.stderr)
    text = format_table(table, fmt=args.format, paper=PAPER_OA if args.paper else None)
    paired = format_paired_differences(paired_differences(table)) if args.format == "markdown" else ""
    if paired:
        text += "\n" + paired
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_atomic(args.out, text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()

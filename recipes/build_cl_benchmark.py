"""Build the continual-learning benchmark folder (<task>/{train,dev,test,labels}.json, instructions.json,
orders.json) from the public Hugging Face Hub datasets, with the paper's split: test = at most 500 examples
per class, train/dev = 80%/20% of a pool of at most 1000 per class, fixed by --seed.

    python recipes/build_cl_benchmark.py --out_dir data/cl_benchmark                       # all 15 tasks
    python recipes/build_cl_benchmark.py --out_dir data/cl_benchmark --tasks agnews,dbpedia
    python recipes/build_cl_benchmark.py --out_dir data/cl_benchmark --tasks order1 --seed 43 --overwrite
    HF_DATASETS_OFFLINE=1 python recipes/build_cl_benchmark.py --out_dir data/cl_benchmark --cache_dir ~/hf_cache

Then train on it: python recipes/sc.py --data_dir data/cl_benchmark --order order1
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse
import logging
import sys

from jumplora_hf.bench.hub_builders import (
    DEFAULT_SEED,
    HUB_TASKS,
    POOL_PER_CLASS,
    TEST_PER_CLASS,
    TRAIN_FRACTION,
    HubLoadError,
    build_benchmark,
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="Folder to write the benchmark into.")
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"Comma-separated tasks or an order (order1-order6); default all: {','.join(HUB_TASKS)}.",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="Seed of the sampling and of the train/dev split."
    )
    parser.add_argument("--test_per_class", type=int, default=TEST_PER_CLASS, help="Most test examples per class.")
    parser.add_argument(
        "--pool_per_class", type=int, default=POOL_PER_CLASS, help="Most train+dev examples per class."
    )
    parser.add_argument(
        "--train_fraction", type=float, default=TRAIN_FRACTION, help="Share of the pool that goes to train."
    )
    parser.add_argument("--cache_dir", default=None, help="datasets cache folder (default: HF_DATASETS_CACHE).")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace the files of task folders that already exist."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = build_benchmark(
            args.out_dir,
            args.tasks,
            args.seed,
            cache_dir=args.cache_dir,
            test_per_class=args.test_per_class,
            pool_per_class=args.pool_per_class,
            train_fraction=args.train_fraction,
            overwrite=args.overwrite,
        )
    except (HubLoadError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    for name, sizes in counts.items():
        print(f"{name:8s} train {sizes['train']:6d}  dev {sizes['dev']:6d}  test {sizes['test']:6d}")
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return counts


if __name__ == "__main__":
    main()

"""How much of the adapted weights a finished run changed: ‖W_T − W_0‖_F and the fraction of entries touched.

Reads the merged weights that a run's resume state holds (after its last finished task) and the base
model's safetensors; the numbers of docs/RESULTS.md, section 2:

    python benchmarks/merged_change.py models/SmolLM2-135M-Instruct runs/order1/inclora/seed42 runs/order1/jumplora_inclora/seed42
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse
import os

import torch
from safetensors.torch import load_file

from jumplora_hf.state import saved_merged_weights


def merged_change(base: dict[str, torch.Tensor], run_dir: str) -> tuple[float, float]:
    squared_norm, touched, total = 0.0, 0, 0
    for name, merged in saved_merged_weights(run_dir).items():
        change = merged.float() - base[name.removeprefix("base_model.model.") + ".weight"].float()
        squared_norm += change.square().sum().item()
        touched += int(change.count_nonzero())
        total += change.numel()
    return squared_norm**0.5, touched / total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="the base model folder (model.safetensors)")
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args(argv)
    base = load_file(os.path.join(args.model_dir, "model.safetensors"))
    for run_dir in args.run_dirs:
        norm, fraction = merged_change(base, run_dir)
        print(f"{run_dir}: ||W_T - W_0||_F = {norm:.1f}, entries changed {100 * fraction:.1f}%")


if __name__ == "__main__":
    main()

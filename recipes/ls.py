"""Long Sequence benchmark (orders 4-6: 15 tasks) with the paper's defaults.

Defaults: google-t5/t5-large, r 8, α 32, q/v, lr 1e-3 constant, batch 32, one epoch per task, S_start 0.2,
S_final 0.8, ε 0.001, source 512 / target 8 tokens, seed 42, λ of the paper's Table 7 for the ELLA methods.

    accelerate launch recipes/ls.py --method jumplora_ella --order order4 --data_dir data/cl_benchmark
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/ls.py --order order5
    python recipes/ls.py --method inclora --max_train_examples 200 --max_eval_examples 100   # a small run
    python recipes/ls.py --help                 # the recipe's flags; --help-all: every Trainer flag too
"""

import os
import platform

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning
if platform.machine().lower() in ("x86_64", "amd64") and "ATEN_CPU_CAPABILITY" not in os.environ:
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"  # one set of CPU kernels on every x86-64 CPU: see demo.py
    os.environ.setdefault("MKL_CBWR", "AVX2")

from jumplora_hf.bench.recipe import main  # noqa: E402

if __name__ == "__main__":
    main(default_order="order4", description=__doc__)

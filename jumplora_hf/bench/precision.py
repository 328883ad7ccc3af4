"""Measurements of the bf16 merge and threshold: the accumulated-update error of task-by-task bf16 merges with and
without the float32 accumulator, and the surviving count at S_start when log τ is stored in bf16. Used by
`benchmarks/merge_drift.py` (the README's precision table) and by tests/test_precision.py."""

from __future__ import annotations

import torch

from ..gate import gate_mask


def synthetic_updates(
    shape: tuple[int, int],
    tasks: int,
    density: float = 0.3,
    weight_std: float = 0.18,
    update_median: float = 0.011,
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A float32 base weight of entries ~N(0, weight_std) and `tasks` sparse updates with `density` nonzeros whose
    magnitudes have median `update_median` (the demo's measured q/v statistics: 0.18 and 0.011)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen) * weight_std
    updates = []
    for _ in range(tasks):
        values = torch.randn(shape, generator=gen) * (update_median / 0.6745)  # median |N(0, s)| = 0.6745 s
        updates.append(values * (torch.rand(shape, generator=gen) < density))
    return weight, updates


def merge_drift(
    weight: torch.Tensor, updates: list[torch.Tensor], dtype: torch.dtype = torch.bfloat16
) -> dict[str, float]:
    """Relative error ‖(W_T − W_0) − ΣΔ‖ / ‖ΣΔ‖ (exact sums in float64) of T merges into a `dtype` weight: `naive`
    adds each update to the `dtype` weight (one rounding per task); `accumulated` adds them to a float32 copy that is
    re-cast after each merge (`JumpLoraLinear.fold_final_delta`); `round_once` is the exact merge rounded once, the
    best a `dtype` weight can hold. Also: the fraction of entries where `accumulated` and `round_once` differ (float32
    accumulation can change a rounding at a tie), and the fraction of the update's nonzero entries the final weight
    does not show (too small for its spacing)."""
    start = weight.to(dtype)
    total = torch.stack([u.double() for u in updates]).sum(0)
    naive, master = start.clone(), start.float()
    for update in updates:
        naive += update.to(dtype)
        master += update
    accumulated = master.to(dtype)
    round_once = (start.double() + total).to(dtype)

    def error(final: torch.Tensor) -> float:
        return float((final.double() - start.double() - total).norm() / total.norm())

    nonzero = total != 0
    return {
        "naive": error(naive),
        "accumulated": error(accumulated),
        "round_once": error(round_once),
        "accumulated_differs_from_round_once": float((accumulated != round_once).float().mean()),
        "vanished_naive": float(((naive == start) & nonzero).sum() / nonzero.sum()),
        "vanished_accumulated": float(((accumulated == start) & nonzero).sum() / nonzero.sum()),
    }


def survivor_count(delta: torch.Tensor, log_tau: torch.Tensor) -> int:
    return int(gate_mask(delta.float(), log_tau.float().exp()).sum())

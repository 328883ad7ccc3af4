"""What a task's merge added to the base weights: per layer (`LayerUpdate`) and per task (`MergedTaskUpdate`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class LayerUpdate:
    """Exactly what one task added to one adapted weight: W ← W + update (float32, already scaled by β).

    Sparse (JumpLoRA): the flat indices of ΔW_final ≠ 0 and the values added there. Dense (IncLoRA, ELLA): the
    factors, update = β·(B·A) in float32, recomputed with the same product as the merge.
    """

    shape: tuple[int, int]
    scaling: float
    indices: torch.Tensor | None = None  # int64, flat
    values: torch.Tensor | None = None  # float32, β·ΔW_final at `indices`
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    def dense(self) -> torch.Tensor:
        """The update as a d_out × d_in float32 tensor."""
        if self.is_sparse:
            out = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.float32)
            out[self.indices] = self.values
            return out.view(self.shape)
        return dense_lora_delta(self.lora_A, self.lora_B) * self.scaling


def dense_lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """ΔW = B·A in float32, the product `JumpLoraLinear.delta_weight` computes."""
    if lora_A.dtype in (torch.float16, torch.bfloat16):
        lora_A, lora_B = lora_A.float(), lora_B.float()
    return (lora_B @ lora_A).float()


@dataclass
class MergedTaskUpdate:
    """What a task left in the base weights, per adapted layer: the support of ΔW_final (bit-packed, over this
    process's entries: the whole layer, or under ZeRO-3 its partition), the whole layer's entry and support counts,
    the mean Jaccard overlap of the support with each earlier task's (computed at the merge, over every process), and
    τ per threshold group."""

    supports: dict[str, np.ndarray] = field(default_factory=dict)
    numels: dict[str, int] = field(default_factory=dict)
    nonzeros: dict[str, int] = field(default_factory=dict)
    jaccard: dict[str, float] = field(default_factory=dict)  # empty for the first task
    taus: dict[str, float] = field(default_factory=dict)  # τ per threshold group at the merge (JumpLoRA)
    workspace_bytes: int = 0  # the largest transient tensors of one layer's merge on this process

    def sparsity(self) -> dict[str, float]:
        return {name: 1.0 - self.nonzeros[name] / self.numels[name] for name in self.numels}

    def support_nbytes(self) -> int:
        return sum(packed.nbytes for packed in self.supports.values())

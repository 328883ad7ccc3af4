"""The ELLA regulariser λ·‖ΔW_x ⊙ W_past‖²_F, averaged over adapted layers (Biswas et al. 2026).

ΔW_x is the raw update (no LoRA scale), as W_past accumulates raw ΔW_final (Algorithm 1, line 21):
"sparse" uses ΔW_jump once τ is initialised (the dense ΔW before S_start), "interpolated" ΔW_interp.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .callback import ContinualCallback
from .entries import all_reduce_sum
from .layer import iter_jumplora_layers

ELLA_DELTA_MODES = ("sparse", "interpolated")


def _check_mode(mode: str) -> None:
    if mode not in ELLA_DELTA_MODES:
        raise ValueError(f"unknown ELLA delta mode {mode!r}; use one of {ELLA_DELTA_MODES}")


def ella_penalty(model: torch.nn.Module, mode: str = "sparse", adapter: str = "default") -> torch.Tensor | None:
    """mean over adapted layers of ‖ΔW_x ⊙ W_past‖²_F (without λ), computed now; None before any merge.

    It reads A and B outside the model's forward: fine for inspection and tests, but a training loss
    under DDP or ZeRO-3 must use the terms recorded in the forward (`record_ella_terms` + `pop_ella_penalty`).
    Under ZeRO-3, where each process holds a part of W_past, the parts are summed over the processes (every process
    must call it then, and the result carries no gradient).
    """
    _check_mode(mode)
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    terms = [
        layer.ella_squared_norm(adapter, mode)
        for layer in layers
        if layer.ella_w_past is not None and adapter in layer.lora_A
    ]
    if not terms:
        return None
    total = torch.stack(terms).sum()
    sharded = [
        layer.jump_partition for layer in layers if layer.jump_partition is not None and layer.jump_partition.sharded
    ]
    if sharded:
        total = all_reduce_sum(total.detach(), sharded[0].group)
    return total / len(layers)


def record_ella_terms(model: torch.nn.Module, mode: str | None) -> None:
    """Make every JumpLoRA layer record its ELLA term during training forwards (None switches it off)."""
    if mode is not None:
        _check_mode(mode)
    for _, layer in iter_jumplora_layers(model):
        layer.ella_delta_mode = mode
        layer.ella_term = None


def pop_ella_penalty(model: torch.nn.Module) -> torch.Tensor | None:
    """The mean ELLA term recorded by the last forward (None if nothing was recorded); clears the records."""
    layers = [layer for _, layer in iter_jumplora_layers(model)]
    terms = [layer.ella_term for layer in layers if layer.ella_term is not None]
    for layer in layers:
        layer.ella_term = None
    if not terms:
        return None
    return torch.stack(terms).sum() / len(layers)


class EllaRegularizer(ContinualCallback):
    """The ELLA term of each task's loss: λ_t·(mean over adapted layers of ‖ΔW_x ⊙ W_past‖²_F).

    `lambdas` holds λ per task (one value for all, or one per task), or is "auto": then each task's λ is set from
    its first `auto_steps` optimizer steps (default: the steps before S_start, at least two), during which the term
    is only measured, as λ_t = target_ratio · mean(cross-entropy) / mean(‖ΔW_x ⊙ W_past‖²) over those steps and
    all processes (`reduce_mean`), and then kept for the rest of the task: a term of about `target_ratio` times the
    cross-entropy, the scale ELLA's authors chose λ by. The first task has no W_past, so no term.
    """

    def __init__(
        self,
        lambdas,
        mode: str = "sparse",
        target_ratio: float = 1.0,
        auto_steps: int | None = None,
        reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        _check_mode(mode)
        self.auto = lambdas == "auto"
        self.lambdas = None if self.auto else [float(v) for v in lambdas]
        self.mode, self.target_ratio, self.auto_steps = mode, target_ratio, auto_steps
        self.reduce_mean = reduce_mean or (lambda t: t)
        self.lam = 0.0
        self.measuring = False
        self._measure_window = 0
        self._ce_sum = self._penalty_sum = self._logged_sum = torch.zeros(())
        self._logged_steps = 0
        self.task_lambdas: dict[int, float] = {}  # the λ each task used (auto: once measured)

    def lambda_for_task(self, index: int) -> float:
        return self.lambdas[0] if len(self.lambdas) == 1 else self.lambdas[index]

    def on_task_begin(self, args, state, control, task=None, model=None, **kwargs):
        self._ce_sum = self._penalty_sum = self._logged_sum = torch.zeros(())
        self._logged_steps = state.global_step
        if self.auto:
            self.lam, self.measuring = 0.0, task.index > 0
            config = getattr(model, "peft_config", {}).get("default")
            start = round(getattr(config, "s_start", 0.2) * task.num_steps)
            self._measure_window = self.auto_steps or max(2, start)  # at its first step B = 0: no term yet
        else:
            self.lam, self.measuring = self.lambda_for_task(task.index), False
        self.task_lambdas[task.index] = self.lam
        record_ella_terms(model, self.mode if (self.lam > 0 or self.measuring) else None)

    def task_state(self) -> dict:
        return {
            "lam": self.lam,
            "measuring": self.measuring,
            "measure_window": self._measure_window,
            "ce_sum": float(self._ce_sum),
            "penalty_sum": float(self._penalty_sum),
            "logged_sum": float(self._logged_sum),
            "logged_steps": self._logged_steps,
            "task_lambdas": {str(k): v for k, v in self.task_lambdas.items()},
        }

    def load_task_state(self, state: dict, model=None) -> None:
        self.lam, self.measuring, self._measure_window = state["lam"], state["measuring"], state["measure_window"]
        # float32 sums: their exact values survive the round trip through a Python float
        self._ce_sum = torch.tensor(state["ce_sum"], dtype=torch.float32)
        self._penalty_sum = torch.tensor(state["penalty_sum"], dtype=torch.float32)
        self._logged_sum = torch.tensor(state["logged_sum"], dtype=torch.float32)
        self._logged_steps = state["logged_steps"]
        self.task_lambdas = {int(k): v for k, v in state["task_lambdas"].items()}
        if model is not None:
            record_ella_terms(model, self.mode if (self.lam > 0 or self.measuring) else None)

    def on_task_step(self, args, state, control, task=None, step=0, **kwargs):
        if self.measuring and step >= self._measure_window:
            ce, penalty = self.reduce_mean(self._ce_sum.reshape(1)), self.reduce_mean(self._penalty_sum.reshape(1))
            self.lam = float(self.target_ratio * ce / penalty) if float(penalty) > 0 else 0.0
            self.measuring = False
            self.task_lambdas[task.index] = self.lam

    def on_task_end(self, args, state, control, task=None, model=None, record=None, **kwargs):
        record_ella_terms(model, None)
        self.measuring = False
        if record is not None and task is not None:
            record.note(task.index, ella_lambda=self.task_lambdas.get(task.index, self.lam))

    def loss_term(
        self, model: torch.nn.Module, loss: torch.Tensor, accumulation_steps: int, scaled_for_ga: bool
    ) -> torch.Tensor | None:
        """λ·penalty for the loss of one micro-batch (counted once per optimizer step); None when there is none.

        `loss` is the cross-entropy the Trainer computed for this micro-batch, `scaled_for_ga` whether it is
        already normalised over the whole accumulated batch (then the Trainer will not divide it).
        """
        penalty = pop_ella_penalty(model)  # recorded by the adapted layers during this forward
        if penalty is None:
            return None
        per_step = 1.0 / accumulation_steps  # this micro-batch's share of one optimizer step
        if self.measuring:
            ce = loss.detach().float() * (1.0 if scaled_for_ga else per_step)
            self._ce_sum = self._ce_sum.to(ce.device) + ce
            self._penalty_sum = self._penalty_sum.to(ce.device) + penalty.detach() * per_step
            return None
        if self.lam == 0.0:
            return None
        term = self.lam * penalty
        self._logged_sum = self._logged_sum.to(term.device) + term.detach() * per_step
        return term * per_step if scaled_for_ga else term

    def on_task_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        steps = state.global_step - self._logged_steps
        if steps > 0:
            # the mean over the processes: each one's term is its estimate (under ZeRO-3 its part, times the parts)
            ella = float(self.reduce_mean(self._logged_sum.reshape(1))) / steps
            logs["loss_ella"], logs["loss_ce"] = ella, logs["loss"] - ella
        logs["ella/lambda"] = self.lam
        self._logged_sum, self._logged_steps = torch.zeros(()), state.global_step

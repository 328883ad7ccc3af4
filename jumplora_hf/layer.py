"""`JumpLoraLinear`: PEFT's LoRA `Linear` with the JumpLoRA gate as a LoRA variant.

Per adapter the gate's state is
- `lora_log_tau[adapter]`: the learnable part of log τ, a float32 parameter (shape (1,)), 0 when τ is set;
- `lora_gate_state[adapter]`: an int32 buffer holding the float32 bit patterns of [log τ at S_start, γ].
log τ = anchor + offset. The anchor is fixed when τ is initialised and is stored as integer bits, so that neither a
bf16 engine (DeepSpeed casts every floating parameter and buffer) nor a dtype cast can round it: the surviving count
at S_start stays exact in any precision, and the learnable offset near 0 loses nothing to bf16 spacing. Both are in
the state dict (the "lora_" prefix), so γ and the threshold survive `save_pretrained`, Trainer checkpoints and
`set_peft_model_state_dict`. Python mirrors (`jump_gamma`, `jump_tau_ready`) serve the forward without a device sync.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ._compat import BufferDict, LoraLinear, LoraVariant, called_from_add_weighted_adapter, is_zero3_param
from .config import register_jumplora_layer
from .entries import EntryPartition, read_weight_entries, weight_partition, write_weight_entries
from .gate import fused_jump_linear, hard_threshold_, jump_interpolated_delta, symmetric_jump_relu
from .groups import threshold_group

# log τ of a fresh adapter: τ = the smallest normal float32, so the gate is open (ΔW_jump = ΔW) until the
# threshold is initialised at S_start, and an adapter saved before that still behaves as plain LoRA.
OPEN_LOG_TAU = math.log(torch.finfo(torch.float32).tiny)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def float32_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())


def bits_float32(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


_OPEN_BITS = float32_bits(OPEN_LOG_TAU)


class JumpLoraLinearVariant(LoraVariant):
    """The JumpLoRA forward and merge, plugged into PEFT's LoRA variant mechanism."""

    @staticmethod
    def init(module: JumpLoraLinear, adapter_name: str, config=None, target_name: str = "", **kwargs) -> None:
        if called_from_add_weighted_adapter():
            raise NotImplementedError(
                "add_weighted_adapter combines the adapters' A and B into one low-rank update, but a JumpLoRA "
                "adapter applies ΔW ⊙ H(|ΔW| − τ), which no low-rank combination reproduces. Merge the adapters one "
                "after the other (merge_and_unload, or end_task), or compose tasks with jumplora_hf.ledger"
            )
        device = module.get_base_layer().weight.device
        # its own parameter here; the layers of one threshold group are tied when the model is built
        # (thresholds.tie_thresholds). Shape (1,), not (): DeepSpeed ZeRO cannot flatten 0-dim parameters.
        module.lora_log_tau[adapter_name] = torch.nn.Parameter(
            torch.zeros(1, dtype=torch.float32, device=device), requires_grad=not config.inference_mode
        )
        module.lora_gate_state[adapter_name] = torch.tensor(
            [_OPEN_BITS, float32_bits(0.0)], dtype=torch.int32, device=device
        )
        module.jump_bandwidth[adapter_name] = config.jump_bandwidth
        module.jump_threshold_group[adapter_name] = threshold_group(config.threshold_mode, target_name)
        module.jump_fused[adapter_name] = bool(config.jump_fused)
        module.jump_tau_ready[adapter_name], module.jump_gamma[adapter_name] = False, 0.0  # the state just written

    @staticmethod
    def merge_safe(module: JumpLoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: JumpLoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: JumpLoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: JumpLoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        scaling = module.scaling[active_adapter]
        gamma = module.jump_gamma[active_adapter]
        if gamma <= 0.0:  # before S_start: exactly plain LoRA, and no d_out×d_in product
            out = result + lora_B(lora_A(x)) * scaling
            log_tau = module.lora_log_tau[active_adapter]
            if module.training and log_tau.requires_grad and is_zero3_param(log_tau) and torch.is_grad_enabled():
                # τ takes no part yet. Elsewhere it gets no gradient (Adam on τ starts at S_start), but DeepSpeed
                # ZeRO-3 steps every partition and would use τ's stale gradient of the last step that had one (the
                # previous task's), every step until S_start: an uninterrupted run then drifted from a resumed one
                # (whose engine starts with zeros). An explicit zero gradient makes both the same.
                out = _TieToOutput.apply(out, log_tau)
            return out
        log_tau, eps = module.log_tau(active_adapter), module.jump_bandwidth[active_adapter]
        if module.jump_fused[active_adapter]:
            # `result` (the base output) is already computed here, so only the update goes through the fused
            # function; `JumpLoraLinear.forward` avoids even that second GEMM in the common one-adapter case.
            return result + fused_jump_linear(
                x, None, None, lora_A.weight, lora_B.weight, log_tau, gamma, eps, scaling
            )
        delta = jump_interpolated_delta(lora_B.weight @ lora_A.weight, log_tau, gamma, eps)  # the reference path
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype) * scaling


class JumpLoraLinear(LoraLinear):
    """A LoRA `Linear` whose update ΔW = B·A can be gated by a learnable symmetric JumpReLU threshold.

    With `use_jumprelu=False` it is PEFT's plain LoRA layer (the IncLoRA / ELLA baselines). With it, the forward
    adds β·((1−γ)ΔW + γ·ΔW_jump)·x, with γ set by the task's schedule and τ = exp(log τ) shared by the layers of
    a threshold group. The layer also keeps ELLA's W_past (sum of past tasks' ΔW_final) as a non-persistent buffer,
    and, for bf16/fp16 base weights, a float32 copy of the merged weight (see `fold_final_delta`). Both hold this
    process's entries only (`entry_partition`: under ZeRO-3 its shard of the weight, flat; elsewhere the whole weight).
    """

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if not hasattr(self, "lora_log_tau"):
            # Deliberately not in `adapter_layer_names`: PEFT re-creates those when it moves or casts an
            # adapter, which would untie a τ shared by a threshold group.
            self.lora_log_tau = torch.nn.ParameterDict()
            self.lora_gate_state = BufferDict(persistent=True)
            self.jump_bandwidth: dict[str, float] = {}
            self.jump_threshold_group: dict[str, str] = {}
            self.jump_gamma: dict[str, float] = {}
            self.jump_tau_ready: dict[str, bool] = {}
            self.jump_fused: dict[str, bool] = {}
            self.merged_weight_fp32: torch.Tensor | None = None  # a plain attribute: no dtype cast reaches it
            self.jump_partition: EntryPartition | None = None  # the layout of the two above (entries.py)
            self.register_buffer("ella_w_past", None, persistent=False)
            # ELLA: while training with ella_delta_mode set, each forward records this layer's
            # ‖ΔW_x ⊙ W_past‖²_F. Inside the forward, DDP sees the use of A and B and ZeRO-3 has them
            # gathered; the trainer collects the terms after the model's forward (ella.pop_ella_penalty).
            self.ella_delta_mode: str | None = None
            self.ella_term: torch.Tensor | None = None
            # O-LoRA: the A matrices of the earlier tasks (r rows each, float32), and while training with
            # `olora_recording` each forward records (Σ|A_past·Aᵀ|, ‖A‖₂ + ‖B‖₂) of this layer (olora.py)
            self.register_buffer("olora_past_A", None, persistent=False)
            self.olora_recording = False
            self.olora_terms: tuple[torch.Tensor, torch.Tensor] | None = None
            self.register_forward_hook(_record_ella_term)
            self.register_forward_hook(_record_olora_terms)
            self.register_load_state_dict_post_hook(_sync_after_load)
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    @property
    def lora_variants(self):
        return {(): None, ("use_jumprelu",): JumpLoraLinearVariant}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for state in (
            self.lora_log_tau,
            self.lora_gate_state,
            self.jump_bandwidth,
            self.jump_threshold_group,
            self.jump_gamma,
            self.jump_tau_ready,
            self.jump_fused,
        ):
            if adapter_name in state:
                del state[adapter_name]

    # τ follows its adapter's A and B in PEFT's trainability rules (it is not in `adapter_layer_names`, see above)
    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        active = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for adapter, param in self.lora_log_tau.items():
            param.requires_grad_(adapter in active and not inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for adapter, param in self.lora_log_tau.items():
            if adapter in names:
                param.requires_grad_(requires_grad)

    # ----------------------------------------------------------------- the gate's state
    def is_jump(self, adapter: str) -> bool:
        return adapter in self.lora_log_tau

    def log_tau(self, adapter: str) -> torch.Tensor:
        """log τ = anchor + learnable offset, float32, differentiable in the offset (shape (1,))."""
        anchor = self.lora_gate_state[adapter][:1].view(torch.float32)
        return anchor + self.lora_log_tau[adapter].float()

    def sync_gate_mirrors(self, adapter: str) -> None:
        anchor_bits, gamma_bits = self.lora_gate_state[adapter].tolist()
        self.jump_tau_ready[adapter] = anchor_bits != _OPEN_BITS
        self.jump_gamma[adapter] = bits_float32(gamma_bits)

    def set_gamma(self, adapter: str, gamma: float) -> None:
        self.jump_gamma[adapter] = float(gamma)
        self.lora_gate_state[adapter][1] = float32_bits(gamma)

    @torch.no_grad()
    def set_log_tau(self, adapter: str, log_tau: float) -> None:
        """Fix the anchor at `log_tau` (a float32 value) and zero the offset: τ = exp(log_tau) exactly."""
        self.lora_gate_state[adapter][0] = float32_bits(log_tau)
        self.lora_log_tau[adapter].zero_()
        self.jump_tau_ready[adapter] = float32_bits(log_tau) != _OPEN_BITS

    def open_gate(self, adapter: str) -> None:
        self.set_log_tau(adapter, OPEN_LOG_TAU)
        self.set_gamma(adapter, 0.0)

    # ----------------------------------------------------------------- forward
    def _fused_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The adapter the fused forward can serve alone, or None (then PEFT's forward runs)."""
        if args or any(v is not None for v in kwargs.values()) or self.merged or self.disable_adapters:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        adapter = active[0]
        if not (self.is_jump(adapter) and self.jump_fused.get(adapter, False) and self.jump_gamma[adapter] > 0.0):
            return None
        return adapter if isinstance(self.get_base_layer(), torch.nn.Linear) else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """With the gate on (γ > 0) and one active JumpLoRA adapter: y = x·(W + β·ΔW_interp)ᵀ + b in one GEMM.

        PEFT's `Linear.forward` computes the base output first and then adds the update, which would cost
        a second dense GEMM here; every other case (γ = 0, merged, adapters disabled, several adapters,
        `adapter_names`, `jump_fused=False`) goes through it unchanged.
        """
        adapter = self._fused_adapter(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        return fused_jump_linear(
            x,
            base.weight,
            base.bias,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            self.log_tau(adapter),
            self.jump_gamma[adapter],
            self.jump_bandwidth[adapter],
            self.scaling[adapter],
        )

    # ----------------------------------------------------------------- the update
    def delta_weight(self, adapter: str) -> torch.Tensor:
        """Raw ΔW = B·A (d_out × d_in), before the LoRA scale, differentiable, float32 for bf16/fp16 adapters."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if a.dtype in LOW_PRECISION:
            a, b = a.float(), b.float()
        return b @ a

    def final_delta(self, adapter: str) -> torch.Tensor:
        """ΔW_final in float32: ΔW ⊙ H(|ΔW| − τ) for JumpLoRA, ΔW for plain LoRA (no gradient). Besides the result,
        it allocates two boolean masks of its size (the peak of a layer's merge)."""
        with torch.no_grad():
            delta = self.delta_weight(adapter).float()
            return hard_threshold_(delta, self.log_tau(adapter)) if self.is_jump(adapter) else delta

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """β·ΔW_final (float32), what PEFT's `merge()` / `merge_and_unload()` add to the base weight."""
        return self.final_delta(adapter) * self.scaling[adapter]

    def penalty_delta(self, adapter: str, mode: str) -> torch.Tensor:
        """ΔW_x of the ELLA term: x = "sparse" (ΔW_jump once τ is set, else ΔW) or "interpolated" (ΔW_interp)."""
        delta = self.delta_weight(adapter)
        if not self.is_jump(adapter):
            return delta
        log_tau, eps = self.log_tau(adapter), self.jump_bandwidth[adapter]
        if mode == "interpolated":
            return jump_interpolated_delta(delta, log_tau, self.jump_gamma[adapter], eps)
        if not self.jump_tau_ready[adapter]:
            return delta
        return symmetric_jump_relu(delta, log_tau.exp(), eps)

    def ella_squared_norm(self, adapter: str, mode: str) -> torch.Tensor:
        """‖ΔW_x ⊙ W_past‖²_F over this process's entries (float32, differentiable in A, B and τ): the whole layer's
        unless ZeRO-3 partitions W_past, then the processes' values sum to it."""
        delta = self.jump_partition.local(self.penalty_delta(adapter, mode).float())
        return (delta * self.ella_w_past).pow(2).sum()

    # ----------------------------------------------------------------- the task lifecycle's layer operations
    @torch.no_grad()
    def reset_task_adapter(self, adapter: str, generator: torch.Generator | None = None) -> None:
        """Fresh adapter for a new task: A Kaiming uniform (as PEFT/nn.Linear), B = 0, gate open, γ = 0."""
        weight_a = self.lora_A[adapter].weight
        if generator is not None and (generator.device != weight_a.device or weight_a.dtype != torch.float32):
            # drawn in float32 on the generator's device, so A is the same whatever the adapter's dtype or device
            fresh = torch.empty(weight_a.shape, dtype=torch.float32, device=generator.device)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            weight_a.copy_(fresh)
        else:
            torch.nn.init.kaiming_uniform_(weight_a, a=math.sqrt(5), generator=generator)
        torch.nn.init.zeros_(self.lora_B[adapter].weight)
        if self.is_jump(adapter):
            self.open_gate(adapter)

    def entry_partition(self) -> EntryPartition:
        """The entries of the weight whose state this process keeps (entries.py); fixed once the state exists."""
        partition = weight_partition(self.get_base_layer().weight, (self.out_features, self.in_features))
        held = self.jump_partition
        if held is not None and (held.start, held.end, held.world) != (
            partition.start,
            partition.end,
            partition.world,
        ):
            raise RuntimeError(
                f"the weight's partition changed from entries {held.start}..{held.end} of {held.world} processes to "
                f"{partition.start}..{partition.end} of {partition.world} while JumpLoRA holds state for it"
            )
        self.jump_partition = partition
        return partition

    def entry_state_nbytes(self) -> int:
        """Bytes of the per-entry state this layer holds (the float32 merged copy and W_past, this process's part)."""
        return sum(t.numel() * t.element_size() for t in (self.merged_weight_fp32, self.ella_w_past) if t is not None)

    @torch.no_grad()
    def merge_workspace_nbytes(self, adapter: str) -> int:
        """Bytes the merge of this layer allocates on its device besides the state: ΔW_final (float32, the whole layer,
        computed with `final_delta`) and, for JumpLoRA, the two boolean masks of `gate.hard_threshold_`; plus the
        boolean support of this process's entries. Runs on the meta device too (memory benchmarks)."""
        final = self.final_delta(adapter)
        masks = 2 * final.numel() if self.is_jump(adapter) else 0
        local = self.jump_partition.local(final) if self.jump_partition is not None else final
        return final.numel() * final.element_size() + masks + local.numel()

    @torch.no_grad()
    def allocate_entry_state(self, partition: EntryPartition, w_past: bool) -> None:
        """Create the per-entry state for `partition`: the float32 merged copy (bf16/fp16 weights, from the weight's
        current entries) and, with `w_past`, a zero W_past. The state's only allocation (memory benchmarks use it)."""
        weight = self.get_base_layer().weight
        self.jump_partition = partition
        if weight.dtype in LOW_PRECISION and self.merged_weight_fp32 is None:
            self.merged_weight_fp32 = read_weight_entries(weight, partition).float().clone()
        if w_past and self.ella_w_past is None:
            device = self.merged_weight_fp32.device if self.merged_weight_fp32 is not None else weight.device
            self.ella_w_past = torch.zeros(partition.local_shape, dtype=torch.float32, device=device)

    @torch.no_grad()
    def fold_final_delta(self, adapter: str, accumulate_w_past: bool) -> torch.Tensor:
        """W ← W + β·ΔW_final (and W_past ← W_past + ΔW_final), then remove the update: B = 0, γ = 0.

        Returns ΔW_final (float32, the whole layer: every process computes it from the gathered A and B). Afterwards the
        layer computes exactly the merged base layer. A bf16/fp16 base weight is re-cast after every merge from a
        float32 copy that accumulates the merges, so that after any number of tasks it equals the float32 merge rounded
        once (adding each update to the bf16 weight would round once per task, and lose the entries smaller than half
        the weight's spacing). Only this process's entries are written (under ZeRO-3: its shard, in place).
        """
        final = self.final_delta(adapter)
        partition = self.entry_partition()
        self.allocate_entry_state(partition, accumulate_w_past)
        update = partition.local(final) * self.scaling[adapter]
        weight = self.get_base_layer().weight
        if self.merged_weight_fp32 is not None:
            self.merged_weight_fp32.add_(update)
            write_weight_entries(weight, partition, self.merged_weight_fp32)
        else:
            write_weight_entries(weight, partition, update, add=True)
        del update
        if accumulate_w_past:
            self.ella_w_past.add_(partition.local(final))
        torch.nn.init.zeros_(self.lora_B[adapter].weight)
        if self.is_jump(adapter):
            self.set_gamma(adapter, 0.0)
        return final

    def merged_weight(self) -> torch.Tensor:
        """This process's entries of the merged base weight at full precision (the float32 copy for bf16/fp16
        weights): the whole (d_out, d_in) weight, or under ZeRO-3 the flat entries of its partition."""
        if self.merged_weight_fp32 is not None:
            return self.merged_weight_fp32
        return read_weight_entries(self.get_base_layer().weight, self.entry_partition())

    @torch.no_grad()
    def restore_merged_weight(self, value: torch.Tensor) -> None:
        """Set this process's entries of the merged weight (`value` in the layout of `merged_weight()`)."""
        weight = self.get_base_layer().weight
        partition = self.entry_partition()
        if weight.dtype in LOW_PRECISION and value.dtype == torch.float32:
            self.merged_weight_fp32 = value.to(read_weight_entries(weight, partition).device).clone()
        else:
            self.merged_weight_fp32 = None
        write_weight_entries(weight, partition, value)

    @torch.no_grad()
    def restore_w_past(self, value: torch.Tensor | None) -> None:
        """Set (or, with None, drop) this process's entries of W_past."""
        if value is None:
            self.ella_w_past = None
            return
        partition = self.entry_partition()
        device = read_weight_entries(self.get_base_layer().weight, partition).device
        self.ella_w_past = value.reshape(partition.local_shape).to(device, torch.float32).clone()


class _TieToOutput(torch.autograd.Function):
    """Returns `output` unchanged, with `side` in its autograd graph (zero gradient flows to `side`).

    DDP with find_unused_parameters=True marks every parameter it cannot reach from the forward's outputs
    as unused; τ used only by the recorded ELLA term (at S_start, γ = 0) would then be marked ready twice.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        ctx.side_shape, ctx.side_dtype = side.shape, side.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, torch.zeros(ctx.side_shape, dtype=ctx.side_dtype, device=grad_output.device)


def _record_ella_term(layer: JumpLoraLinear, args, output):
    if layer.training and layer.ella_delta_mode is not None and layer.ella_w_past is not None:
        adapter = layer.active_adapters[0]
        if adapter in layer.lora_A:
            # Under ZeRO-3 each process holds a part of W_past and records its part of the term, scaled by the
            # number of parts: the engine averages the gradients over the processes, which then sum the parts.
            layer.ella_term = layer.ella_squared_norm(adapter, layer.ella_delta_mode) * layer.jump_partition.world
            return _TieToOutput.apply(output, layer.ella_term)
    return None


def _record_olora_terms(layer: JumpLoraLinear, args, output):
    if layer.training and layer.olora_recording:
        adapter = layer.active_adapters[0]
        if adapter in layer.lora_A:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            orthogonal = (
                torch.mm(layer.olora_past_A, a.float().t()).abs().sum()
                if layer.olora_past_A is not None
                else a.new_zeros((), dtype=torch.float32)
            )
            layer.olora_terms = (orthogonal, torch.linalg.norm(a.float()) + torch.linalg.norm(b.float()))
    return None


def _sync_after_load(layer: JumpLoraLinear, incompatible_keys) -> None:
    for adapter in layer.lora_gate_state:
        layer.sync_gate_mirrors(adapter)


def iter_jumplora_layers(model: torch.nn.Module) -> Iterator[tuple[str, JumpLoraLinear]]:
    """(name, layer) for every JumpLoRA layer of `model` (a PeftModel or anything containing one)."""
    for name, module in model.named_modules():
        if isinstance(module, JumpLoraLinear):
            yield name, module


def set_interpolation_gamma(model: torch.nn.Module, gamma: float, adapter: str = "default") -> None:
    for _, layer in iter_jumplora_layers(model):
        if layer.is_jump(adapter):
            layer.set_gamma(adapter, gamma)


register_jumplora_layer(torch.nn.Linear, JumpLoraLinear)

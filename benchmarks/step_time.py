"""Step time and memory: PEFT LoRA vs JumpLoRA (reference autograd path) vs JumpLoRA (fused linear).

Launch:

    OMP_NUM_THREADS=1 python benchmarks/step_time.py                     # CPU defaults: T5-base and SmolLM2-135M shapes
    python benchmarks/step_time.py --model t5-base --layers 12 --steps 10 # the full 12+12-layer T5-base shape
    python benchmarks/step_time.py --model t5-large --dtype bfloat16 --device cuda   # T5-large shape, bf16, 32×512

Every model is built from a config (random weights, random token ids, nothing is downloaded). The three
variants adapt the same targets with the same r / alpha and start from the same A, B (B is filled with small
random values so that ΔW ≠ 0); the two JumpLoRA variants run with the gate on: `initialize_thresholds(model)`
then `set_interpolation_gamma(model, 0.5)`. A step is forward + backward + AdamW step. The variants are timed
round-robin (the order rotates every step) so that machine drift hits all three alike; the table gives the
median over the timed steps after the warm-up steps, and the spread (min-max) of those steps.

Memory: on CUDA, the peak `torch.cuda.max_memory_allocated` during one step above what was allocated when the
step began (weights, gradients and optimizer state of all three models are resident throughout). On CPU,
the bytes of the tensors autograd saves for the backward during one forward ("saved activations": unique
storages, parameters and buffers excluded), plus the growth of the process's peak RSS during one step
(Linux only; reset through /proc/self/clear_refs after `malloc_trim`; approximate, allocator caching blurs it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse
import copy
import ctypes
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch

SHAPES = {
    # T5-base: d_model 768, 12+12 layers, d_ff 3072, 12 heads (vocab 32128)
    "t5-base": dict(kind="t5", d_model=768, d_ff=3072, num_heads=12, d_kv=64, layers=12, vocab_size=32128),
    # T5-large: d_model 1024, 24+24 layers, d_ff 4096, 16 heads
    "t5-large": dict(kind="t5", d_model=1024, d_ff=4096, num_heads=16, d_kv=64, layers=24, vocab_size=32128),
    # SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 kv heads, intermediate 1536, vocab 49152
    "smollm2-135m": dict(
        kind="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        layers=30,
        vocab_size=49152,
    ),
}
TARGETS = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}
VARIANTS = ("lora", "jump_reference", "jump_fused")
# CPU defaults sized so that both models finish in well under 10 minutes on 2 cores (see README "Performance")
CPU_DEFAULTS = dict(layers={"t5-base": 6, "smollm2-135m": 10}, batch=8, seq_len=128, target_len=32, steps=5, warmup=1)
CUDA_DEFAULTS = dict(layers={}, batch=32, seq_len=512, target_len=32, steps=20, warmup=3)


def build_base(name: str, layers: int | None, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    shape = dict(SHAPES[name])
    kind, full_depth = shape.pop("kind"), shape.pop("layers")
    n_layers = layers or full_depth
    torch.manual_seed(0)
    if kind == "t5":
        config = T5Config(
            **shape,
            num_layers=n_layers,
            num_decoder_layers=n_layers,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        model = T5ForConditionalGeneration(config)
    else:
        config = LlamaConfig(
            **shape,
            num_hidden_layers=n_layers,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=1,
            tie_word_embeddings=True,
            attention_dropout=0.0,
        )
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def wrap(base: torch.nn.Module, variant: str, kind: str, r: int, alpha: int, device: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    from jumplora_hf import JumpLoraConfig, get_jumplora_model

    model = copy.deepcopy(base)
    common = dict(r=r, lora_alpha=alpha, target_modules=TARGETS[kind], lora_dropout=0.0)
    if variant == "lora":
        model = get_peft_model(model, LoraConfig(**common))
    else:
        model = get_jumplora_model(model, JumpLoraConfig(**common, jump_fused=(variant == "jump_fused")))
    model.to(device)
    # the same non-zero B in every variant (a freshly injected B is 0, which would make ΔW and τ degenerate)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    if variant != "lora":
        from jumplora_hf.layer import set_interpolation_gamma
        from jumplora_hf.thresholds import initialize_thresholds

        initialize_thresholds(model)
        set_interpolation_gamma(model, 0.5)
    model.train()
    return model


def make_batch(kind: str, batch: int, seq_len: int, target_len: int, vocab: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen)
    if kind == "t5":
        labels = torch.randint(3, vocab, (batch, target_len), generator=gen)
        return {"input_ids": ids.to(device), "labels": labels.to(device)}
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optimizer, batch) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the unique storages autograd saves during one forward, parameters and buffers excluded."""
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(storages.values())


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_growth_bytes(model, optimizer, batch) -> int | None:
    """Growth of the process's peak RSS during one step (Linux), None where it cannot be measured."""
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    start = _status_kib("VmRSS")
    train_step(model, optimizer, batch)
    peak = _status_kib("VmHWM")
    return None if start is None or peak is None else (peak - start) * 1024


def cuda_step_peak_bytes(model, optimizer, batch) -> int:
    sync("cuda")
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, batch)
    sync("cuda")
    return torch.cuda.max_memory_allocated() - start


@dataclass
class Result:
    times: list
    cpu_times: list
    memory: int | None = None
    rss: int | None = None

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    @property
    def median_cpu_ms(self) -> float:
        return 1e3 * statistics.median(self.cpu_times)

    def spread(self) -> str:
        return f"{1e3 * min(self.times):.0f}-{1e3 * max(self.times):.0f}"


def benchmark(name: str, args) -> dict[str, Result]:
    kind = SHAPES[name]["kind"]
    dtype = getattr(torch, args.dtype)
    defaults = CUDA_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    layers = args.layers or defaults["layers"].get(name) or SHAPES[name]["layers"]
    batch_size = args.batch or defaults["batch"]
    seq_len = args.seq_len or defaults["seq_len"]
    target_len = args.target_len or defaults["target_len"]
    steps = args.steps or defaults["steps"]
    warmup = args.warmup if args.warmup is not None else defaults["warmup"]

    base = build_base(name, layers, dtype)
    shape = {k: v for k, v in SHAPES[name].items() if k not in ("kind", "layers")}
    tokens = f"batch {batch_size} × {seq_len} tokens" + (f" (decoder {target_len})" if kind == "t5" else "")
    depth = f"{layers}+{layers}" if kind == "t5" else str(layers)
    print(
        f"\n== {name}-shaped ({kind}, {depth} layers of {SHAPES[name]['layers']}, {shape}), {args.dtype}, "
        f"{args.device}, {tokens}, targets {TARGETS[kind]}, r {args.r}, alpha {args.alpha}, "
        f"γ = 0.5 for JumpLoRA, {warmup} warm-up + {steps} timed steps, threads {torch.get_num_threads()}"
    )
    sys.stdout.flush()
    batch = make_batch(kind, batch_size, seq_len, target_len, shape["vocab_size"], args.device)
    models = {v: wrap(base, v, kind, args.r, args.alpha, args.device) for v in args.variants}
    del base
    optimizers = {
        v: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for v, m in models.items()
    }
    results = {v: Result(times=[], cpu_times=[]) for v in models}

    order = list(models)
    for step in range(warmup + steps):
        for variant in order[step % len(order) :] + order[: step % len(order)]:
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(models[variant], optimizers[variant], batch)
            sync(args.device)
            if step >= warmup:
                results[variant].times.append(time.perf_counter() - start)
                results[variant].cpu_times.append(time.process_time() - start_cpu)

    for variant, model in models.items():
        if args.device.startswith("cuda"):
            results[variant].memory = cuda_step_peak_bytes(model, optimizers[variant], batch)
        else:
            results[variant].memory = saved_activation_bytes(model, batch)
            if not args.no_rss:
                results[variant].rss = peak_rss_growth_bytes(model, optimizers[variant], batch)
    return results


def print_table(name: str, results: dict[str, Result], cuda: bool) -> None:
    mem_label = "step peak MB" if cuda else "saved act. MB"
    show_rss = not cuda and any(r.rss is not None for r in results.values())
    header = "| variant | median step ms | min-max ms |" + ("" if cuda else " median CPU ms |") + f" {mem_label} |"
    header += " peak RSS Δ MB |" if show_rss else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for variant, r in results.items():
        row = f"| {variant} | {r.median_ms:.0f} | {r.spread()} |" + ("" if cuda else f" {r.median_cpu_ms:.0f} |")
        row += f" {r.memory / 2**20:.0f} |"
        if show_rss:
            row += f" {r.rss / 2**20:.0f} |" if r.rss is not None else " n/a |"
        print(row)

    def ratio(a: str, b: str) -> str:
        if a not in results or b not in results:
            return ""
        ra, rb = results[a], results[b]
        text = f"{a}/{b}: time {ra.median_ms / rb.median_ms:.3f}"
        text += "" if cuda else f" (CPU time {ra.median_cpu_ms / rb.median_cpu_ms:.3f})"
        text += f", memory {ra.memory / rb.memory:.3f}"
        if show_rss and ra.rss and rb.rss:
            text += f", peak RSS Δ {ra.rss / rb.rss:.3f}"
        return text

    for text in (ratio("jump_fused", "lora"), ratio("jump_reference", "jump_fused")):
        if text:
            print(text)
    sys.stdout.flush()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        nargs="+",
        default=None,
        choices=sorted(SHAPES),
        help="model shapes to run (default: t5-base smollm2-135m on CPU, t5-large on CUDA)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="transformer layers (T5: per stack). CPU default: 6 for t5-base, 10 for smollm2-135m; "
        "CUDA default: the full depth",
    )
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (CPU 8, CUDA 32)")
    parser.add_argument("--seq-len", type=int, default=None, help="input tokens per sequence (CPU 128, CUDA 512)")
    parser.add_argument("--target-len", type=int, default=None, help="T5 decoder tokens per sequence (32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (CPU 5, CUDA 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per variant (CPU 1, CUDA 3)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-rss", action="store_true", help="skip the CPU peak-RSS measurement")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from transformers/peft
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    names = args.model or (["t5-large"] if cuda else ["t5-base", "smollm2-135m"])
    started = time.perf_counter()
    for name in names:
        results = benchmark(name, args)
        print_table(name, results, cuda)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""Measured inference cost of a model on its current device: forward latency, throughput, memory.

```python
t = time_forward(model, batch_size=8, seq_len=128)      # Timing(median_ms=..., throughput=..., ...)
op_times(model, batch_size=1, seq_len=128)             # {"matmul": ms, "attention": ms, "norm": ms, "other": ms}
out, peak = measure_peak_memory(lambda: model(**batch), device="cuda")
model_bytes(model)                                      # parameters + buffers
```

These are measurements, not counts: they depend on the device, its load, the dtype and the attention kernel. For
exact, device-independent sizes use :func:`vtrans.count`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from vtrans.checks import check_int
from vtrans.errors import ConfigError

R = TypeVar("R")


@dataclass(frozen=True)
class Timing:
    """Forward-pass timing of one input shape (random token ids, no padding)."""

    batch_size: int
    seq_len: int
    median_ms: float
    """Median wall-clock time of one forward pass, in milliseconds."""
    p90_ms: float
    """90th percentile (linear interpolation between the sorted repeats), in milliseconds."""
    throughput: float
    """Sequences per second at the median: ``batch_size / (median_ms / 1000)``."""
    tokens_per_s: float
    """Tokens per second at the median: ``throughput * seq_len``."""
    repeats: int
    """Number of timed forward passes (warm-up passes excluded)."""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _cuda_devices(model: nn.Module, device: torch.device) -> list[torch.device]:
    devices = {p.device for p in model.parameters() if p.is_cuda} | ({device} if device.type == "cuda" else set())
    return sorted(devices, key=str)


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode under ``torch.inference_mode()``; every module's train/eval mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _random_inputs(model: nn.Module, batch_size: int, seq_len: int, vocab_size: int | None,
                   device: str | torch.device | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """Seeded random token ids (batch, seq) in ``[0, vocab_size)``, an all-ones attention mask, and their device."""
    check_int("batch_size", batch_size, 1, what="an int >= 1")
    check_int("seq_len", seq_len, 1, what="an int >= 1")
    check_int("seed", seed, 0, what="an int >= 0")
    config = getattr(model, "config", None)
    if vocab_size is None:
        vocab_size = getattr(config, "vocab_size", None)
        if vocab_size is None:
            raise ConfigError("vocab_size is required: the model has no config.vocab_size; pass vocab_size=...")
        check_int("model.config.vocab_size", vocab_size, 1, what="an int >= 1")
    else:
        check_int("vocab_size", vocab_size, 1, what="an int >= 1")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={limit}; "
                          f"use seq_len <= {limit}")

    dev = torch.device(device) if device is not None else _model_device(model)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(dev)  # (batch, seq)
    attention_mask = torch.ones_like(input_ids)  # (batch, seq)
    return input_ids, attention_mask, dev


def time_forward(model: nn.Module, batch_size: int, seq_len: int, repeats: int = 20, warmup: int = 3,
                 vocab_size: int | None = None, device: str | torch.device | None = None, seed: int = 0) -> Timing:
    """Time ``repeats`` forward passes of ``model`` on random token ids of shape (batch_size, seq_len).

    Inputs are seeded random ids in ``[0, vocab_size)`` (default ``model.config.vocab_size``) with an all-ones
    attention mask, placed on ``device`` (default: the device of the model's first parameter; the model is not moved).
    Runs under ``torch.inference_mode()`` with the model in eval mode; every module's train/eval mode is restored
    afterwards. On CUDA each pass is bracketed by ``torch.cuda.synchronize()`` so the wall clock covers the kernels.
    """
    check_int("repeats", repeats, 1, what="an int >= 1")
    check_int("warmup", warmup, 0, what="an int >= 0")
    input_ids, attention_mask, dev = _random_inputs(model, batch_size, seq_len, vocab_size, device, seed)
    cuda_devices = _cuda_devices(model, dev)

    def sync() -> None:
        for d in cuda_devices:  # every device the model uses: a sharded model may span several
            torch.cuda.synchronize(d)

    times_ms: list[float] = []
    with _inference(model):
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            model(input_ids=input_ids, attention_mask=attention_mask)
            sync()
            if i >= warmup:
                times_ms.append((time.perf_counter() - start) * 1000)
    median_ms = statistics.median(times_ms)
    throughput = batch_size / (median_ms / 1000)
    return Timing(batch_size=batch_size, seq_len=seq_len, median_ms=median_ms, p90_ms=_percentile(times_ms, 0.9),
                  throughput=throughput, tokens_per_s=throughput * seq_len, repeats=repeats)


def measure_peak_memory(fn: Callable[[], R], device: str | torch.device) -> tuple[R, int | None]:
    """Run ``fn()`` and return ``(result, peak)``: the peak bytes allocated on ``device`` above the level at the start.

    On CUDA this resets the device's peak-memory statistics (``torch.cuda.reset_peak_memory_stats``) and reads
    ``torch.cuda.max_memory_allocated`` after ``fn``; it counts tensors allocated by PyTorch's caching allocator only
    (not the CUDA context or other libraries). On any other device the peak is ``None``: CPU memory is not tracked per
    call here; measure it per process in the caller with ``resource.getrusage(resource.RUSAGE_SELF).ru_maxrss``.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    result = fn()
    torch.cuda.synchronize(dev)
    return result, torch.cuda.max_memory_allocated(dev) - before


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


#: Operator categories of :func:`op_times`: aten op names (without ``aten::``) in each; the rest is ``other`` (a norm
#: written as element-wise ops, as transformers' ``LlamaRMSNorm`` is, lands there too).
OP_CATEGORIES: dict[str, tuple[str, ...]] = {
    "matmul": ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "_addmm_activation"),
    "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention", "softmax", "_softmax"),
    "norm": ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"),
}


def op_times(model: nn.Module, batch_size: int, seq_len: int, repeats: int = 3, warmup: int = 1,
             vocab_size: int | None = None, device: str | torch.device | None = None, seed: int = 0
             ) -> dict[str, float]:
    """Where a forward pass spends its time: milliseconds per pass in each :data:`OP_CATEGORIES` category and
    ``other`` (embeddings, activations, adds, copies, views), from ``torch.profiler`` self times (device time on
    CUDA, CPU time otherwise), averaged over ``repeats`` passes; ``total`` is their sum.

    Matrix multiplications are what FLOPs count, so ``matmul`` should shrink with the FLOPs of a compressed model;
    whatever does not (the rest) is why a measured speedup falls short of the FLOPs reduction. The profiler adds its
    own overhead: compare these shares, and time with :func:`time_forward`.
    """
    check_int("repeats", repeats, 1, what="an int >= 1")
    check_int("warmup", warmup, 0, what="an int >= 0")
    input_ids, attention_mask, dev = _random_inputs(model, batch_size, seq_len, vocab_size, device, seed)
    cuda = bool(_cuda_devices(model, dev))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with _inference(model):
        for _ in range(warmup):
            model(input_ids=input_ids, attention_mask=attention_mask)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(repeats):
                model(input_ids=input_ids, attention_mask=attention_mask)
            if cuda:
                torch.cuda.synchronize(dev)
    return categorise(((e.key, e.self_device_time_total if cuda else e.self_cpu_time_total)
                       for e in prof.key_averages()), repeats)


def categorise(self_times_us: Iterable[tuple[str, float]], repeats: int = 1) -> dict[str, float]:
    """``(op name, self time in µs)`` pairs (``aten::addmm``, ...) summed into milliseconds per pass for each
    :data:`OP_CATEGORIES` category, ``other`` and ``total``."""
    category = {op: cat for cat, ops in OP_CATEGORIES.items() for op in ops}
    out = dict.fromkeys([*OP_CATEGORIES, "other"], 0.0)
    for key, us in self_times_us:
        if us:
            out[category.get(key.split("::", 1)[-1], "other")] += us / 1000 / repeats
    out["total"] = sum(out.values())
    return out

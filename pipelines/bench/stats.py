"""The benchmark's numbers: seed statistics (mean ± sample std), ratios of positive measurements (speedups, FLOPs
reductions, time ratios) and the exact budget check. Pure python.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vtrans.checks import check_number
from vtrans.errors import ConfigError

METHOD_ORDER = ("random", "magnitude", "kwon", "vtrans", "fast", "faster")
BASELINES = ("random", "magnitude", "kwon")
VIB_METHODS = ("vtrans", "fast", "faster")
SIZE_KEYS = ("params_blocks", "params_total", "flops_blocks", "flops_total")


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``ddof=1``) of the seeds of one row group."""

    mean: float
    std: float | None
    """None for a single seed (no spread measured) or when a value is infinite."""
    n: int

    def fmt(self, digits: int = 4) -> str:
        """``0.7812 ± 0.0123 (n=3)``; one seed: ``0.7812 (n=1)``."""
        if math.isinf(self.mean):
            return "inf"
        body = f"{self.mean:.{digits}f}" if abs(self.mean) < 1e4 else f"{self.mean:,.0f}"
        if self.std is not None:
            body += f" ± {self.std:.{digits}f}" if abs(self.std) < 1e4 else f" ± {self.std:,.0f}"
        return f"{body} (n={self.n})"


def mean_std(values: Sequence[float]) -> Stat:
    """:class:`Stat` of ``values`` (mean; sample std with ``ddof=1``, None for one value). An infinite value (a
    diverged perplexity) makes the mean ``inf`` and the std None; NaN or an empty list is an error."""
    vals = [float(v) for v in values]
    if not vals:
        raise ConfigError("mean_std needs at least one value, got []")
    if any(math.isnan(v) for v in vals):
        raise ConfigError(f"mean_std got NaN in {vals}; a failed row must not be averaged silently")
    if any(math.isinf(v) for v in vals):
        return Stat(math.inf if any(v > 0 for v in vals if math.isinf(v)) else -math.inf, None, len(vals))
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


GROUP = ("task", "method", "budget", "finetuned")


def aggregate(rows: Iterable[Mapping[str, Any]], value: str = "quality",
              by: Sequence[str] = GROUP) -> dict[tuple, Stat]:
    """``{group key: Stat}`` of ``value`` over the rows of each group (the seeds), groups in first-seen order."""
    groups: dict[tuple, list[float]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in (*by, value) if k not in row]
        if missing:
            raise ConfigError(f"row {i} has no {missing}; it has {sorted(row)}")
        groups.setdefault(tuple(row[k] for k in by), []).append(row[value])
    return {k: mean_std(v) for k, v in groups.items()}


def _positive(name: str, value: float) -> float:
    return check_number(name, value, 0, low_open=True, what="a finite number > 0")


def ratio(numerator: float, denominator: float, what: str = "ratio") -> float:
    """``numerator / denominator`` of two positive finite measurements (speedups, reductions, time ratios)."""
    return _positive(f"{what} numerator", numerator) / _positive(f"{what} denominator", denominator)


def speedup(dense_ms: float, compressed_ms: float) -> float:
    """Measured speedup: dense latency over compressed latency."""
    return ratio(dense_ms, compressed_ms, "speedup")


def flops_reduction(dense_flops: float, compressed_flops: float) -> float:
    """FLOPs reduction: dense FLOPs over compressed FLOPs (> 1 for a smaller model)."""
    return ratio(dense_flops, compressed_flops, "FLOPs reduction")


def speedup_per_flops(speedup_value: float, reduction: float) -> float:
    """Measured speedup over FLOPs reduction: 1.0 when the wall clock gains all that the FLOPs promise."""
    return ratio(speedup_value, reduction, "speedup / FLOPs reduction")


def budget_met(achieved: int, dense: int, fraction: float, tolerance: float) -> bool:
    """Whether an exact count lies in ``[(1 - tolerance) * target, target]`` with ``target = fraction * dense``."""
    target = fraction * dense
    return (1.0 - tolerance) * target <= achieved <= target


def time_ratios(task: Mapping[str, Any]) -> dict[str, float]:
    """``faster_over_vtrans`` (mean compression wall time) and the same per optimizer step; {} without both."""
    def mean_time(method: str) -> tuple[float, int] | None:
        seen, times, steps = set(), [], None
        for r in task["rows"]:
            if r["method"] == method and not r["finetuned"]:
                key = (r["seed"], r.get("compress_group") or r["budget"])
                if key not in seen:
                    seen.add(key)
                    times.append(r["compress_s"])
                    steps = r.get("prune_steps")
        return (statistics.fmean(times), steps) if times else None

    a, b = mean_time("faster"), mean_time("vtrans")
    if a is None or b is None:
        return {}
    out = {"faster_over_vtrans": ratio(a[0], b[0], "faster / vtrans time")}
    if a[1] and b[1]:
        out["faster_over_vtrans_per_step"] = ratio(a[0] / a[1], b[0] / b[1], "per-step time")
    return out


__all__ = ["Stat", "aggregate", "budget_met", "flops_reduction", "mean_std", "ratio", "speedup",
           "speedup_per_flops", "time_ratios"]

"""Pareto fronts of budget-sweep results: which compressed models are not beaten on quality *and* size at once.

Pure python + numpy (+ matplotlib for :func:`plot_front`); never imports ray or mlflow, so the sweep driver can
compute fronts from plain result rows and log the tables and figures itself.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vtrans.errors import ConfigError

SIZE_KEYS: tuple[str, ...] = ("params_blocks", "flops_total", "latency_ms")
"""Size measures a sweep row may carry; each is minimised against the quality objective by :func:`fronts`."""

_GOALS = ("max", "min")
_CHUNK = 256  # rows compared at once: (chunk, n, k) booleans stay a few MiB for n of a few thousand


@dataclass(frozen=True)
class Objective:
    """One axis of a Pareto front."""

    key: str
    """The metric name in each result row, e.g. ``"accuracy"`` or ``"params_blocks"``."""
    goal: Literal["max", "min"]
    """Whether larger (``"max"``) or smaller (``"min"``) values are better."""

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ConfigError(f"objective key must be a non-empty string, got {self.key!r}")
        if self.goal not in _GOALS:
            raise ConfigError(f"objective {self.key!r}: goal must be one of {list(_GOALS)}, got {self.goal!r}")

    @classmethod
    def parse(cls, spec: str) -> Objective:
        """``"accuracy:max"`` -> ``Objective("accuracy", "max")``; the goal is after the last colon."""
        key, sep, goal = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
        if not sep or not key:
            raise ConfigError(f"objective must look like 'KEY:max' or 'KEY:min', got {spec!r}")
        return cls(key, goal)  # type: ignore[arg-type]  # checked in __post_init__


def _value(row: Mapping[str, Any], key: str, index: int, what: str = "point") -> float:
    """``row[key]`` as a float, or a ConfigError naming the row index and key."""
    if key not in row:
        raise ConfigError(f"{what} {index} has no key {key!r}; it has {sorted(row)}")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} {index}: {key!r} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ConfigError(f"{what} {index}: {key!r} is NaN; drop or fix the failed run before computing a front")
    return value


def _scores(points: Sequence[Mapping[str, Any]], objectives: Sequence[Objective]) -> np.ndarray:
    """Objective values with minimised axes negated, so larger is better everywhere.  # (n, k)"""
    sign = [1.0 if o.goal == "max" else -1.0 for o in objectives]
    rows = [[s * _value(p, o.key, i) for s, o in zip(sign, objectives, strict=True)] for i, p in enumerate(points)]
    return np.array(rows, dtype=np.float64).reshape(len(points), len(objectives))


def _dominated(scores: np.ndarray) -> np.ndarray:
    """``out[i]`` is True when some row is >= row i everywhere and > somewhere (larger is better).  # (n,)"""
    n = scores.shape[0]
    out = np.zeros(n, dtype=bool)
    for start in range(0, n, _CHUNK):
        block = scores[start : start + _CHUNK, None, :]  # (b, 1, k): the candidates i
        others = scores[None, :, :]  # (1, n, k): every j
        at_least = (others >= block).all(axis=-1)  # (b, n): j at least as good as i everywhere
        better = (others > block).any(axis=-1)  # (b, n): j strictly better than i somewhere
        out[start : start + block.shape[0]] = (at_least & better).any(axis=1)
    return out


def pareto_front(
    points: Sequence[Mapping[str, float]], objectives: Sequence[Objective], dedupe: bool = False
) -> list[int]:
    """Indices of the non-dominated ``points``, sorted by the first objective (best first), then by index.

    Rules:
      - ``a`` dominates ``b`` when ``a`` is at least as good as ``b`` in every objective and strictly better
        in at least one. So of two points with equal accuracy, only the one with fewer params is on the front.
      - Exact duplicates (equal in every objective) do not dominate each other: every copy of a non-dominated
        point is on the front. With ``dedupe=True`` only the lowest index of each group of duplicates is kept.
      - Every point must hold every objective key as a real number: a missing key, a non-number or NaN raises
        :class:`~vtrans.errors.ConfigError` naming the point index and the key (failed runs are never silently
        dropped). ``±inf`` is allowed and compares as usual.
      - No points -> ``[]``; one point -> ``[0]``.

    Vectorised O(n^2 k) comparison; n is the number of sweep runs (a few thousand at most).
    """
    objectives = list(objectives)
    if not objectives:
        raise ConfigError("pareto_front needs at least one objective, got []")
    if not points:
        return []
    scores = _scores(points, objectives)  # (n, k), larger is better
    front = [int(i) for i in np.flatnonzero(~_dominated(scores))]
    if dedupe:
        seen: set[tuple[float, ...]] = set()
        kept = []
        for i in front:  # ascending index, so the lowest index of each duplicate group wins
            values = tuple(scores[i].tolist())
            if values not in seen:
                seen.add(values)
                kept.append(i)
        front = kept
    return sorted(front, key=lambda i: (-scores[i, 0], i))


def fronts(
    rows: Sequence[Mapping[str, Any]], quality: Objective, size_keys: Sequence[str] = SIZE_KEYS
) -> dict[str, list[int]]:
    """The front of ``quality`` against each size key (minimised), keyed by the size key.

    A size key absent from every row (missing or ``None``, e.g. latency never measured) is skipped; one absent
    from only some rows raises :class:`~vtrans.errors.ConfigError` naming the key and the first such row.
    """
    out: dict[str, list[int]] = {}
    for key in size_keys:
        absent = [i for i, row in enumerate(rows) if row.get(key) is None]
        if len(absent) == len(rows):
            continue
        if absent:
            raise ConfigError(
                f"size key {key!r} is missing from rows {absent[:5]} (of {len(rows)}) but present in others; "
                f"measure it for every run or leave it out of size_keys"
            )
        out[key] = pareto_front(rows, [quality, Objective(key, "min")])
    return out


def _check_front(rows: Sequence[Mapping[str, Any]], front: Sequence[int]) -> None:
    for i in front:
        if not 0 <= i < len(rows):
            raise ConfigError(f"front index {i!r} is out of range for {len(rows)} rows")


def plot_front(
    rows: Sequence[Mapping[str, Any]],
    front: list[int],
    x_key: str,
    y_key: str,
    path: str | Path,
    dense: Mapping[str, float] | None = None,
    title: str = "",
    labels: Sequence[str] | None = None,
) -> Path:
    """PNG scatter of every row (grey) with the front as a coloured step line through its points, the dense model
    as a star when given, and ``labels[i]`` (one per row) written next to each front point; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _check_front(rows, front)
    if labels is not None and len(labels) != len(rows):
        raise ConfigError(f"labels must have one entry per row ({len(rows)}), got {len(labels)}")
    xs = [_value(row, x_key, i, "row") for i, row in enumerate(rows)]
    ys = [_value(row, y_key, i, "row") for i, row in enumerate(rows)]
    on_front = sorted(front, key=lambda i: (xs[i], i))  # left to right, so the step line does not zig-zag

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter(xs, ys, s=14, color="0.65", label=f"runs ({len(rows)})", zorder=1)
    if on_front:
        ax.step([xs[i] for i in on_front], [ys[i] for i in on_front], where="post", color="tab:blue", marker="o",
                lw=1.5, ms=5, label=f"Pareto front ({len(front)})", zorder=2)
    if labels is not None:
        for i in on_front:
            ax.annotate(str(labels[i]), (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if dense is not None:
        dx, dy = _value(dense, x_key, 0, "dense model"), _value(dense, y_key, 0, "dense model")
        ax.scatter([dx], [dy], marker="*", s=160, color="tab:red", label="dense", zorder=3)
    ax.set(xlabel=x_key, ylabel=y_key)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def text_plot(
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[int],
    x_key: str,
    y_key: str,
    dense: Mapping[str, float] | None = None,
    width: int = 56,
    height: int = 14,
) -> str:
    """The plot of :func:`plot_front` in characters, for terminals, logs and markdown: ``o`` a front point, ``.``
    any other row, ``*`` the dense model (drawn over the others where they share a cell); the value range of each
    axis is written at its ends."""
    _check_front(rows, front)
    if width < 2 or height < 2:
        raise ConfigError(f"text_plot needs width and height >= 2, got {width} x {height}")
    points = [(_value(r, x_key, i, "row"), _value(r, y_key, i, "row"), "o" if i in set(front) else ".")
              for i, r in enumerate(rows)]
    points.sort(key=lambda p: p[2] == "o")  # front points drawn last: over the others
    if dense is not None:
        points.append((_value(dense, x_key, 0, "dense model"), _value(dense, y_key, 0, "dense model"), "*"))
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    grid = [[" "] * width for _ in range(height)]
    for x, y, mark in points:
        col = round((x - x0) / (x1 - x0) * (width - 1)) if x1 > x0 else 0
        row = round((y1 - y) / (y1 - y0) * (height - 1)) if y1 > y0 else height - 1
        grid[row][col] = mark
    def fmt(v: float) -> str:
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"

    top, bottom = fmt(y1), fmt(y0)
    pad = max(len(top), len(bottom), len(y_key))
    lines = [f"{y_key:>{pad}}"]
    for r, cells in enumerate(grid):
        label = top if r == 0 else bottom if r == height - 1 else ""
        lines.append(f"{label:>{pad}} |" + "".join(cells).rstrip())
    lines.append(" " * pad + " +" + "-" * width)
    left, right = fmt(x0), fmt(x1)
    lines.append(" " * (pad + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    lines.append(" " * (pad + 2) + f"{x_key}   (o front, . other runs, * dense)".center(width).rstrip())
    return "\n".join(lines)


def front_table(rows: Sequence[Mapping[str, Any]], front: Sequence[int], columns: Sequence[str]) -> list[dict]:
    """The front's rows restricted to ``columns``, in front order (for ``mlflow.log_table``); a column missing
    from a front row raises :class:`~vtrans.errors.ConfigError` naming the column and the row index."""
    _check_front(rows, front)
    table = []
    for i in front:
        missing = [c for c in columns if c not in rows[i]]
        if missing:
            raise ConfigError(f"row {i} has no column(s) {missing}; it has {sorted(rows[i])}")
        table.append({c: rows[i][c] for c in columns})
    return table

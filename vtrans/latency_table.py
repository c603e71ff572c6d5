"""Latency budgets: a per-layer latency table measured on this device, and the selection that meets a latency target.

```python
table = latency_table.table_for(model, batch_size=1, seq_len=128)   # cached per device / family / dtype / threads /
table.predict(keep)                                                 # batch / seq / widths; ms
sel = latency_table.select_latency(geometry, scores, Budget(latency=0.6), table)
```

A table holds, for one model family and input shape on one device, the forward time of one transformer layer's
attention sub-layer as a function of its kept key/value groups, of its FFN sub-layer as a function of its kept neurons
(measured at a small grid of widths and interpolated piecewise-linearly between them; a removed sub-layer, width 0,
costs 0), and the fixed cost outside the sub-layers (embeddings, head, final and post-LN norms). The predicted latency
of a pruned model is ``outside + sum over layers of attention(groups) + ffn(neurons)``.

Every number comes from timing whole models of the compressed class (:mod:`vtrans.modeling_vtrans`) built from the
model's config with the same width in every layer: ``outside`` is the model with every sub-layer removed, and
``attention(k) = (T(every layer k groups, no FFN) - outside) / n_layers`` (the FFN likewise), so a table measures
exactly the code a compressed checkpoint runs. The probes carry constant weights (timing does not depend on the
values) and share every parameter they have in common; the measured values are fitted non-decreasing in the width
(pool adjacent violators: a wider layer never predicts faster).

A table is cached as JSON under ``<cache>/latency/`` (``$VTRANS_CACHE``, :func:`vtrans.assets.cache_root`), named by
the hash of its key (device name, model family and class, attention kernel, dtype, torch threads, batch size, sequence
length, dense widths): a table measured on another device or thread count has another key and is never reused - that
is a miss and measures anew. A file whose stored key is not the key its name stands for is refused. The clock is
injectable (``clock``): tests time with a fake clock and get exact numbers.

Hidden-size pruning is not part of latency budgets: the hidden size stays dense, heads, neurons and whole sub-layers
are pruned.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from vtrans.budget import Geometry, Keep, Scores, Selection, align_steps
from vtrans.checks import check_int
from vtrans.config import Budget
from vtrans.errors import BudgetError, ConfigError

log = logging.getLogger(__name__)

#: Format of a table and of its key; a table of another version is another key (measured anew).
TABLE_VERSION = 1

#: Most grid points per sub-layer: every width up to this many units, else this many widths spread evenly.
HEAD_POINTS = 16
FFN_POINTS = 9

Clock = Callable[[], float]


def default_clock() -> float:
    """The real timer (seconds)."""
    import time

    return time.perf_counter()


def device_name(device: torch.device) -> str:
    """A name of the device kind: ``cuda:NVIDIA H200``, ``cpu:<processor model>``."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        model = ""
        try:
            with open("/proc/cpuinfo") as f:
                model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        except OSError:
            pass
        return f"cpu:{model or platform.processor() or platform.machine()}"
    return device.type


def table_key(model: PreTrainedModel, batch_size: int, seq_len: int) -> dict:
    """What a table is valid for: the device, the model family and class, attention kernel, dtype, torch threads,
    input shape and every dense width."""
    from vtrans import arch as arch_registry

    check_int("budget.batch_size", batch_size, 1, what="a positive integer")
    check_int("budget.seq_len", seq_len, 1, what="a positive integer")
    g = arch_registry.for_model(model).geometry(model)
    p = next(model.parameters())
    config = model.config
    return {"version": TABLE_VERSION, "device": device_name(p.device), "model_type": config.model_type,
            "model_class": type(model).__name__, "attn_implementation": config._attn_implementation,
            "dtype": str(p.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "batch_size": batch_size, "seq_len": seq_len, "vocab_size": config.vocab_size,
            "num_labels": getattr(config, "num_labels", None), "n_layers": g.n_layers, "hidden": g.hidden,
            "n_groups": g.n_groups, "group_size": g.group_size, "head_dim": g.head_dim, "ffn": g.ffn}


def key_difference(have: dict, want: dict) -> str:
    """``threads 1 (table) != 2 (this run), ...`` for the keys that differ."""
    return ", ".join(f"{k} {have.get(k)!r} (table) != {want.get(k)!r} (this run)"
                     for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))


def _interp(points: dict[int, float], x: float) -> float:
    if x <= 0:
        return 0.0
    xs = sorted(points)
    if x >= xs[-1]:
        return points[xs[-1]]
    if x <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:], strict=False):
        if a <= x <= b:
            return points[a] + (points[b] - points[a]) * (x - a) / (b - a)
    raise AssertionError("unreachable")


@dataclass
class LatencyTable:
    """Per-layer latencies (milliseconds) of one model family and input shape on one device (module docstring)."""

    key: dict
    """What the table is valid for (:func:`table_key`)."""
    attention: dict[int, float]
    """Kept key/value groups (grid points) -> ms of one attention sub-layer."""
    ffn: dict[int, float]
    """Kept FFN neurons (grid points) -> ms of one FFN sub-layer."""
    outside_ms: float
    """Every sub-layer removed: embeddings, head, norms."""
    dense_measured_ms: float
    """The dense widths, timed as one model (the additive prediction's check)."""
    cached: bool = field(default=False, compare=False)
    """Whether this table came from the cache (not persisted)."""
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_layers(self) -> int:
        return int(self.key["n_layers"])

    def attention_ms(self, groups: float) -> float:
        """One attention sub-layer with ``groups`` kept key/value groups (0: removed)."""
        key = ("attention", groups)
        if key not in self._memo:
            self._memo[key] = _interp(self.attention, groups)
        return self._memo[key]

    def ffn_ms(self, neurons: float) -> float:
        """One FFN sub-layer with ``neurons`` kept neurons (0: removed)."""
        key = ("ffn", neurons)
        if key not in self._memo:
            self._memo[key] = _interp(self.ffn, neurons)
        return self._memo[key]

    def predict(self, keep: Keep) -> float:
        """Predicted forward latency (ms) of a model with these kept counts (its hidden size is the dense one)."""
        return self.outside_ms + sum(
            (self.attention_ms(keep.groups[i]) if keep.mha[i] else 0.0) + (self.ffn_ms(keep.neurons[i]) if keep.ffn[i]
                                                                            else 0.0)
            for i in range(self.n_layers))

    def predict_soft(self, keep: Keep) -> torch.Tensor:
        """Differentiable :meth:`predict` of soft keep counts (tensors: expected counts, block keep probabilities):
        every sub-layer's cost interpolated piecewise-linearly through (0, 0) and the grid, times its block's keep
        probability. At integer counts it is :meth:`predict`."""

        def interp(points: dict[int, float], x) -> torch.Tensor:
            x = torch.as_tensor(x, dtype=torch.float64)
            xs = [0, *sorted(points)]
            ys = [0.0, *(points[k] for k in sorted(points))]
            xs_t = torch.tensor(xs, dtype=x.dtype, device=x.device)
            ys_t = torch.tensor(ys, dtype=x.dtype, device=x.device)
            xc = x.clamp(0, xs[-1])
            i = torch.searchsorted(xs_t, xc.detach().reshape(1), right=True).clamp(1, len(xs) - 1)
            x0, x1, y0, y1 = xs_t[i - 1], xs_t[i], ys_t[i - 1], ys_t[i]
            return (y0 + (y1 - y0) * (xc - x0) / (x1 - x0)).reshape(())

        total = torch.tensor(self.outside_ms, dtype=torch.float64)
        for i in range(self.n_layers):
            a = interp(self.attention, keep.groups[i]) * torch.as_tensor(keep.mha[i], dtype=torch.float64)
            f = interp(self.ffn, keep.neurons[i]) * torch.as_tensor(keep.ffn[i], dtype=torch.float64)
            total = total.to(a.device) + a + f.to(a.device)
        return total

    @property
    def dense_ms(self) -> float:
        """Predicted latency of the dense model."""
        k = self.key
        return self.outside_ms + self.n_layers * (self.attention_ms(k["n_groups"]) + self.ffn_ms(k["ffn"]))

    def check_key(self, want: dict) -> None:
        """Raise a one-line :class:`ConfigError` unless this table was measured for ``want``."""
        if self.key != want:
            raise ConfigError(f"the latency table was measured for another setting ({key_difference(self.key, want)}); "
                              f"a table is never reused across devices, thread counts or shapes: measure one for this "
                              f"run (latency_table.table_for)")

    def as_dict(self) -> dict:
        return {"key": self.key, "attention": {str(k): v for k, v in sorted(self.attention.items())},
                "ffn": {str(k): v for k, v in sorted(self.ffn.items())}, "outside_ms": self.outside_ms,
                "dense_measured_ms": self.dense_measured_ms, "dense_predicted_ms": self.dense_ms}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        return cls(key=dict(d["key"]), attention={int(k): float(v) for k, v in d["attention"].items()},
                   ffn={int(k): float(v) for k, v in d["ffn"].items()}, outside_ms=float(d["outside_ms"]),
                   dense_measured_ms=float(d["dense_measured_ms"]))


# --------------------------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------------------------


def grid(n: int, points: int) -> list[int]:
    """Widths measured for a structure of ``n`` units: all of 1..n when ``n <= points``, else ``points`` widths spread
    evenly from 1 to ``n``."""
    if n <= points:
        return list(range(1, n + 1))
    return sorted({max(1, round(n * i / (points - 1))) for i in range(points)} | {1, n})


def _probe(model: PreTrainedModel, groups: int, neurons: int, share: PreTrainedModel | None = None
           ) -> PreTrainedModel:
    """A compressed-class model of ``model``'s config with ``groups`` key/value groups and ``neurons`` FFN neurons in
    every layer (0: the sub-layer removed), on the model's device and dtype, constant weights. Every parameter whose
    name and shape ``share`` has too is ``share``'s (embeddings, head, norms: the probes hold one copy)."""
    from transformers.initialization import no_init_weights

    from vtrans import arch as arch_registry
    from vtrans import modeling_vtrans

    adapter = arch_registry.for_model(model)
    g = adapter.geometry(model)
    specs = [{"heads": groups * g.group_size, "kv_heads": groups, "intermediate_size": neurons}
             for _ in range(g.n_layers)]
    config = adapter.compressed_config(model, specs, hidden=g.hidden)
    cls = getattr(modeling_vtrans, adapter.compressed_class_name(model))
    p = next(model.parameters())
    with no_init_weights(), torch.device("meta" if share is not None else p.device):
        probe = cls(config)
    shared = dict(share.named_parameters(remove_duplicate=False)) if share is not None else {}
    with torch.no_grad():
        for name, w in list(probe.named_parameters(remove_duplicate=False)):
            owner, _, leaf = name.rpartition(".")
            module = probe.get_submodule(owner)
            if name in shared and shared[name].shape == w.shape:
                setattr(module, leaf, shared[name])
            elif w.is_meta:
                setattr(module, leaf, torch.nn.Parameter(torch.full(w.shape, 0.02, dtype=p.dtype, device=p.device),
                                                         requires_grad=False))
            else:
                w.data = w.data.to(p.dtype).fill_(0.02)
        if share is not None:  # buffers (position ids, rotary frequencies) as the reference probe has them
            ref = dict(share.named_buffers(remove_duplicate=False))
            for name, buf in list(probe.named_buffers(remove_duplicate=False)):
                owner, _, leaf = name.rpartition(".")
                probe.get_submodule(owner)._buffers[leaf] = ref[name] if name in ref else buf.to(p.device)
    return probe.eval()


def _pav(raw: dict[int, float]) -> dict[int, float]:
    """The non-decreasing least-squares fit of ``raw`` over its sorted widths (pool adjacent violators), >= 0."""
    xs = sorted(raw)
    blocks: list[list[float]] = []  # [mean, count]
    for x in xs:
        blocks.append([max(raw[x], 0.0), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    out: list[float] = []
    for m, c in blocks:
        out += [m] * int(c)
    return dict(zip(xs, out, strict=True))


#: Probes timed together (interleaved, each round against the probe without sub-layers); bounds the memory they hold.
CHUNK = 4


def measure(model: PreTrainedModel, batch_size: int = 1, seq_len: int = 128, *, clock: Clock | None = None,
            repeats: int = 10, warmup: int = 2) -> LatencyTable:
    """Measure the latency table of ``model``'s family on its device (module docstring); nothing is cached.

    The probes are timed in chunks of :data:`CHUNK`, interleaved round by round, each round also timing the probe
    without sub-layers: a sub-layer's time is the median over rounds of the difference within a round (slow drifts of
    the machine's load cancel). ``repeats``: rounds; ``warmup``: untimed passes of every probe first.
    """
    from vtrans import arch as arch_registry
    from vtrans.latency import _inference, _random_inputs

    check_int("repeats", repeats, 1, what="an int >= 1")
    check_int("warmup", warmup, 0, what="an int >= 0")
    clock = clock or default_clock
    key = table_key(model, batch_size, seq_len)
    g = arch_registry.for_model(model).geometry(model)
    L = g.n_layers
    base = _probe(model, 0, 0)
    ids, mask, dev = _random_inputs(base, batch_size, seq_len, None, None, 0)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def once(probe: PreTrainedModel) -> float:
        sync()
        start = clock()
        probe(input_ids=ids, attention_mask=mask)
        sync()
        return (clock() - start) * 1000.0

    widths = [(k, 0) for k in grid(g.n_groups, HEAD_POINTS)] + [(0, n) for n in grid(g.ffn, FFN_POINTS)]
    widths.append((g.n_groups, g.ffn))
    diffs: dict[tuple[int, int], list[float]] = {w: [] for w in widths}
    outside: list[float] = []
    with _inference(base):
        for _ in range(warmup):
            base(input_ids=ids, attention_mask=mask)
        for c in range(0, len(widths), CHUNK):
            chunk = [(w, _probe(model, *w, share=base)) for w in widths[c:c + CHUNK]]
            for _, probe in chunk:
                for _ in range(warmup):
                    probe(input_ids=ids, attention_mask=mask)
            for _ in range(repeats):
                t0 = once(base)
                outside.append(t0)
                for w, probe in chunk:
                    diffs[w].append(once(probe) - t0)
            del chunk
    out = statistics.median(outside)
    attention = _pav({k: statistics.median(diffs[(k, n)]) / L for k, n in widths[:-1] if n == 0 and k > 0})
    ffn = _pav({n: statistics.median(diffs[(k, n)]) / L for k, n in widths[:-1] if k == 0 and n > 0})
    dense = out + statistics.median(diffs[widths[-1]])
    return LatencyTable(key=key, attention=attention, ffn=ffn, outside_ms=out, dense_measured_ms=dense)


def cache_path(key: dict, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/latency/<model_type>-<hash of the key>.json``."""
    from vtrans.assets import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(cache_dir) / "latency" / f"{key['model_type']}-{digest}.json"


def load(path: str | Path, key: dict | None = None) -> LatencyTable:
    """A table file; with ``key``, refused (one line) unless it was measured for that key."""
    path = Path(path)
    try:
        table = LatencyTable.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"latency table {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); delete it to "
                          f"measure anew") from None
    if key is not None and table.key != key:
        raise ConfigError(f"latency table {path} holds a table for another setting ({key_difference(table.key, key)})"
                          f"; it is refused, not reused: delete it to measure anew")
    table.cached = True
    return table


def save(table: LatencyTable, path: str | Path) -> Path:
    """Write ``table`` atomically (a concurrent reader sees the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table.as_dict(), f, indent=1)
    os.replace(tmp, path)
    return path


def table_for(model: PreTrainedModel, batch_size: int = 1, seq_len: int = 128, *, clock: Clock | None = None,
              repeats: int = 10, warmup: int = 2, cache_dir: str | Path | None = None,
              cache: bool = True) -> LatencyTable:
    """The latency table of ``model`` on its device at ``batch_size`` x ``seq_len``: from the cache when one was
    measured for exactly this key (:func:`table_key`), else measured (and cached unless ``cache=False``)."""
    key = table_key(model, batch_size, seq_len)
    path = cache_path(key, cache_dir)
    if cache and path.is_file():
        log.info("latency table: cache hit %s", path)
        return load(path, key)
    log.info("latency table: measuring %s (%s, batch %d x seq %d)", key["model_class"], key["device"], batch_size,
             seq_len)
    table = measure(model, batch_size, seq_len, clock=clock, repeats=repeats, warmup=warmup)
    if cache:
        save(table, path)
    return table


def table_for_budget(model: PreTrainedModel, budget: Budget, table: LatencyTable | None = None) -> LatencyTable:
    """The table a latency ``budget`` of ``model`` selects with: ``table`` when given (refused in one line unless it was
    measured for this model, device, threads and shape), else :func:`table_for` (cached or measured now)."""
    if table is None:
        return table_for(model, budget.batch_size, budget.seq_len)
    table.check_key(table_key(model, budget.batch_size, budget.seq_len))
    return table


# --------------------------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------------------------


def _check_table(g: Geometry, table: LatencyTable) -> None:
    k = table.key
    if (k["n_layers"], k["hidden"], k["n_groups"], k["group_size"], k["head_dim"], k["ffn"]) != (
            g.n_layers, g.hidden, g.n_groups, g.group_size, g.head_dim, g.ffn):
        raise ConfigError(f"the latency table was measured for another shape (layers {k['n_layers']}, hidden "
                          f"{k['hidden']}, {k['n_groups']} key/value groups, FFN {k['ffn']}) than this model's "
                          f"(layers {g.n_layers}, hidden {g.hidden}, {g.n_groups} key/value groups, FFN {g.ffn})")


def _steps(g: Geometry, budget: Budget) -> dict[str, int]:
    steps = align_steps(g, budget)  # one-line errors for alignments wider than a structure
    if steps is None:
        return {"hidden": 1, "groups": 1, "neurons": 1}
    if g.hidden % steps["hidden"]:
        key = "budget.align.hidden" if isinstance(budget.align, dict) else "budget.align"
        raise ConfigError(f"{key}={steps['hidden']}: a latency budget keeps the hidden size {g.hidden}, which is not "
                          f"a multiple of it; give a hidden alignment dividing {g.hidden}")
    return steps


def minimum_ms(g: Geometry, scores: Scores | None, budget: Budget, table: LatencyTable) -> float:
    """The smallest predicted latency any selection reaches: the cost outside the sub-layers plus the never-pruned
    units (``+inf`` scores) rounded up to their alignment."""
    steps = _steps(g, budget)
    total = table.outside_ms
    for i in range(g.n_layers):
        for sc, step, cost in ((None if scores is None else scores.groups[i], steps["groups"], table.attention_ms),
                               (None if scores is None else scores.neurons[i], steps["neurons"], table.ffn_ms)):
            pinned = 0 if sc is None else int((torch.isinf(sc) & (sc > 0)).sum())
            total += cost(-(-pinned // step) * step)
    return total


def check_reachable(g: Geometry, budget: Budget, table: LatencyTable, scores: Scores | None = None) -> None:
    """Raise a one-line :class:`BudgetError` when no selection's predicted latency is <= the latency budget's target."""
    if budget.metric != "latency":
        raise ConfigError(f"a latency table checks a latency budget, got {budget.describe()}")
    _check_table(g, table)
    dense = table.dense_ms
    if not dense > 0:
        raise BudgetError(f"the latency table predicts {dense!r} ms for the dense model: no fraction of it can be "
                          f"selected; measure the table again (a real clock, more repeats)")
    target = budget.value * dense
    low = minimum_ms(g, scores, budget, table)
    if low > target:
        raise BudgetError(f"budget latency={budget.value} = {target:.3f} ms is below the smallest predicted latency "
                          f"the structures reach ({low:.3f} ms = {low / dense:.3f} of the dense {dense:.3f} ms: "
                          f"embeddings, head and norms take {table.outside_ms:.3f} ms); give latency >= "
                          f"{math.ceil(low / dense * 1000) / 1000:g}")


def select_latency(g: Geometry, scores: Scores, budget: Budget, table: LatencyTable) -> Selection:
    """Per-layer kept key/value groups and FFN neurons whose predicted latency (``table``) is <= ``budget.latency``
    times the dense model's predicted latency, keeping as much importance (``scores``) as a greedy search finds.

    Within a sub-layer the best-scored units are kept, so a selection is a count per sub-layer. From the dense counts
    (rounded down to the alignment) the search removes, one step at a time (one unit, or one alignment step), the step
    losing the least importance per millisecond saved - or a whole sub-layer when that is cheaper per millisecond (its
    fixed cost is saved only with its last unit) - until the prediction is <= the target; then it adds back, best
    importance per millisecond first, every step that still fits. Scores are shifted to be >= 0 when some are negative
    (``-log_alpha`` of a VIB posterior); block-gate scores are not used (a sub-layer goes with its last unit); units
    scored ``+inf`` are never removed. The hidden size stays dense. ``achieved``: predicted, target and dense ms,
    ``fraction`` (predicted / dense) and ``of_target`` (predicted / target).
    """
    if budget.metric != "latency":
        raise ConfigError(f"select_latency needs a latency budget, got {budget.describe()}")
    check_reachable(g, budget, table, scores)
    steps = _steps(g, budget)
    L = g.n_layers
    dense_ms = table.dense_ms
    target = budget.value * dense_ms
    group_scores = [scores.groups[i].double() for i in range(L)] + [scores.neurons[i].double() for i in range(L)]
    finite = torch.cat([s[torch.isfinite(s)] for s in group_scores] + [torch.zeros(1, dtype=torch.float64)])
    shift = max(0.0, -float(finite.min()))
    order = [torch.sort(s, descending=True, stable=True).indices for s in group_scores]
    prefix = []  # prefix[j][c]: importance of the c best units of sub-layer j
    for s, o in zip(group_scores, order, strict=True):
        v = (s[o] + shift).clamp_min(0.0)
        prefix.append([0.0, *torch.cumsum(v, 0).tolist()])
    dense = [g.n_groups] * L + [g.ffn] * L
    step = [steps["groups"]] * L + [steps["neurons"]] * L
    cost = [table.attention_ms] * L + [table.ffn_ms] * L
    low = [-(-int((torch.isinf(s) & (s > 0)).sum()) // st) * st for s, st in zip(group_scores, step, strict=True)]
    count = [d // st * st for d, st in zip(dense, step, strict=True)]

    J = 2 * L

    def total(c: list[int]) -> float:
        return table.outside_ms + sum(cost[j](c[j]) for j in range(J))

    def importance(c: list[int]) -> float:
        return sum(prefix[j][c[j]] for j in range(J))

    def remove(c: list[int], floor: list[int]) -> list[int] | None:
        """Greedy removal from ``c`` (never below ``floor``) until the prediction is <= target; None if it cannot."""
        c = list(c)
        version = [0] * J
        heap: list[tuple[float, int, int, int]] = []

        def ratio(j: int, new: int) -> float:
            saved = cost[j](c[j]) - cost[j](new)
            return math.inf if saved <= 0 else (prefix[j][c[j]] - prefix[j][new]) / saved

        def push(j: int) -> None:
            if c[j] - step[j] >= floor[j]:
                heapq.heappush(heap, (ratio(j, c[j] - step[j]), j, c[j] - step[j], version[j]))
            if floor[j] == 0 and c[j] > step[j]:  # the whole sub-layer: its fixed cost goes with its last unit
                heapq.heappush(heap, (ratio(j, 0), j, 0, version[j]))

        for j in range(J):
            push(j)
        current = total(c)
        while current > target and heap:
            _, j, new, v = heapq.heappop(heap)
            if v != version[j]:
                continue
            current += cost[j](new) - cost[j](c[j])
            c[j] = new
            version[j] += 1
            push(j)
        return c if total(c) <= target else None

    def fill(c: list[int]) -> list[int]:
        """Add back the best step per millisecond while anything fits (a step that does not fit never will: the
        prediction only grows, so its sub-layer is done)."""
        c = list(c)
        current = total(c)
        heap: list[tuple[float, int]] = []

        def push(j: int) -> None:
            new = c[j] + step[j]
            if new <= dense[j]:
                extra = cost[j](new) - cost[j](c[j])
                r = (prefix[j][new] - prefix[j][c[j]]) / extra if extra > 0 else math.inf
                heapq.heappush(heap, (-r, j))

        for j in range(J):
            push(j)
        while heap:
            _, j = heapq.heappop(heap)
            extra = cost[j](c[j] + step[j]) - cost[j](c[j])
            if current + extra <= target:
                current += extra
                c[j] += step[j]
                push(j)
        return c

    found = remove(count, low)
    if found is None:  # cannot happen after check_reachable; a guard against a table that is not monotone
        raise BudgetError(f"budget {budget.describe()}: no selection found under {target:.3f} ms")
    count = fill(found)
    # one pass of swaps: a step that no longer fits (a whole head) comes back when removing cheaper units elsewhere
    # to make room keeps more importance
    for j in sorted(range(J), key=lambda j: -(prefix[j][min(count[j] + step[j], dense[j])] - prefix[j][count[j]])):
        if count[j] + step[j] > dense[j]:
            continue
        trial = list(count)
        trial[j] += step[j]
        floor = list(low)
        floor[j] = trial[j]
        trial = remove(trial, floor)
        if trial is not None:
            trial = fill(trial)
            if importance(trial) > importance(count) * (1 + 1e-12):
                count = trial
    current = total(count)

    def top(j: int) -> torch.Tensor:
        keep = torch.zeros(dense[j], dtype=torch.bool)
        keep[order[j][:count[j]]] = True
        return keep

    sel = Selection.normalised(torch.ones(g.hidden, dtype=torch.bool), [top(i) for i in range(L)],
                               [top(L + i) for i in range(L)], torch.tensor([c > 0 for c in count[:L]]),
                               torch.tensor([c > 0 for c in count[L:]]))
    sel.achieved = {"size": current, "target": target, "dense": dense_ms, "fraction": current / dense_ms,
                    "of_target": current / target, "predicted_ms": current, "target_ms": target,
                    "dense_predicted_ms": dense_ms, "outside_ms": table.outside_ms}
    if budget.aligned:
        sel.achieved["align"] = budget.alignment
    return sel

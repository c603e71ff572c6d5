"""Budget accounting as pure functions over keep-counts, and exact budget selection.

A transformer is described by a :class:`Geometry` (dense sizes plus the coefficients of the parts outside the
layers); a pruned one by :class:`Keep` counts per layer. The same count functions take integers (hard masks, exact
counts) or tensors (soft keep probabilities, differentiable expected size for training).

Counting conventions (checked against ``torch.utils.flop_counter.FlopCounterMode`` with eager attention):
- params: every parameter, biases and norms included; ``blocks`` scope = the transformer layers only.
- FLOPs: forward matrix multiplications of one sequence of ``seq_len`` tokens, 2 FLOPs per multiply-add; attention
  scores and the attention-weighted sum are counted densely (no causal halving); norms, activations, softmax and bias
  additions are not counted.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from vtrans.config import Budget
from vtrans.errors import BudgetError, ConfigError

Num = TypeVar("Num", int, float, torch.Tensor)


@dataclass(frozen=True)
class Geometry:
    """Dense shape of a transformer and the coefficients of its size formulas."""

    n_layers: int
    hidden: int
    n_groups: int
    """Prunable attention units per layer: key/value groups (= heads without GQA)."""
    group_size: int
    """Query heads per key/value group (1 without GQA)."""
    head_dim: int
    ffn: int
    ffn_in_mats: int
    """Matrices from hidden to FFN width: 1 (GELU MLP) or 2 (gated, SwiGLU)."""
    q_bias: bool
    kv_bias: bool
    o_bias: bool
    ffn_in_bias: bool
    ffn_out_bias: bool
    norm_params: int
    """Parameters per hidden dimension of one norm: 2 (LayerNorm) or 1 (RMSNorm)."""
    pre_norm: bool
    """Pre-LN blocks own their norm (removed with the block); post-LN norms stay when a block is removed."""
    outside_params_per_hidden: int
    """Parameters outside the layers that scale with the hidden size (embeddings, final norm, head inputs)."""
    outside_params_const: int
    """Parameters outside the layers independent of the hidden size (classifier internals)."""
    outside_flops_per_token_hidden: int
    """FLOPs outside the layers per token per hidden dimension (e.g. 2 * vocab for an LM head)."""
    outside_flops_per_seq_hidden: int
    """FLOPs outside the layers per sequence per hidden dimension (e.g. a pooler reading one token)."""
    outside_flops_per_seq_const: int
    """FLOPs outside the layers per sequence, independent of the hidden size."""
    mha_params_const: int = 0
    """Parameters of a kept attention block independent of its width and the hidden size (Qwen3's per-head q/k
    RMSNorms over ``head_dim``, shared by every head: ``2 * head_dim``); removed with the block."""

    @property
    def heads_per_layer(self) -> int:
        return self.n_groups * self.group_size

    def dense_keep(self) -> Keep:
        """Keep counts of the unpruned model."""
        n = self.n_layers
        return Keep(self.hidden, [self.n_groups] * n, [self.ffn] * n, [1] * n, [1] * n)


@dataclass
class Keep:
    """Kept counts: hidden dims, per-layer key/value groups, FFN neurons, and whether each block is kept (0/1).

    With tensors (soft keep probabilities) these are expectations and the size functions give expected sizes.
    """

    hidden: Num
    groups: list[Num]
    neurons: list[Num]
    mha: list[Num]
    ffn: list[Num]

    def as_ints(self) -> Keep:
        return Keep(int(self.hidden), [int(x) for x in self.groups], [int(x) for x in self.neurons],
                    [int(x) for x in self.mha], [int(x) for x in self.ffn])


def mha_size(g: Geometry, metric: str, d: Num, groups: Num, seq_len: int) -> Num:
    """Size of one attention block with ``groups`` kept key/value groups at hidden size ``d`` (block kept)."""
    q = groups * (g.group_size * g.head_dim)  # query (and attention-output) width
    kv = groups * g.head_dim  # key / value width
    if metric == "params":
        size = d * q + 2 * d * kv + q * d
        size = size + (q if g.q_bias else 0) + (2 * kv if g.kv_bias else 0) + (d if g.o_bias else 0)
        return size + (g.norm_params * d if g.pre_norm else 0) + g.mha_params_const
    s = seq_len
    return 2 * s * (d * q + 2 * d * kv + q * d) + 2 * 2 * s * s * q


def ffn_size(g: Geometry, metric: str, d: Num, neurons: Num, seq_len: int) -> Num:
    """Size of one FFN block with ``neurons`` kept intermediate neurons at hidden size ``d`` (block kept)."""
    if metric == "params":
        size = (g.ffn_in_mats + 1) * d * neurons
        size = size + (g.ffn_in_mats * neurons if g.ffn_in_bias else 0) + (d if g.ffn_out_bias else 0)
        return size + (g.norm_params * d if g.pre_norm else 0)
    return 2 * seq_len * (g.ffn_in_mats + 1) * d * neurons


def layer_size(g: Geometry, metric: str, d: Num, groups: Num, neurons: Num, mha: Num, ffn: Num,
               seq_len: int = 128) -> Num:
    """Size of one transformer layer; post-LN norms are counted whether or not their block is kept."""
    size = mha * mha_size(g, metric, d, groups, seq_len) + ffn * ffn_size(g, metric, d, neurons, seq_len)
    if metric == "params" and not g.pre_norm:
        size = size + 2 * g.norm_params * d
    return size


def outside_size(g: Geometry, metric: str, d: Num, seq_len: int = 128) -> Num:
    """Size of everything outside the transformer layers at hidden size ``d``."""
    if metric == "params":
        return g.outside_params_per_hidden * d + g.outside_params_const
    per_hidden = g.outside_flops_per_token_hidden * seq_len + g.outside_flops_per_seq_hidden
    return per_hidden * d + g.outside_flops_per_seq_const


def size(g: Geometry, keep: Keep, metric: str = "params", scope: str = "blocks", seq_len: int = 128) -> Num:
    """Parameters or FLOPs of the model described by ``keep``, in the ``blocks`` or ``total`` scope."""
    if metric not in ("params", "flops"):
        raise ValueError(f"metric must be 'params' or 'flops', got {metric!r}")
    total = sum(
        layer_size(g, metric, keep.hidden, keep.groups[i], keep.neurons[i], keep.mha[i], keep.ffn[i], seq_len)
        for i in range(g.n_layers)
    )
    if scope == "total":
        total = total + outside_size(g, metric, keep.hidden, seq_len)
    return total


@dataclass(frozen=True)
class Counts:
    """Parameters and FLOPs of a model in both scopes."""

    params_blocks: int
    params_total: int
    flops_blocks: int
    flops_total: int
    seq_len: int

    def get(self, metric: str, scope: str) -> int:
        return getattr(self, f"{metric}_{scope}")

    def as_dict(self) -> dict[str, int]:
        return {"params_blocks": self.params_blocks, "params_total": self.params_total,
                "flops_blocks": self.flops_blocks, "flops_total": self.flops_total, "seq_len": self.seq_len}


def counts(g: Geometry, keep: Keep, seq_len: int = 128) -> Counts:
    """Exact integer counts of a (hard) keep in both scopes."""
    k = keep.as_ints()
    return Counts(*(int(size(g, k, m, s, seq_len)) for m in ("params", "flops") for s in ("blocks", "total")),
                  seq_len=seq_len)


# --------------------------------------------------------------------------------------------------------------------
# Exact budget selection
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Importance scores of every unit (higher = more important); ``+inf`` marks a unit that is never pruned."""

    hidden: torch.Tensor  # (hidden,)
    groups: list[torch.Tensor]  # per layer (n_groups,)
    neurons: list[torch.Tensor]  # per layer (ffn,)
    mha: torch.Tensor  # (n_layers,)
    ffn: torch.Tensor  # (n_layers,)


@dataclass
class Selection:
    """Hard keep masks of every unit. Invariant: a kept block has >= 1 kept unit; a removed block keeps none."""

    hidden: torch.Tensor  # bool (hidden,)
    groups: list[torch.Tensor]  # bool per layer (n_groups,)
    neurons: list[torch.Tensor]  # bool per layer (ffn,)
    mha: torch.Tensor  # bool (n_layers,)
    ffn: torch.Tensor  # bool (n_layers,)
    achieved: dict[str, float] = field(default_factory=dict)

    def keep(self) -> Keep:
        return Keep(int(self.hidden.sum()), [int(x.sum()) for x in self.groups], [int(x.sum()) for x in self.neurons],
                    [int(x) for x in self.mha], [int(x) for x in self.ffn])

    @staticmethod
    def normalised(hidden: torch.Tensor, groups: list[torch.Tensor], neurons: list[torch.Tensor],
                   mha: torch.Tensor, ffn: torch.Tensor) -> Selection:
        """Apply the block rules: a block with no kept unit is removed, and a removed block keeps no unit."""
        mha = mha.clone().bool() & torch.stack([gr.any() for gr in groups])
        ffn = ffn.clone().bool() & torch.stack([ne.any() for ne in neurons])
        groups = [gr.bool() & mha[i] for i, gr in enumerate(groups)]
        neurons = [ne.bool() & ffn[i] for i, ne in enumerate(neurons)]
        return Selection(hidden.bool().clone(), groups, neurons, mha, ffn)


def _selection_at(scores: Scores, tau: float) -> Selection:
    """Units with score >= tau, whose block gate also has score >= tau."""
    return Selection.normalised(
        scores.hidden >= tau, [s >= tau for s in scores.groups], [s >= tau for s in scores.neurons],
        scores.mha >= tau, scores.ffn >= tau,
    )


def align_steps(g: Geometry, budget: Budget) -> dict[str, int] | None:
    """Units per alignment step of ``hidden`` (dimensions), ``groups`` (key/value groups) and ``neurons`` under
    ``budget.align`` (:attr:`vtrans.Budget.align`), or None for an unaligned budget. The ``heads`` alignment ``a``
    is on the attention width ``k * head_dim``: ``k`` steps by ``a / gcd(a, head_dim)`` groups. Raises a one-line
    :class:`ConfigError` when an alignment is larger than the width it aligns."""
    if not budget.aligned:
        return None
    a = budget.alignment

    def key(s: str) -> str:
        return f"budget.align.{s}={a[s]}" if isinstance(budget.align, dict) else f"budget.align={a[s]} ({s})"

    widths = {"hidden": (g.hidden, f"the hidden size {g.hidden}"), "neurons": (g.ffn, f"the FFN width {g.ffn}"),
              "heads": (g.n_groups * g.head_dim, f"the attention width it aligns ({g.n_groups} key/value groups x "
                        f"head_dim {g.head_dim} = {g.n_groups * g.head_dim})")}
    for s, (width, what) in widths.items():
        if a[s] > width:
            raise ConfigError(f"{key(s)} is larger than {what}; give an alignment <= {width}")
    return {"hidden": a["hidden"], "groups": a["heads"] // math.gcd(a["heads"], g.head_dim), "neurons": a["neurons"]}


def select(g: Geometry, scores: Scores, budget: Budget) -> Selection:
    """Pick hard masks over all structures jointly so the kept size is <= target and within tolerance of it.

    First the lowest global score threshold whose kept set fits (the size is monotone in the threshold), then a
    greedy fill in decreasing score order with every unit that still fits (a unit of a removed block reopens it,
    paying the block's fixed cost). The hidden dimension keeps at least its best unit. Raises :class:`BudgetError`
    when no selection lands within ``budget.tolerance`` below the target.

    ``budget.align``: the threshold and fill are then rounded to the alignment (:func:`_align`); the size stays <= the
    target, and how far below it lands is reported in ``achieved["of_target"]`` instead of checked against the
    tolerance (an alignment's granularity may be coarser than the tolerance).
    """
    if budget.metric == "latency":
        raise ConfigError(f"budget {budget.describe()} needs a latency table of the model: use "
                          f"vib.apply_budget(budget) or vtrans.latency_table.select_latency")
    steps = align_steps(g, budget)  # bad alignments fail before any work
    metric, scope, s = budget.metric, budget.scope, budget.seq_len
    dense = int(size(g, g.dense_keep(), metric, scope, s))
    target = budget.target(dense)
    if target >= dense and steps is None:
        full = Selection.normalised(torch.ones(g.hidden, dtype=torch.bool),
                                    [torch.ones(g.n_groups, dtype=torch.bool)] * g.n_layers,
                                    [torch.ones(g.ffn, dtype=torch.bool)] * g.n_layers,
                                    torch.ones(g.n_layers, dtype=torch.bool), torch.ones(g.n_layers, dtype=torch.bool))
        full.achieved = {"size": dense, "target": target, "dense": dense, "fraction": 1.0}
        return full

    hidden_scores = scores.hidden.clone().float()
    hidden_scores[hidden_scores.argmax()] = float("inf")  # at least one hidden dimension
    sc = Scores(hidden_scores, [x.float() for x in scores.groups], [x.float() for x in scores.neurons],
                scores.mha.float(), scores.ffn.float())

    def fits(sel: Selection) -> bool:
        return size(g, sel.keep(), metric, scope, s) <= target

    # 1) binary search over the distinct finite scores (descending) for the lowest threshold that fits
    flat = torch.cat([sc.hidden, *sc.groups, *sc.neurons, sc.mha, sc.ffn])
    cands = torch.unique(flat[torch.isfinite(flat)], sorted=True).flip(0)  # descending
    lo, hi = -1, len(cands) - 1  # invariant: cands[lo] fits (lo=-1: only +inf units), answer in [lo, hi]
    if not fits(_selection_at(sc, float("inf"))):
        raise BudgetError(
            f"budget {budget.describe()} = {target:.0f} is below the size of the structures that are never pruned "
            f"({size(g, _selection_at(sc, float('inf')).keep(), metric, scope, s):.0f})"
        )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(_selection_at(sc, float(cands[mid]))):
            lo = mid
        else:
            hi = mid - 1
    tau = float(cands[lo]) if lo >= 0 else float("inf")
    sel = _selection_at(sc, tau)

    # 2) greedy fill: remaining units in decreasing score order, each taken if the model still fits
    sel = _fill(g, sc, sel, tau, metric, scope, s, target)
    if steps is not None:
        sel = _align(g, sc, sel, steps, metric, scope, s, target, budget)
    k = sel.keep()
    achieved = float(size(g, k, metric, scope, s))
    sel.achieved = {"size": achieved, "target": target, "dense": dense, "fraction": achieved / dense}
    if steps is not None:
        sel.achieved.update(align=budget.alignment, of_target=achieved / target)
        return sel
    if achieved < (1.0 - budget.tolerance) * target:
        raise BudgetError(
            f"budget {budget.describe()} = {target:.0f} cannot be met within tolerance={budget.tolerance:g}: taking "
            f"the units in score order (each one that still fits) reaches {achieved:.0f} ({achieved / dense:.2%} of "
            f"dense); this model's units are coarse for the budget: raise its tolerance or choose another value"
        )
    return sel


def _fill(g: Geometry, sc: Scores, sel: Selection, tau: float, metric: str, scope: str, seq_len: int,
          target: float) -> Selection:
    hidden = sel.hidden.clone()
    groups = [x.clone() for x in sel.groups]
    neurons = [x.clone() for x in sel.neurons]
    mha_gate = sc.mha >= tau  # gates selected by score (a block is live when its gate is open and it has a unit)
    ffn_gate = sc.ffn >= tau
    d = int(hidden.sum())
    ng = [int(x.sum()) for x in groups]
    nn_ = [int(x.sum()) for x in neurons]

    def layer(i: int, d_: int, g_: int, n_: int, open_mha: bool | None = None, open_ffn: bool | None = None) -> float:
        a = mha_gate[i] if open_mha is None else open_mha
        f = ffn_gate[i] if open_ffn is None else open_ffn
        return float(layer_size(g, metric, d_, g_, n_, int(bool(a) and g_ > 0), int(bool(f) and n_ > 0), seq_len))

    def total(d_: int) -> float:
        t = sum(layer(i, d_, ng[i], nn_[i]) for i in range(g.n_layers))
        return t + (float(outside_size(g, metric, d_, seq_len)) if scope == "total" else 0.0)

    current = total(d)
    # candidate units: (score, kind, layer, index) for units not yet kept, in decreasing score (stable by position)
    cand: list[tuple[float, int, int, int]] = []
    for j in torch.nonzero(~hidden).flatten().tolist():
        cand.append((float(sc.hidden[j]), 0, -1, j))
    for i in range(g.n_layers):
        for j in torch.nonzero(~groups[i]).flatten().tolist():
            cand.append((float(sc.groups[i][j]), 1, i, j))
        for j in torch.nonzero(~neurons[i]).flatten().tolist():
            cand.append((float(sc.neurons[i][j]), 2, i, j))
        if not mha_gate[i]:
            cand.append((float(sc.mha[i]), 3, i, -1))
        if not ffn_gate[i]:
            cand.append((float(sc.ffn[i]), 4, i, -1))
    cand.sort(key=lambda c: -c[0])
    for _, kind, i, j in cand:
        if kind == 0:
            new = total(d + 1)
            if new <= target:
                hidden[j] = True
                d, current = d + 1, new
        elif kind == 1:  # a unit of a removed block may reopen it, paying the block's fixed cost
            delta = layer(i, d, ng[i] + 1, nn_[i], open_mha=True) - layer(i, d, ng[i], nn_[i])
            if current + delta <= target:
                groups[i][j] = True
                mha_gate[i] = True
                ng[i] += 1
                current += delta
        elif kind == 2:
            delta = layer(i, d, ng[i], nn_[i] + 1, open_ffn=True) - layer(i, d, ng[i], nn_[i])
            if current + delta <= target:
                neurons[i][j] = True
                ffn_gate[i] = True
                nn_[i] += 1
                current += delta
        elif kind == 3:
            mha_gate[i] = True  # opens the gate; costs nothing until one of its units is added
        else:
            ffn_gate[i] = True
    return Selection.normalised(hidden, groups, neurons, mha_gate, ffn_gate)


def _align(g: Geometry, sc: Scores, sel: Selection, steps: dict[str, int], metric: str, scope: str, seq_len: int,
           target: float, budget: Budget) -> Selection:
    """Round every group's kept count (the hidden size, each layer's key/value groups and FFN neurons) to a multiple
    of its step, keeping the size <= ``target``.

    Every count first goes down to a multiple (its lowest-scored units dropped; a block left without units goes, which
    only lowers the size), then whole steps of the next best units come back in decreasing mean score while they fit
    (a step into a removed block reopens it, paying its fixed cost). A step that does not fit never fits later (all
    counts only grow), so the result is <= target and no further step of any group fits. Units scored ``+inf`` stay:
    a group's count is at least theirs rounded up."""
    L = g.n_layers
    names = ["hidden"] + ["groups"] * L + ["neurons"] * L
    group_scores = [sc.hidden, *sc.groups, *sc.neurons]
    kept = [sel.hidden, *sel.groups, *sel.neurons]
    dense = [g.hidden] + [g.n_groups] * L + [g.ffn] * L
    count: list[int] = []
    for j, (name, scj, keep) in enumerate(zip(names, group_scores, kept, strict=True)):
        step = steps[name]
        pinned = int((torch.isinf(scj) & (scj > 0)).sum())
        low = -(-max(pinned, 1 if name == "hidden" else 0) // step) * step  # the hidden size keeps >= 1 unit
        if low > dense[j]:
            a = budget.alignment["heads" if name == "groups" else name]
            what = {"hidden": "hidden dimensions", "groups": "key/value groups", "neurons": "FFN neurons"}[name]
            raise ConfigError(f"budget.align={budget.align} ({'heads' if name == 'groups' else name}: {a}): "
                              f"{pinned} of {dense[j]} {what} are never pruned by this selection and no multiple of "
                              f"{step} between {pinned} and {dense[j]} keeps them")
        count.append(max(low, int(keep.sum()) // step * step))

    def total(c: list[int]) -> float:
        d = c[0]
        t = sum(float(layer_size(g, metric, d, c[1 + i], c[1 + L + i], int(c[1 + i] > 0), int(c[1 + L + i] > 0),
                                 seq_len)) for i in range(L))
        return t + (float(outside_size(g, metric, d, seq_len)) if scope == "total" else 0.0)

    if total(count) > target:
        raise BudgetError(f"budget {budget.describe()} = {target:.0f} is below the smallest aligned selection "
                          f"({total(count):.0f}: hidden size {count[0]}, the never-pruned units rounded up to their "
                          f"alignment); give a larger budget or a smaller alignment")
    order = [torch.sort(x.double(), descending=True, stable=True).indices for x in group_scores]

    def chunk(j: int) -> tuple[float, int, int] | None:
        """Heap entry of group ``j``'s next step: (minus its mean score, group, count after)."""
        n = count[j] + steps[names[j]]
        if n > dense[j]:
            return None
        mean = float(group_scores[j].double()[order[j][count[j]:n]].mean())
        return (-mean, j, n)

    heap = [c for j in range(len(count)) if (c := chunk(j)) is not None]
    heapq.heapify(heap)
    while heap:
        _, j, n = heapq.heappop(heap)
        trial = count.copy()
        trial[j] = n
        if total(trial) <= target:
            count = trial
            if (c := chunk(j)) is not None:
                heapq.heappush(heap, c)

    def top(j: int) -> torch.Tensor:
        keep = torch.zeros(dense[j], dtype=torch.bool)
        keep[order[j][:count[j]]] = True
        return keep

    groups = [top(1 + i) for i in range(L)]
    neurons = [top(1 + L + i) for i in range(L)]
    return Selection.normalised(top(0), groups, neurons, torch.tensor([c > 0 for c in count[1:1 + L]]),
                                torch.tensor([c > 0 for c in count[1 + L:]]))


def quota_scores(scores: Scores, quotas: Keep) -> Scores:
    """Scores under which :func:`select` keeps, in every group, about ``quota`` units - its best ones by ``scores`` -
    and scales all quotas by one common factor until the budget is met exactly.

    The ``r``-th best unit (0-based) of a group with quota ``q`` scores ``1 - (r + 0.5) / q``: exactly the top
    ``round(q)`` units score above 0, and a global threshold ``tau`` keeps about ``q * (1 - tau)`` units of every
    group. A block gate with keep probability ``p`` scores ``1 - 0.5 / p``. With the quotas of a trained VIB (its
    expected keep counts, :meth:`vtrans.vib.VIB.keep_probs`), the cost of each structure enters the selection through
    what the budget Lagrangian made the masks keep, instead of one global threshold over units whose costs differ by
    two orders of magnitude. ``+inf`` scores (never pruned) stay ``+inf``.
    """

    def group(sc: torch.Tensor, q: Num) -> torch.Tensor:
        q = max(float(q), 1e-6)
        order = torch.sort(sc.float(), descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        out = 1.0 - (rank.float() + 0.5) / q  # (n,)
        return torch.where(torch.isinf(sc) & (sc > 0), sc.float(), out)

    def gates(sc: torch.Tensor, p: list[Num]) -> torch.Tensor:
        out = torch.tensor([1.0 - 0.5 / max(float(x), 1e-6) for x in p])  # (n_layers,)
        return torch.where(torch.isinf(sc) & (sc > 0), sc.float(), out)

    return Scores(group(scores.hidden, quotas.hidden),
                  [group(s, q) for s, q in zip(scores.groups, quotas.groups, strict=True)],
                  [group(s, q) for s, q in zip(scores.neurons, quotas.neurons, strict=True)],
                  gates(scores.mha, quotas.mha), gates(scores.ffn, quotas.ffn))


def check_budget_reachable(g: Geometry, budget: Budget) -> None:
    """Raise :class:`~vtrans.errors.BudgetError` when no selection of a model of geometry ``g`` meets ``budget``
    (:func:`select` on seeded random scores). A latency budget needs a measured table (the reach is checked by
    :func:`vtrans.latency_table.check_reachable` once there is one): here only its alignment is checked."""
    if budget.metric == "latency":
        align_steps(g, budget)
        return
    gen = torch.Generator().manual_seed(0)
    select(g, Scores(torch.rand(g.hidden, generator=gen), [torch.rand(g.n_groups, generator=gen)] * g.n_layers,
                     [torch.rand(g.ffn, generator=gen)] * g.n_layers, torch.rand(g.n_layers, generator=gen),
                     torch.rand(g.n_layers, generator=gen)), budget)

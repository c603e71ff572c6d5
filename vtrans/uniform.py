"""Uniform budget selection: the structures a stock Hugging Face config can express (``Budget(uniform=True)``).

A stock config has one head count, one key/value head count and one FFN width for every layer, and a hidden size tied
to the head count by rules of its own. What each registered architecture can express (:meth:`Adapter.stock_rules`):

- ``llama``: uniform key/value groups and FFN width; whole decoder layers can go (pre-norm: a layer without its blocks
  is the identity) but not a layer's attention or FFN block alone; the hidden size shrinks freely as long as it stays a
  multiple of the query head count (``head_dim`` is a config field).
- ``gpt2``: uniform heads and FFN width; whole layers can go; the hidden size is heads x head size (``n_embd //
  n_head``), so pruning heads prunes the hidden size with them.
- ``bert`` / ``roberta``: post-LayerNorm, so every layer stays (a layer without blocks still applies two LayerNorms);
  with a pooler / classifier (hidden -> hidden) the hidden size and the heads stay dense: only the FFN width shrinks,
  which puts a floor under the reachable size (attention and norms: about 33% of MiniLM's block parameters).

The selection takes the scores the heterogeneous :func:`vtrans.budget.select` takes. Among the uniform shapes
(layers, key/value groups, hidden size) the stock config expresses, each with the widest FFN that fits the budget, it
picks the one within tolerance closest to the proportions of the heterogeneous selection at the same budget (what the
scores keep where nothing is tied), then keeps the best units by score in every layer, and the layers that
heterogeneous selection kept most of.
"""

from __future__ import annotations

import torch

from vtrans.arch.base import StockRules
from vtrans.budget import Geometry, Keep, Scores, Selection, align_steps, layer_size, outside_size, select, size
from vtrans.config import Budget
from vtrans.errors import BudgetError


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` best units (ties: the first), shape (n,)."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[torch.sort(scores.float(), descending=True, stable=True).indices[:k]] = True
    return keep


def _n_inf(t: torch.Tensor) -> int:
    """Units scored ``+inf``: never pruned."""
    return int((torch.isinf(t) & (t > 0)).sum())


def select_uniform(g: Geometry, scores: Scores, budget: Budget, rules: StockRules,
                   reference: Keep | None = None) -> Selection:
    """Hard masks with the same kept key/value groups and FFN neurons in every kept layer, whole layers removed only
    where ``rules.drop_layers``, and a (hidden size, groups) pair of ``rules.shapes``, meeting ``budget`` within its
    tolerance under the target. Raises :class:`BudgetError` with the closest achievable size and the reason when no
    uniform shape lands in the window. ``reference``: the proportions to follow (default: what the heterogeneous
    selection keeps at this budget; ``g.dense_keep()`` for a quick reachability check). ``budget.align``: aligned
    shapes only, the closest under the target when none is within tolerance (``achieved["of_target"]``)."""
    steps = align_steps(g, budget) or {"hidden": 1, "groups": 1, "neurons": 1}  # bad alignments fail first
    metric, scope, s = budget.metric, budget.scope, budget.seq_len
    dense = float(size(g, g.dense_keep(), metric, scope, s))
    target = budget.target(dense)
    low = (1.0 - budget.tolerance) * target
    L = g.n_layers

    # units scored +inf are never pruned: lower bounds on every uniform width
    min_d = max(_n_inf(scores.hidden), 1)
    min_groups = max([_n_inf(x) for x in scores.groups] + [1])
    step_n = steps["neurons"]
    min_neurons = -(-max([_n_inf(x) for x in scores.neurons] + [1]) // step_n) * step_n  # rounded up to a step
    # as in select(), a block goes when it keeps no unit whatever its gate scores: a layer stays for its +inf units
    pinned = [bool(_n_inf(scores.groups[i]) or _n_inf(scores.neurons[i])) for i in range(L)]
    layer_counts = range(max(sum(pinned), 1), L + 1) if rules.drop_layers else [L]
    shapes = [(d, k) for d, k in rules.shapes if d >= min_d and k >= min_groups and d % steps["hidden"] == 0
              and k % steps["groups"] == 0 and min_neurons <= g.ffn]

    # the proportions the heterogeneous selection would keep at this budget (dense proportions if it cannot)
    ref = reference
    if ref is None:
        try:
            ref = select(g, scores, Budget(**{metric: budget.value}, seq_len=s, scope=scope,
                                           tolerance=budget.tolerance)).keep()
        except BudgetError:
            ref = g.dense_keep()
    live = [i for i in range(L) if ref.mha[i] or ref.ffn[i]] or list(range(L))
    ref_frac = (len(live) / L, sum(ref.groups[i] for i in live) / len(live) / g.n_groups, ref.hidden / g.hidden,
                sum(ref.neurons[i] for i in live) / len(live) / g.ffn)

    def total(n_layers: int, d: int, k: int, n: int) -> float:
        t = n_layers * float(layer_size(g, metric, d, k, n, 1, 1, s))
        return t + (float(outside_size(g, metric, d, s)) if scope == "total" else 0.0)

    best, best_dist = None, float("inf")
    below, floor = None, None  # the largest size under the target; the smallest uniform model
    for n_layers in layer_counts:
        for d, k in shapes:
            smallest = total(n_layers, d, k, min_neurons)
            if floor is None or smallest < floor[0]:
                floor = (smallest, n_layers, d, k, min_neurons)
            if smallest > target:
                continue
            lo, hi = min_neurons // step_n, g.ffn // step_n  # the widest FFN that fits, in steps (size grows with it)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if total(n_layers, d, k, mid * step_n) <= target else (lo, mid - 1)
            lo *= step_n
            got = total(n_layers, d, k, lo)
            if below is None or got > below[0]:
                below = (got, n_layers, d, k, lo)
            if got < low:
                continue
            frac = (n_layers / L, k / g.n_groups, d / g.hidden, lo / g.ffn)
            dist = sum((a - b) ** 2 for a, b in zip(frac, ref_frac, strict=True))
            if dist < best_dist:
                best, best_dist = (got, n_layers, d, k, lo), dist
    if best is None and budget.aligned and below is not None:
        best = below  # an aligned budget reports how close it lands (achieved["of_target"])
    if best is None:
        what = budget.describe()
        if below is None:
            why = f"the smallest uniform model has {floor[0]:.0f} ({floor[0] / dense:.2%} of dense)" if floor else (
                "no hidden size / head count pair is expressible" + (
                    f" with widths aligned to {budget.alignment}" if budget.aligned else ""))
        else:
            why = (f"the closest uniform model under it has {below[0]:.0f} ({below[0] / dense:.2%} of dense: "
                   f"{below[1]} layers, hidden {below[2]}, {below[3]} kv groups, {below[4]} FFN neurons)")
        within = "under its target" if budget.aligned else f"within {budget.tolerance:.1%}"
        raise BudgetError(f"budget {what} = {target:.0f} cannot be met {within} by uniform "
                          f"structures: {why}; {rules.note}. Give a larger budget, or drop uniform for a "
                          f"heterogeneous vtrans checkpoint")

    achieved, n_layers, d, k, n = best
    # the layers the heterogeneous selection kept most of (pinned layers first), each at the uniform widths
    weight = [float(layer_size(g, metric, ref.hidden, ref.groups[i], ref.neurons[i], ref.mha[i], ref.ffn[i], s))
              + (float("inf") if pinned[i] else 0.0) for i in range(L)]
    kept = _top(torch.tensor(weight), n_layers)
    sel = Selection(
        hidden=_top(scores.hidden, d),
        groups=[_top(scores.groups[i], k) & kept[i] for i in range(L)],
        neurons=[_top(scores.neurons[i], n) & kept[i] for i in range(L)],
        mha=kept.clone(), ffn=kept.clone(),
    )
    check = float(size(g, sel.keep(), metric, scope, s))
    assert check == achieved, (check, achieved)  # the search's formula and the selection's count agree
    sel.achieved = {"size": achieved, "target": target, "dense": dense, "fraction": achieved / dense}
    if budget.aligned:
        sel.achieved.update(align=budget.alignment, of_target=achieved / target)
    return sel



def check_reachable(g: Geometry, budget: Budget, rules: StockRules) -> None:
    """Raise the :class:`BudgetError` of :func:`select_uniform` when no uniform shape meets ``budget`` (from the
    geometry alone, before any weights are read)."""
    zeros = Scores(torch.zeros(g.hidden), [torch.zeros(g.n_groups)] * g.n_layers, [torch.zeros(g.ffn)] * g.n_layers,
                   torch.zeros(g.n_layers), torch.zeros(g.n_layers))
    select_uniform(g, zeros, budget, rules, reference=g.dense_keep())

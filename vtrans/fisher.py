"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS): a retraining-free baseline.

The four steps of the paper, on the library's units (attention heads = key/value groups under GQA; FFN neurons), in
the same budget and compression machinery as every other scorer:

1. :func:`fisher_information` - the empirical Fisher of the head and neuron masks at ``m = 1``:
   ``F = sum_x g(x) g(x)^T`` with ``g(x) = d loss(x) / d m`` the gradient of ONE sample's task loss (exact per-sample
   gradients, not per-batch ones: every sample of a batch gets its own copy of the masks, so one backward pass gives
   all of them). Kept per layer as blocks: the heads of a layer, the neurons of a layer (Kwon's block-diagonal
   approximation); :func:`fisher_scores` gives the diagonal as :class:`~vtrans.budget.Scores`.
2. :func:`search_masks` - Kwon's mask search: heads and neurons sorted by diagonal Fisher; for every number of kept
   heads the rest of the budget goes to the most important neurons; the combination retaining the most importance
   (= removing the least, under the diagonal approximation) wins. The budget is any :class:`~vtrans.Budget` and is
   met exactly as :func:`vtrans.budget.select` meets it.
3. :func:`rearrange_masks` - within each block, with the kept count fixed, Kwon's greedy re-choice of the pruned
   set Z with the block's full Fisher (interactions of its units), never increasing the block-diagonal estimate of
   the loss increase ``1/(2N) * 1_Z^T F 1_Z``.
4. :func:`tune_masks` - layer by layer, least-squares rescaling of the kept mask values so that every sub-layer's
   output (the residual sum entering the next norm) of the pruned model matches the dense model's on the calibration
   data; the tuned values become the VIB means ``mu``, which :func:`vtrans.compress` folds into the weights.

:func:`kwon_prune` runs all four on a VIB. The hidden dimension is never pruned (Kwon keeps it whole) and a block
goes only when all its units are gone. Loss: cross-entropy with the batch's ``labels`` (sequence classification;
a batch without labels uses the dense model's own arg-max prediction as the label) or the next-token loss (causal
LM; a sample's loss is the mean over its predicted tokens, padding excluded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F_
from torch import nn
from transformers import PreTrainedModel

from vtrans import arch as arch_registry
from vtrans.arch.base import HookPoints
from vtrans.budget import Geometry, Keep, Scores, Selection, align_steps, select, size
from vtrans.config import Budget
from vtrans.errors import BudgetError, ConfigError, UnsupportedModelError
from vtrans.vib import VIB

Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# calibration batches and the task loss
# --------------------------------------------------------------------------------------------------------------------


def _batches(batches: Iterable[Batch]) -> list[Batch]:
    """The calibration batches as a list (they are read several times), checked."""
    if isinstance(batches, dict):
        batches = [batches]
    out = list(batches)
    if not out:
        raise ConfigError("calibration batches are empty; give at least one batch with input_ids (batch, seq)")
    for k, b in enumerate(out):
        ids = b.get("input_ids") if isinstance(b, dict) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            raise ConfigError(f"calibration batch {k} needs input_ids of shape (batch, seq), got "
                              f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else tuple(ids.shape)}")
    return out


def _task(model: PreTrainedModel) -> str:
    name = type(model).__name__
    if "ForSequenceClassification" in name:
        if model.config.num_labels < 2:
            raise ConfigError(f"Fisher masks need a classification loss; num_labels={model.config.num_labels} "
                              "(regression) is not supported")
        return "seq-cls"
    if hasattr(model, "lm_head"):
        return "causal-lm"
    raise ConfigError(f"Fisher masks need a task loss, but model class {name!r} has no head; load it with "
                      "task='seq-cls' or task='causal-lm'")


def _inputs(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    return ids, mask


def _per_sample_loss(model: PreTrainedModel, task: str, batch: Batch) -> torch.Tensor:
    """Task loss of every sample of the batch, shape (batch,)."""
    device = next(model.parameters()).device
    ids, mask = _inputs(batch, device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    if task == "seq-cls":  # logits (batch, labels)
        labels = batch.get("labels")
        target = logits.detach().argmax(-1) if labels is None else labels.to(device).view(-1)
        return F_.cross_entropy(logits.float(), target, reduction="none")
    labels = batch.get("labels")
    target = ids.masked_fill(mask == 0, -100) if labels is None else labels.to(device)
    target = target[:, 1:]  # (batch, seq-1): token t predicts token t+1
    tok = F_.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                           reduction="none").view(target.shape)  # (batch, seq-1)
    n = (target != -100).sum(1)  # (batch,)
    return tok.sum(1) / n.clamp_min(1)


def _hook_points(model: PreTrainedModel) -> tuple[Geometry, HookPoints]:
    adapter = arch_registry.for_model(model)
    if adapter.is_compressed(model.config):
        raise ConfigError(f"model is already compressed by vtrans (model_type={model.config.model_type!r}); "
                          "Fisher masks need the dense model")
    return adapter.geometry(model), adapter.hook_points(model)


@contextlib.contextmanager
def _dense_eval(model: PreTrainedModel) -> Iterator[None]:
    """The dense model in eval mode: VIB masks (if attached) bypassed, dropout off; restored afterwards."""
    vib = getattr(model, "_vtrans_vib", None)
    was = model.training
    model.eval()
    try:
        with vib.disabled() if vib is not None else contextlib.nullcontext():
            yield
    finally:
        model.train(was)


# --------------------------------------------------------------------------------------------------------------------
# 1) Fisher information of the masks
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Fisher:
    """Empirical Fisher ``sum_x g g^T`` of the mask gradients at ``m = 1`` over ``samples`` calibration samples.

    Per layer, a (n, n) block of the heads (key/value groups) and of the neurons, or only their diagonals (n,) when
    computed with ``blocks=False``. float64 on CPU. A sum over the samples (as Kwon's code), not a mean:
    :meth:`loss_increase` divides by ``samples``.
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    samples: int
    hidden: int
    """Hidden size of the model (its dimension is never pruned: scores ``+inf``)."""

    @property
    def blocks(self) -> bool:
        """Whether the per-layer blocks (not only the diagonals) are held."""
        return self.heads[0].dim() == 2

    def head_diag(self, i: int) -> torch.Tensor:
        return self.heads[i].diagonal() if self.blocks else self.heads[i]

    def neuron_diag(self, i: int) -> torch.Tensor:
        return self.neurons[i].diagonal() if self.blocks else self.neurons[i]

    def scores(self) -> Scores:
        """The diagonal Fisher as scores; the hidden dimension and the block gates are never pruned (``+inf``)."""
        L = len(self.heads)
        inf = torch.full((L,), float("inf"))
        return Scores(torch.full((self.hidden,), float("inf")),
                      [self.head_diag(i).float() for i in range(L)],
                      [self.neuron_diag(i).float() for i in range(L)], inf, inf.clone())

    def loss_increase(self, sel: Selection, diagonal: bool = False) -> float:
        """Estimated increase of the mean calibration loss when the pruned units of ``sel`` are removed.

        ``1/(2N) * sum over blocks 1_Z^T F_block 1_Z`` (Kwon's block-diagonal approximation; ``diagonal=True``: only
        the diagonal, i.e. the sum of the removed units' Fisher), Z the units pruned within each layer.
        """
        if not diagonal and not self.blocks:
            raise ConfigError("the block-diagonal estimate needs the Fisher blocks; compute it with blocks=True")
        total = 0.0
        for i in range(len(self.heads)):
            for mats, keep in ((self.heads, sel.groups[i]), (self.neurons, sel.neurons[i])):
                z = (~keep.bool()).double()  # (n,) 1 = pruned
                if diagonal:
                    d = mats[i].diagonal() if self.blocks else mats[i]
                    total += float(d @ z)
                else:
                    total += float(z @ mats[i] @ z)
        return total / (2 * max(self.samples, 1))


def fisher_information(model: PreTrainedModel, batches: Iterable[Batch], blocks: bool = True) -> Fisher:
    """The empirical Fisher of the head (key/value group) and FFN-neuron masks of ``model`` at ``m = 1``.

    ``batches``: dicts with ``input_ids`` (batch, seq), optionally ``attention_mask`` and ``labels`` (as
    :func:`vtrans.data.collate` makes them). Gradients are exact per-sample gradients of each sample's loss (see the
    module docstring). ``blocks=False`` keeps only the diagonals (less memory; no rearrangement then). A VIB attached
    to the model is bypassed: the Fisher is the dense model's.
    """
    batches = _batches(batches)
    g, hp = _hook_points(model)
    task = _task(model)
    L, G, Fn, w = g.n_layers, g.n_groups, g.ffn, g.group_size * g.head_dim
    heads = [torch.zeros((G, G) if blocks else (G,), dtype=torch.float64) for _ in range(L)]
    neurons = [torch.zeros((Fn, Fn) if blocks else (Fn,), dtype=torch.float64) for _ in range(L)]
    param = next(model.parameters())
    masks: dict[str, list[torch.Tensor]] = {}

    def heads_in(i: int, module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (batch, seq, G * w), head-major
        m = masks["heads"][i]  # (batch, G): one mask copy per sample -> per-sample gradients
        return ((x.unflatten(-1, (G, w)) * m[:, None, :, None].to(x.dtype)).flatten(-2), *args[1:])

    def neurons_in(i: int, module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (batch, seq, ffn)
        return (x * masks["neurons"][i][:, None, :].to(x.dtype), *args[1:])

    handles = [mod.register_forward_pre_hook(lambda mod_, a, i=i: heads_in(i, mod_, a), prepend=True)
               for i, mod in enumerate(hp.attn_out)]
    handles += [mod.register_forward_pre_hook(lambda mod_, a, i=i: neurons_in(i, mod_, a), prepend=True)
                for i, mod in enumerate(hp.ffn_out)]
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    samples = 0
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)  # only the masks need gradients
        with _dense_eval(model), torch.enable_grad():
            for batch in batches:
                B = batch["input_ids"].shape[0]
                masks["heads"] = [torch.ones(B, G, device=param.device, requires_grad=True) for _ in range(L)]
                masks["neurons"] = [torch.ones(B, Fn, device=param.device, requires_grad=True) for _ in range(L)]
                loss = _per_sample_loss(model, task, batch).sum()  # sample b's loss depends on its own masks only
                leaves = masks["heads"] + masks["neurons"]
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for k, (leaf, gr) in enumerate(zip(leaves, grads)):
                    gr = torch.zeros_like(leaf) if gr is None else gr
                    gr = gr.detach().double().cpu()  # (batch, n): per-sample gradients
                    acc = heads[k] if k < L else neurons[k - L]
                    acc += gr.T @ gr if blocks else gr.pow(2).sum(0)
                samples += B
    finally:
        for h in handles:
            h.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        masks.clear()
    return Fisher(heads, neurons, samples, g.hidden)


def fisher_scores(model: PreTrainedModel, batches: Iterable[Batch]) -> Scores:
    """Diagonal Fisher importance of every head and neuron (``+inf`` for the hidden dimension and block gates).

    Usable with :meth:`vtrans.VIB.apply_budget` like any scorer (that is the diagonal selection of
    :func:`vtrans.budget.select`, not Kwon's search: use :func:`kwon_prune` for the full method).
    """
    return fisher_information(model, batches, blocks=False).scores()


# --------------------------------------------------------------------------------------------------------------------
# 2) mask search under a budget
# --------------------------------------------------------------------------------------------------------------------


def _check_scores(g: Geometry, scores: Scores) -> None:
    shapes = [tuple(s.shape) for s in scores.groups] + [tuple(s.shape) for s in scores.neurons]
    want = [(g.n_groups,)] * g.n_layers + [(g.ffn,)] * g.n_layers
    if shapes != want:
        raise ConfigError(f"scores do not match the geometry: expected {g.n_layers} layers of {g.n_groups} groups "
                          f"and {g.ffn} neurons, got shapes {shapes}")
    for s in (*scores.groups, *scores.neurons):
        if not torch.isfinite(s).all():
            raise ConfigError("Kwon's search needs finite head and neuron scores (Fisher values), got inf or nan")


def search_masks(g: Geometry, scores: Scores, budget: Budget) -> Selection:
    """Kwon's mask search: the head count and the top heads and neurons (by score) retaining the most importance.

    For every ``h`` (kept heads, the ``h`` best over all layers) the budget left is filled with the best neurons
    (as many as fit; the size is computed exactly with :func:`vtrans.budget.size`, block costs included); the pair
    with the largest sum of kept scores wins (ties: fewer heads). The hidden dimension is kept whole and
    ``scores.hidden`` is ignored. Kwon leaves the last fraction of a unit unused; here it is filled greedily by
    score exactly as :func:`vtrans.budget.select` fills (so the size lands within ``budget.tolerance`` under the
    target whenever the unit sizes allow). Raises :class:`BudgetError` when no candidate lands within it.

    ``budget.align``: the best candidate is rounded to the alignment as :func:`vtrans.budget.select` rounds, by the
    ranking "the candidate's units first, each set by score" (every layer's kept heads and neurons a multiple of their
    step; the hidden size, kept whole, must be a multiple of its alignment); how close it lands is reported.
    """
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget must be a vtrans.Budget, got {budget!r}")
    steps = align_steps(g, budget)  # bad alignments fail before any work
    _check_kept_hidden(g, budget)
    _check_scores(g, scores)
    metric, scope, s = budget.metric, budget.scope, budget.seq_len
    dense = int(size(g, g.dense_keep(), metric, scope, s))
    target = budget.target(dense)
    L, G, Fn = g.n_layers, g.n_groups, g.ffn
    head_sc = torch.stack([x.double() for x in scores.groups]).flatten()  # (L * G,)
    neu_sc = torch.stack([x.double() for x in scores.neurons]).flatten()  # (L * F,)
    h_order = torch.sort(head_sc, descending=True, stable=True).indices
    n_order = torch.sort(neu_sc, descending=True, stable=True).indices
    h_layer, n_layer = h_order // G, n_order // Fn  # layer of the k-th best head / neuron
    h_cum = torch.cat([torch.zeros(1, dtype=torch.float64), head_sc[h_order].cumsum(0)])  # importance of top-k
    n_cum = torch.cat([torch.zeros(1, dtype=torch.float64), neu_sc[n_order].cumsum(0)])

    def fits(h: int, f: int) -> bool:
        groups = torch.bincount(h_layer[:h], minlength=L).tolist()
        neurons = torch.bincount(n_layer[:f], minlength=L).tolist()
        keep = Keep(g.hidden, groups, neurons, [int(c > 0) for c in groups], [int(c > 0) for c in neurons])
        return size(g, keep, metric, scope, s) <= target

    candidates: list[tuple[float, int, int]] = []  # (retained importance, heads, neurons)
    for h in range(L * G + 1):
        if not fits(h, 0):
            break  # more heads never take less room
        lo, hi = 0, L * Fn  # the most neurons that fit: size is monotone in f
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(h, mid):
                lo = mid
            else:
                hi = mid - 1
        candidates.append((float(h_cum[h] + n_cum[lo]), h, lo))
    if not candidates:
        empty = Keep(g.hidden, [0] * L, [0] * L, [0] * L, [0] * L)
        raise BudgetError(f"budget {budget.describe()} = {target:.0f} is below the size of the structures Kwon's "
                          f"method never prunes (hidden dimension, post-LN norms): "
                          f"{size(g, empty, metric, scope, s):.0f}")
    candidates.sort(key=lambda c: (-c[0], c[1]))
    if steps is not None:
        _, h, f = candidates[0]
        return select(g, _ranked(g, h_order[:h], n_order[:f], head_sc, neu_sc), budget)
    first_error: BudgetError | None = None
    for _, h, f in candidates:  # the best candidate, or the next best whose fill meets the tolerance
        groups = torch.zeros(L * G, dtype=torch.bool)
        groups[h_order[:h]] = True
        neurons = torch.zeros(L * Fn, dtype=torch.bool)
        neurons[n_order[:f]] = True
        pinned = _pinned(g, groups.view(L, G), neurons.view(L, Fn), head_sc.view(L, G), neu_sc.view(L, Fn))
        try:
            return select(g, pinned, budget)
        except BudgetError as e:
            first_error = first_error or e
    assert first_error is not None
    raise first_error


def _check_kept_hidden(g: Geometry, budget: Budget) -> None:
    """Kwon's method keeps the hidden size whole: an alignment of it must divide it."""
    a = budget.alignment["hidden"]
    if budget.aligned and g.hidden % a:
        key = "budget.align.hidden" if isinstance(budget.align, dict) else "budget.align"
        raise ConfigError(f"{key}={a}: Kwon's method keeps the hidden size {g.hidden} whole, which is not a multiple "
                          f"of {a}; give a hidden alignment that divides {g.hidden}")


def _ranked(g: Geometry, heads: torch.Tensor, neurons: torch.Tensor, head_sc: torch.Tensor,
            neu_sc: torch.Tensor) -> Scores:
    """Finite scores ranking the given heads and neurons (flat indices) first and then the others, each set by
    ``head_sc`` / ``neu_sc`` (flat, (L * G,) and (L * F,)): the aligned rounding may drop a candidate unit, lowest
    first. Ranks, not score offsets: Fisher values span orders of magnitude that a float32 offset would merge."""
    L = g.n_layers
    pinned = torch.zeros(len(head_sc) + len(neu_sc), dtype=torch.bool)
    pinned[heads] = True
    pinned[len(head_sc) + neurons] = True
    sc = torch.cat([head_sc, neu_sc]).double()  # (L * G + L * F,)
    order = torch.sort(sc, descending=True, stable=True).indices
    order = order[torch.sort((~pinned[order]).int(), stable=True).indices]  # the candidate's units first
    rank = torch.empty(len(sc), dtype=torch.float32)
    rank[order] = torch.arange(len(sc), 0, -1, dtype=torch.float32)  # best = highest
    inf = torch.full((L,), float("inf"))
    return Scores(torch.full((g.hidden,), float("inf")), list(rank[:len(head_sc)].view(L, -1).unbind(0)),
                  list(rank[len(head_sc):].view(L, -1).unbind(0)), inf, inf.clone())


def _pinned(g: Geometry, groups: torch.Tensor, neurons: torch.Tensor, head_sc: torch.Tensor | None = None,
            neu_sc: torch.Tensor | None = None) -> Scores:
    """Scores under which :func:`select` keeps the given units first (``+inf``) and then fills by the other scores.

    groups (L, G), neurons (L, F) bool; unpinned units score ``head_sc`` / ``neu_sc`` (default 0).
    """
    L = g.n_layers

    def pin(keep: torch.Tensor, sc: torch.Tensor | None) -> list[torch.Tensor]:
        base = torch.zeros(keep.shape, dtype=torch.float32) if sc is None else sc.float().clone()
        base[keep] = float("inf")
        return list(base.unbind(0))

    inf = torch.full((L,), float("inf"))
    return Scores(torch.full((g.hidden,), float("inf")), pin(groups, head_sc), pin(neurons, neu_sc), inf,
                  inf.clone())


# --------------------------------------------------------------------------------------------------------------------
# 3) mask rearrangement
# --------------------------------------------------------------------------------------------------------------------


def _rearrange_block(keep: torch.Tensor, F: torch.Tensor, passes: int) -> torch.Tensor:
    """Kwon's greedy rearrangement of one block (keep: bool (n,), F: (n, n) Fisher block).

    Each kept unit in increasing diagonal Fisher joins the pruned set Z, then the unit of Z whose removal leaves the
    smallest ``1_Z^T F 1_Z`` leaves it again (possibly the one that just joined, so the objective never increases).
    """
    keep = keep.clone()
    if keep.all() or not keep.any():
        return keep
    diag = F.diagonal()
    z = (~keep).double()  # (n,) 1 = pruned
    s = F @ z  # (n,) = F 1_Z
    for _ in range(passes):
        changed = False
        kept = torch.nonzero(keep).flatten()
        for x in kept[torch.sort(diag[kept], stable=True).indices].tolist():
            z[x] = 1.0
            s += F[:, x]
            # q(Z+ - r) = q(Z+) - 2 s_r + F_rr: leave out the r of Z+ maximising 2 s_r - F_rr
            gain = torch.where(z > 0, 2 * s - diag, torch.full_like(s, -torch.inf))
            gain[x] = 2 * s[x] - diag[x] + 1e-12 * abs(float(gain[x]))  # ties (and rounding) keep the old set
            r = int(gain.argmax())
            z[r] = 0.0
            s -= F[:, r]
            if r != x:
                keep[x], keep[r] = False, True
                changed = True
        if not changed:
            break
    return keep


def rearrange_masks(sel: Selection, fisher: Fisher, passes: int = 1) -> Selection:
    """Kwon's mask rearrangement: per layer and unit type, the kept count fixed, re-choose the kept units with the
    block-diagonal Fisher (interactions of the units of one block) so that the estimate
    :meth:`Fisher.loss_increase` never increases. ``passes``: greedy passes over the kept units (Kwon: 1; more
    stop early once a pass changes nothing)."""
    if not fisher.blocks:
        raise ConfigError("mask rearrangement needs the Fisher blocks; compute them with "
                          "fisher_information(..., blocks=True)")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ConfigError(f"rearrangement passes must be an int >= 1, got {passes!r}")
    L = len(fisher.heads)
    groups = [_rearrange_block(sel.groups[i], fisher.heads[i], passes) for i in range(L)]
    neurons = [_rearrange_block(sel.neurons[i], fisher.neurons[i], passes) for i in range(L)]
    out = Selection.normalised(sel.hidden, groups, neurons, sel.mha, sel.ffn)
    out.achieved = dict(sel.achieved)
    return out


# --------------------------------------------------------------------------------------------------------------------
# 4) mask tuning
# --------------------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends a forward pass once the tensors needed are captured."""


@dataclass
class LayerFit:
    """Least-squares fit of one sub-layer's kept mask values (errors: relative squared error of its output)."""

    layer: int
    block: str
    """``mha`` or ``ffn``."""
    units: int
    error_before: float
    """``||s - t||^2 / ||t||^2`` over the calibration tokens with the mask values before tuning, s = pruned model's
    sub-layer output (residual sum), t = dense model's."""
    error_after: float
    """The same with the tuned values (equal to ``error_before`` when the fit was rejected)."""
    accepted: bool


def _norm_after(hp: HookPoints, g: Geometry, i: int, block: str) -> nn.Module:
    """The norm whose input is the residual sum right after sub-layer (i, block): ``norms[1 + 2i (+1 for ffn)]``."""
    if len(hp.norms) != 2 * g.n_layers + 1:
        raise UnsupportedModelError(f"mask tuning needs the {2 * g.n_layers + 1} norms of a {g.n_layers}-layer model "
                                    f"(one after every sub-layer), the adapter lists {len(hp.norms)}")
    return hp.norms[1 + 2 * i + (block == "ffn")]


def _layers(model: PreTrainedModel, hp: HookPoints) -> list[nn.Module]:
    """Each layer's module: the innermost module holding both its attention and FFN output projections."""
    names = {mod: name for name, mod in model.named_modules()}
    layers = []
    for a, f in zip(hp.attn_out, hp.ffn_out):
        pa, pf = names[a].split("."), names[f].split(".")
        n = 0
        while n < min(len(pa), len(pf)) and pa[n] == pf[n]:
            n += 1
        layers.append(model.get_submodule(".".join(pa[:n])))
    if len(set(map(id, layers))) != len(layers):
        raise UnsupportedModelError(f"cannot find the layer modules of {type(model).__name__} for mask tuning")
    return layers


def _out_weight(module: nn.Module, width_in: int) -> torch.Tensor:
    """The projection's weight as (out, in) (``nn.Linear`` or a GPT-2 ``Conv1D`` (in, out))."""
    w = module.weight
    w = w if isinstance(module, nn.Linear) else w.t()
    if w.shape[1] != width_in:
        raise UnsupportedModelError(f"unexpected weight shape {tuple(module.weight.shape)} of "
                                    f"{type(module).__name__} for input width {width_in}")
    return w


def _layer_inputs(model: PreTrainedModel, layer: nn.Module, batch: Batch) -> tuple[tuple, dict]:
    """The positional and keyword arguments of ``layer`` (the first layer) in a forward pass of ``batch``."""
    got: list[tuple[tuple, dict]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((args, kwargs))
        raise _Stop

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    ids, mask = _inputs(batch, next(model.parameters()).device)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


def _hidden_of(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: tuple[tuple, dict], h: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _run_layer(layer: nn.Module, call: tuple[tuple, dict], h: torch.Tensor, grab: list[nn.Module],
               stop: nn.Module | None = None) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """Run one layer on hidden state ``h`` (other arguments from ``call``): the first input of each module in
    ``grab`` (before any VIB scaling; None if not called) and the output (None when stopped at ``stop``'s input)."""
    got: dict[int, torch.Tensor] = {}

    def hook(k: int, module: nn.Module, args: tuple) -> None:
        got.setdefault(k, args[0].detach())
        if module is stop:
            raise _Stop

    handles = [mod.register_forward_pre_hook(lambda mod_, a, k=k: hook(k, mod_, a), prepend=True)
               for k, mod in enumerate(grab)]
    args, kwargs = _with_hidden(call, h)
    out = None
    try:
        out = layer(*args, **kwargs)
        out = (out[0] if isinstance(out, tuple) else out).detach()
    except _Stop:
        pass
    finally:
        for hd in handles:
            hd.remove()
    return [got.get(k) for k in range(len(grab))], out


@torch.no_grad()
def tune_masks(vib: VIB, batches: Iterable[Batch], scale_range: tuple[float, float] = (-10.0, 10.0)) -> list[LayerFit]:
    """Kwon's mask tuning: sub-layer by sub-layer (attention then FFN, layer 0 first), the kept mask values ``a`` of
    the block minimise ``||s(a) - t||^2`` over the real calibration tokens, where ``s(a)`` is the pruned model's
    residual sum after the sub-layer (its input coming from the already tuned earlier sub-layers) and ``t`` the dense
    model's (its input from the dense model).

    ``s`` is linear in ``a``: ``s(a) = s(m) + sum_j (a_j - m_j) c_j`` with ``c_j`` unit j's contribution (its input
    slice times its output-projection columns, times the block gate and hidden mask values), so the normal equations
    are accumulated over the batches and solved with ``torch.linalg.lstsq`` (float64). A solution with a value
    outside ``scale_range`` (an ill-conditioned system, which Kwon also refuses) or that does not lower the error is
    rejected and the values stay. The tuned values are written into the VIB means ``mu`` of the kept units. The model
    is run layer by layer (each layer called with the arguments captured from a full forward pass), so the cost is
    about four forward passes over the batches.
    """
    batches = _batches(batches)
    if not isinstance(vib, VIB):
        raise ConfigError(f"tune_masks needs a vtrans.VIB (vtrans.attach(model)), got {type(vib).__name__}")
    lo, hi = (float(x) for x in scale_range)
    if not lo < hi:
        raise ConfigError(f"scale_range must be (low, high) with low < high, got {scale_range!r}")
    model, g = vib.model, vib.geometry
    _, hp = _hook_points(model)
    layers = _layers(model, hp)
    device = next(model.parameters()).device
    sel = vib.selection()
    kept_dims = sel.hidden.to(device)
    real = [_inputs(b, device)[1].bool() for b in batches]  # (batch, seq) per batch

    def tokens(x: torch.Tensor, b: int) -> torch.Tensor:
        return x[real[b]].double()  # (batch, seq, n) -> (N, n)

    was = model.training
    model.eval()
    fits: list[LayerFit] = []
    try:
        with vib.disabled():
            t_calls = [_layer_inputs(model, layers[0], b) for b in batches]
        s_calls = [_layer_inputs(model, layers[0], b) for b in batches]
        t_h = [_hidden_of(c) for c in t_calls]  # (batch, seq, d) per batch: the dense model's layer input
        s_h = [_hidden_of(c) for c in s_calls]  # the pruned model's
        for i, layer in enumerate(layers):
            after = {blk: _norm_after(hp, g, i, blk) for blk in ("mha", "ffn")}
            targets: dict[str, list[torch.Tensor]] = {"mha": [], "ffn": []}
            with vib.disabled():  # the dense model's sums after both sub-layers, and its next hidden states
                for b in range(len(batches)):
                    (t_mha, t_ffn), out = _run_layer(layer, t_calls[b], t_h[b], [after["mha"], after["ffn"]])
                    targets["mha"].append(tokens(t_mha, b)[:, kept_dims])
                    targets["ffn"].append(tokens(out if t_ffn is None else t_ffn, b)[:, kept_dims])
                    t_h[b] = out
            for blk in ("mha", "ffn"):
                keep = sel.groups[i] if blk == "mha" else sel.neurons[i]
                if (vib.heads if blk == "mha" else vib.neurons) is None or not keep.any():
                    continue
                fits.append(_tune_block(vib, layer, s_calls, s_h, targets[blk], tokens, hp, i, blk, keep, after[blk],
                                        kept_dims, lo, hi))
            vib._cache.clear()  # the layers are called directly: drop the VIB's per-forward cache of mask values
            s_h = [_run_layer(layer, s_calls[b], s_h[b], [])[1] for b in range(len(batches))]
    finally:
        vib._cache.clear()
        model.train(was)
    return fits


def _tune_block(vib: VIB, layer: nn.Module, calls: list, hs: list[torch.Tensor], targets: list[torch.Tensor], tokens,
                hp: HookPoints, i: int, block: str, keep: torch.Tensor, norm: nn.Module, kept_dims: torch.Tensor,
                lo: float, hi: float) -> LayerFit:
    g = vib.geometry
    w = g.group_size * g.head_dim
    proj = (hp.attn_out if block == "mha" else hp.ffn_out)[i]
    vib._cache.clear()
    values = vib.hard_values()
    device = kept_dims.device
    kept = torch.nonzero(keep).flatten().to(device)  # (k,)
    m = (values["groups"] if block == "mha" else values["neurons"])[i].to(device)[kept].double()  # (k,) current
    gvec = (values[block][i] * values["hidden"]).to(device).double()[kept_dims]  # (d',) gate x hidden mask on output
    W = _out_weight(proj, g.n_groups * w if block == "mha" else g.ffn).detach()[kept_dims].double()  # (d', in)
    k = len(kept)
    ata = torch.zeros(k, k, dtype=torch.float64, device=device)
    atb = torch.zeros(k, dtype=torch.float64, device=device)
    err0 = norm_t = 0.0
    for b in range(len(hs)):
        (x, s), out = _run_layer(layer, calls[b], hs[b], [proj, norm], stop=norm)
        x = tokens(x, b)  # (N, in): the projection's input before the masks
        s = tokens(out if s is None else s, b)[:, kept_dims]  # (N, d'): the pruned model's residual sum
        t = targets[b]  # (N, d')
        r = t - s
        if block == "mha":
            cols = (kept[:, None] * w + torch.arange(w, device=device)[None, :])  # (k, w) input columns per group
            c = torch.bmm(x[:, cols].permute(1, 0, 2), W[:, cols].permute(1, 2, 0)) * gvec  # (k, N, d')
            ata += torch.einsum("ind,jnd->ij", c, c)
            atb += torch.einsum("ind,nd->i", c, r)
        else:
            a = x[:, kept]  # (N, k) activations of the kept neurons
            wk = W[:, kept] * gvec[:, None]  # (d', k) their output columns
            ata += (a.T @ a) * (wk.T @ wk)
            atb += (a * (r @ wk)).sum(0)
        err0 += float(r.pow(2).sum())
        norm_t += float(t.pow(2).sum())
    delta = torch.linalg.lstsq(ata.cpu(), atb.cpu()[:, None]).solution[:, 0].to(device)  # (k,)
    new = m + delta
    err1 = err0 - 2 * float(delta @ atb) + float(delta @ ata @ delta)
    ok = bool(torch.isfinite(new).all()) and float(new.min()) >= lo and float(new.max()) <= hi and err1 < err0
    if ok:
        mask = (vib.heads if block == "mha" else vib.neurons)[i]
        mask.mu[kept.to(mask.mu.device)] = new.to(device=mask.mu.device, dtype=mask.mu.dtype)
        vib._cache.clear()
    denom = max(norm_t, 1e-300)
    return LayerFit(i, block, k, err0 / denom, (err1 if ok else err0) / denom, ok)


@torch.no_grad()
def layer_errors(vib: VIB, batches: Iterable[Batch]) -> list[float]:
    """Relative squared error ``||s - t||^2 / ||t||^2`` of the masked model's residual sum after every sub-layer
    (attention 0, FFN 0, attention 1, ...) against the dense model's, over the real tokens of ``batches`` (eval mode,
    kept hidden dimensions)."""
    batches = _batches(batches)
    model, g = vib.model, vib.geometry
    _, hp = _hook_points(model)
    norms = [_norm_after(hp, g, i, b) for i in range(g.n_layers) for b in ("mha", "ffn")]
    device = next(model.parameters()).device
    kept_dims = vib.selection().hidden.to(device)
    num = torch.zeros(len(norms), dtype=torch.float64)
    den = torch.zeros(len(norms), dtype=torch.float64)
    was = model.training
    model.eval()
    try:
        for batch in batches:
            ids, amask = _inputs(batch, device)
            outs: dict[bool, list[torch.Tensor]] = {}
            for dense in (True, False):
                got: list[torch.Tensor] = []
                handles = [n.register_forward_pre_hook(lambda mod, a, got=got: got.append(a[0].detach()),
                                                       prepend=True) for n in norms]
                try:
                    with vib.disabled() if dense else contextlib.nullcontext():
                        model(input_ids=ids, attention_mask=amask, use_cache=False)
                finally:
                    for h in handles:
                        h.remove()
                outs[dense] = got
            real = amask.bool()
            for k, (t, s) in enumerate(zip(outs[True], outs[False])):
                t, s = t[real][:, kept_dims].double(), s[real][:, kept_dims].double()  # (N, d')
                num[k] += float((s - t).pow(2).sum())
                den[k] += float(t.pow(2).sum())
    finally:
        model.train(was)
    return (num / den.clamp_min(1e-300)).tolist()


# --------------------------------------------------------------------------------------------------------------------
# the whole method
# --------------------------------------------------------------------------------------------------------------------


def kwon_prune(vib: VIB, batches: Iterable[Batch], budget: Budget, *, rearrange: bool = True, tune: bool = True,
               passes: int = 1, scale_range: tuple[float, float] = (-10.0, 10.0), table=None) -> Selection:
    """Prune ``vib.model`` to ``budget`` with Kwon et al.'s retraining-free method; ``vtrans.compress(vib)`` then
    gives the pruned, mask-tuned model.

    Every mask mean is reset to 1, the Fisher of the dense model is taken on ``batches`` (the calibration data),
    the search picks the kept heads and neurons, ``rearrange`` re-chooses them within each block, the selection is
    fixed on the VIB (``vib.apply_budget``, method ``"kwon"``), and ``tune`` rescales the kept mask values by least
    squares (:func:`tune_masks`). Returns the selection (its ``achieved`` sizes as :func:`vtrans.budget.select`).

    A latency budget (``Budget(latency=...)``) searches with the latency table of the model on its device
    (``table``, else cached or measured before the Fisher pass; :mod:`vtrans.latency_table`): the diagonal Fisher
    scores per millisecond saved (:func:`vtrans.latency_table.select_latency`) instead of the parameter / FLOP search,
    then rearrangement and tuning as for any budget.
    """
    if not isinstance(vib, VIB):
        raise ConfigError(f"kwon_prune needs a vtrans.VIB: vib = vtrans.attach(model), got {type(vib).__name__}")
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget must be a vtrans.Budget, got {budget!r}")
    if budget.uniform:
        raise ConfigError("budget.uniform=true: Kwon et al.'s mask search chooses every layer's widths on its own; "
                          "use a VIB method or the magnitude / random scorer for a uniform (stock) model")
    align_steps(vib.geometry, budget)  # bad alignments fail before the Fisher pass
    _check_kept_hidden(vib.geometry, budget)
    if budget.metric == "latency":  # the table, and a target no selection reaches, before the Fisher pass
        from vtrans import latency_table

        table = latency_table.table_for_budget(vib.model, budget, table)
        latency_table.check_reachable(vib.geometry, budget, table)
    if vib.heads is None or vib.neurons is None:
        raise ConfigError(f"kwon_prune needs head and neuron masks; the VIB has structures "
                          f"{list(vib.config.structures)}")
    batches = _batches(batches)
    with torch.no_grad():
        for _, m in vib.masks():
            m.mu.fill_(1.0)  # Kwon's masks are 1 (kept) or 0 (pruned) until tuned
    fisher = fisher_information(vib.model, batches, blocks=rearrange)
    g = vib.geometry
    if budget.metric == "latency":
        sel = latency_table.select_latency(g, fisher.scores(), budget, table)
    else:
        sel = search_masks(g, fisher.scores(), budget)
    if rearrange:  # the same counts per block: the same size and predicted latency
        sel = rearrange_masks(sel, fisher, passes)
    final = vib.apply_budget(budget, scores=_pinned(g, torch.stack(sel.groups), torch.stack(sel.neurons)),
                             method="kwon", table=table)
    if not all(torch.equal(a, b) for a, b in zip(final.groups + final.neurons, sel.groups + sel.neurons)):
        raise RuntimeError("internal: the budget selection changed Kwon's masks")  # select reproduces a filled set
    if tune:
        tune_masks(vib, batches, scale_range)
    return final


__all__ = ["Fisher", "LayerFit", "fisher_information", "fisher_scores", "kwon_prune", "layer_errors",
           "rearrange_masks", "search_masks", "tune_masks"]

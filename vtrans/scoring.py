"""Importance scores that need no training: baselines, and the first end-to-end path.

Scores are comparable across structure types because each type's scores are divided by their mean within a layer
(the hidden dimension: over the whole model). Block gates score ``+inf``: a block is removed only when it has no
unit left.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from vtrans import arch as arch_registry
from vtrans.arch.base import Slot
from vtrans.budget import Scores
from vtrans.errors import ConfigError

SCORERS = ("magnitude", "random")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.mean().clamp_min(1e-12)


def random(model: PreTrainedModel, seed: int = 0) -> Scores:
    """Uniform random unit scores (a seeded baseline)."""
    g = arch_registry.for_model(model).geometry(model)
    gen = torch.Generator().manual_seed(seed)
    inf = torch.full((g.n_layers,), float("inf"))
    return Scores(torch.rand(g.hidden, generator=gen),
                  [torch.rand(g.n_groups, generator=gen) for _ in range(g.n_layers)],
                  [torch.rand(g.ffn, generator=gen) for _ in range(g.n_layers)], inf, inf.clone())


@torch.no_grad()
def _slot_norms(sd: dict[str, torch.Tensor], slots: list[Slot], n: int, p: float) -> torch.Tensor:
    """Sum over the feeding slots of ``|w|^p`` per unit, then the p-th root. Shape (n,)."""
    acc = torch.zeros(n, dtype=torch.float64)
    for slot in slots:
        if not slot.feeds:
            continue
        t = sd[slot.key].detach().double().abs().pow(p)
        t = t.movedim(slot.axis, 0)[slot.offset : slot.offset + n * slot.width]  # (n * width, ...)
        acc += t.reshape(n, -1).sum(1)
    return acc.pow(1.0 / p).float()


@torch.no_grad()
def magnitude(model: PreTrainedModel, p: float = 2.0) -> Scores:
    """L1 (``p=1``) or L2 (``p=2``) norms of the weights feeding each unit, normalised per type and layer."""
    if p not in (1, 2, 1.0, 2.0):
        raise ConfigError(f"magnitude scorer norm p must be 1 or 2, got {p!r}")
    adapter = arch_registry.for_model(model)
    g = adapter.geometry(model)
    lay = adapter.layout(model)
    sd = model.state_dict()
    inf = torch.full((g.n_layers,), float("inf"))
    return Scores(
        _normalise(_slot_norms(sd, lay.hidden, g.hidden, p)),
        [_normalise(_slot_norms(sd, lay.groups[i], g.n_groups, p)) for i in range(g.n_layers)],
        [_normalise(_slot_norms(sd, lay.neurons[i], g.ffn, p)) for i in range(g.n_layers)],
        inf, inf.clone(),
    )


def score(model: PreTrainedModel, scorer: str, seed: int = 0) -> Scores:
    """Scores of a named scorer (``magnitude`` or ``random``)."""
    if scorer == "magnitude":
        return magnitude(model)
    if scorer == "random":
        return random(model, seed=seed)
    if scorer == "fisher":  # needs calibration data, which this signature has not
        raise ConfigError("scorer 'fisher' needs calibration batches: use vtrans.fisher.fisher_scores(model, batches) "
                          "or vtrans.kwon_prune(vib, batches, budget) (Kwon et al. 2022, the whole method)")
    raise ConfigError(f"scorer must be one of {list(SCORERS)}, got {scorer!r}")

"""``attach``: VIB masks on every structure of a Hugging Face transformer, by hooks (the model's weights, module
tree and state dict stay exactly as they were).

Masked forward pass (the same in training and evaluation; ``z`` is sampled in training, ``mu * keep`` otherwise):
- every attention head (key/value group) scales its output before the output projection; every FFN neuron scales
  its activation before the down projection;
- each attention / FFN block's output is scaled by its block gate and by the hidden mask ``z_h``;
- every norm is computed over the kept hidden dimensions only and its output scaled by ``z_h``; embeddings that feed
  the residual stream directly (pre-LN models) are scaled by ``z_h``.
In evaluation this is exactly what the physically compressed model computes (see :mod:`vtrans.compress`).
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from vtrans import arch as arch_registry
from vtrans.arch.base import Adapter
from vtrans.budget import Geometry, Keep, Scores, Selection, quota_scores, select, size
from vtrans.config import Budget, VIBConfig
from vtrans.errors import ConfigError
from vtrans.masks import VIBMask
from vtrans.uniform import select_uniform


class VIB(nn.Module):
    """The masks of one model and the hooks that apply them. Create it with :func:`attach`."""

    def __init__(self, model: PreTrainedModel, config: VIBConfig, adapter: Adapter) -> None:
        super().__init__()
        self.config = config
        self.adapter = adapter
        self._model = [model]  # a list so the model is not registered as a sub-module of the masks
        self.geometry: Geometry = adapter.geometry(model)
        g, s = self.geometry, set(config.structures)
        gen = torch.Generator().manual_seed(config.seed) if config.seed is not None else None

        def mask(n: int) -> VIBMask:
            return VIBMask(n, config.mu_init, config.mu_init_std, config.logvar_init, config.logvar_init_std, gen)

        self.hidden = mask(g.hidden) if "hidden" in s else None
        self.heads = nn.ModuleList(mask(g.n_groups) for _ in range(g.n_layers)) if "heads" in s else None
        self.neurons = nn.ModuleList(mask(g.ffn) for _ in range(g.n_layers)) if "neurons" in s else None
        self.mha = mask(g.n_layers) if "mha" in s else None
        self.ffn = mask(g.n_layers) if "ffn" in s else None
        self.budget: Budget | None = None
        self.latency_table = None
        """The :class:`vtrans.latency_table.LatencyTable` of the last latency budget applied (kept when the budget is
        released: a training's rounds re-apply budgets with it)."""
        self.achieved: dict[str, float] = {}
        """Target, achieved size and fraction of the last :meth:`apply_budget`."""
        self.method = "vtrans"
        self._cache: dict[str, torch.Tensor] = {}
        self._noise_keys: list[int] | None = None
        self._bypass = False
        self._handles: list = []
        self._patched_norms: list[nn.Module] = []
        param = next(model.parameters())
        self.to(param.device)
        self._install()

    # ------------------------------------------------------------------------------------------------------------
    @property
    def model(self) -> PreTrainedModel:
        return self._model[0]

    def masks(self) -> Iterator[tuple[str, VIBMask]]:
        """``(structure, mask)`` for every mask; per-layer masks appear once per layer."""
        for name in ("hidden", "mha", "ffn"):
            m = getattr(self, name)
            if m is not None:
                yield name, m
        for name in ("heads", "neurons"):
            ml = getattr(self, name)
            if ml is not None:
                for m in ml:
                    yield name, m

    def mask_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in self.masks() for p in (m.mu, m.logvar)]

    def _kl_terms(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(structure, beta_i / r_i * KL_i)`` of every mask group with a non-zero weight."""
        unit = self.config.kl_normalisation == "unit"
        for name, m in self.masks():
            beta = self.config.kl_weight * self.config.kl_multipliers[name]
            if beta:
                yield name, beta * m.kl() / (self.geometry.ffn if unit else m.n)

    def kl(self) -> torch.Tensor:
        """``sum_i beta_i / r_i * KL_i`` over all mask groups (beta_i = kl_weight * multiplier of its type); with
        ``kl_normalisation="unit"`` every ``r_i`` is the FFN width instead of the group's own."""
        total = torch.zeros((), device=self._device())
        for _, term in self._kl_terms():
            total = total + term
        return total

    @torch.no_grad()
    def kl_by_type(self) -> dict[str, float]:
        """The weighted KL of each structure type (its share of :meth:`kl`), for the training curves."""
        out = dict.fromkeys((name for name, _ in self.masks()), 0.0)
        for name, term in self._kl_terms():
            out[name] = out.get(name, 0.0) + float(term)
        return out

    @torch.no_grad()
    def active_fraction(self, low: float = 0.02, high: float = 0.98) -> float:
        """Share of units whose keep probability lies in ``[low, high]``: where the budget term has gradient. A run
        whose masks all sit at 0 or 1 cannot trade size against the task any more."""
        k, t = self.config.keep_sharpness, self.config.threshold
        probs = torch.cat([m.keep_prob(k, t).flatten() for _, m in self.masks()])
        return float(((probs >= low) & (probs <= high)).float().mean()) if probs.numel() else 0.0

    # --- keep decisions ------------------------------------------------------------------------------------------
    def keep_probs(self, offset: float = 0.0) -> Keep:
        """Soft keep counts (expectations under the keep probabilities); unmasked structures count fully. ``offset`` is
        added to every unit's ``log_alpha`` (what :meth:`shift_log_alpha` would do)."""
        g, k, t = self.geometry, self.config.keep_sharpness, self.config.threshold
        L = g.n_layers
        return Keep(
            hidden=self.hidden.keep_prob(k, t, offset).sum() if self.hidden is not None else g.hidden,
            groups=[m.keep_prob(k, t, offset).sum() for m in self.heads] if self.heads is not None else
            [g.n_groups] * L,
            neurons=[m.keep_prob(k, t, offset).sum() for m in self.neurons] if self.neurons is not None else
            [g.ffn] * L,
            mha=list(self.mha.keep_prob(k, t, offset)) if self.mha is not None else [1] * L,
            ffn=list(self.ffn.keep_prob(k, t, offset)) if self.ffn is not None else [1] * L,
        )

    def expected_size(self, metric: str = "params", scope: str = "blocks", seq_len: int = 128,
                      offset: float = 0.0) -> torch.Tensor:
        """Differentiable expected parameters or FLOPs under the current keep probabilities (every ``log_alpha``
        moved by ``offset``). ``latency``: the predicted milliseconds of :attr:`latency_table` (``scope`` and
        ``seq_len`` are the table's)."""
        if metric == "latency":
            if self.latency_table is None:
                raise ConfigError("expected latency needs a latency table: set vib.latency_table "
                                  "(vtrans.latency_table.table_for(model, batch_size, seq_len))")
            return self.latency_table.predict_soft(self.keep_probs(offset)).float()
        return torch.as_tensor(size(self.geometry, self.keep_probs(offset), metric, scope, seq_len))

    @torch.no_grad()
    def shift_log_alpha(self, offset: float) -> None:
        """Move every unit's ``log_alpha`` by ``offset`` (through its log-variance; the means stay)."""
        for _, m in self.masks():
            m.logvar.add_(offset)

    def selection(self) -> Selection:
        """The hard keep decision of every unit, with the block rules applied."""
        g, t = self.geometry, self.config.threshold
        L = g.n_layers

        def hard(m: VIBMask | None, n: int) -> torch.Tensor:
            return m.hard_keep(t).cpu() if m is not None else torch.ones(n, dtype=torch.bool)

        return Selection.normalised(
            hard(self.hidden, g.hidden),
            [hard(self.heads[i] if self.heads is not None else None, g.n_groups) for i in range(L)],
            [hard(self.neurons[i] if self.neurons is not None else None, g.ffn) for i in range(L)],
            hard(self.mha, L), hard(self.ffn, L),
        )

    def scores(self) -> Scores:
        """``-log_alpha`` of every unit (higher = keep); unmasked structures score ``+inf``."""
        g = self.geometry
        L = g.n_layers

        def sc(m: VIBMask | None, n: int) -> torch.Tensor:
            return -m.log_alpha().detach().cpu() if m is not None else torch.full((n,), float("inf"))

        return Scores(sc(self.hidden, g.hidden),
                      [sc(self.heads[i] if self.heads is not None else None, g.n_groups) for i in range(L)],
                      [sc(self.neurons[i] if self.neurons is not None else None, g.ffn) for i in range(L)],
                      sc(self.mha, L), sc(self.ffn, L))

    @torch.no_grad()
    def posterior_scores(self) -> Scores:
        """What :meth:`apply_budget` ranks units by when no scores are given: :meth:`scores` (``threshold``) or
        :func:`vtrans.budget.quota_scores` of them with the expected keep counts as quotas (``quota``)."""
        if self.config.selection == "quota":
            return quota_scores(self.scores(), self.keep_probs())
        return self.scores()

    @torch.no_grad()
    def apply_budget(self, budget: Budget, scores: Scores | None = None, method: str | None = None,
                     table=None) -> Selection:
        """Fix hard masks meeting ``budget`` exactly (never over, within its tolerance under).

        ``scores`` default to the trained posterior: ``-log_alpha`` under one global threshold, or per-group quotas
        from the expected keep counts (``config.selection``, :meth:`posterior_scores`); pass a scorer's scores (e.g.
        :func:`vtrans.scoring.magnitude`) for a baseline. Re-applying with another budget re-thresholds the same
        posterior: one trained VIB serves several budgets. ``budget.uniform``: the same widths in every layer, as the
        stock architecture expresses them (:func:`vtrans.uniform.select_uniform`); :func:`vtrans.compress` then
        returns the stock Hugging Face class. A latency budget (``Budget(latency=...)``) selects with a latency table
        of this model on its device (:mod:`vtrans.latency_table`): ``table`` if given (refused unless measured for
        this model, device, threads and shape), else from the cache or measured now; it is kept as
        :attr:`latency_table`.
        """
        if not isinstance(budget, Budget):
            raise ConfigError(f"budget must be a vtrans.Budget, got {budget!r}")
        scores = scores if scores is not None else self.posterior_scores()
        if budget.metric == "latency":
            from vtrans import latency_table

            if table is None and self.latency_table is not None and \
                    self.latency_table.key == latency_table.table_key(self.model, budget.batch_size, budget.seq_len):
                table = self.latency_table  # the table already in use (a training's rounds)
            table = latency_table.table_for_budget(self.model, budget, table)
            sel = latency_table.select_latency(self.geometry, scores, budget, table)
            self.latency_table = table
        elif budget.uniform:  # the shapes a stock config expresses (vtrans.uniform)
            sel = select_uniform(self.geometry, scores, budget, self.adapter.stock_rules(self.model))
        else:
            sel = select(self.geometry, scores, budget)
        if self.hidden is not None:
            self.hidden.fix(sel.hidden)
        for i in range(self.geometry.n_layers):
            if self.heads is not None:
                self.heads[i].fix(sel.groups[i])
            if self.neurons is not None:
                self.neurons[i].fix(sel.neurons[i])
        if self.mha is not None:
            self.mha.fix(sel.mha)
        if self.ffn is not None:
            self.ffn.fix(sel.ffn)
        self.budget = budget
        self.achieved = dict(sel.achieved)
        self.method = method or ("vtrans" if scores is None else "custom")
        self._cache.clear()
        return sel

    @torch.no_grad()
    def release_budget(self) -> None:
        """Go back to the threshold rule (``log_alpha < threshold``) for the hard masks."""
        for _, m in self.masks():
            m.fix(None)
        self.budget = None
        self.achieved = {}
        self._cache.clear()

    @torch.no_grad()
    def hard_values(self, sel: Selection | None = None) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Evaluation mask values ``mu * keep`` of every unit (1 for unmasked kept units), on CPU, float32."""
        sel = sel or self.selection()
        L = self.geometry.n_layers

        def val(m: VIBMask | None, keep: torch.Tensor) -> torch.Tensor:
            mu = m.mu.detach().float().cpu() if m is not None else torch.ones(keep.shape)
            return mu * keep.float()

        return {
            "hidden": val(self.hidden, sel.hidden),
            "groups": [val(self.heads[i] if self.heads is not None else None, sel.groups[i]) for i in range(L)],
            "neurons": [val(self.neurons[i] if self.neurons is not None else None, sel.neurons[i])
                        for i in range(L)],
            "mha": val(self.mha, sel.mha),
            "ffn": val(self.ffn, sel.ffn),
        }

    # --- the masked forward ----------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(iter(self.parameters()), torch.empty(0)).device

    def _sampling(self) -> bool:
        return self.training and self.model.training

    def _eval(self) -> dict:
        """Evaluation mask values on the masks' device, computed once per forward pass."""
        if "eval" not in self._cache:
            dev = self._device()
            vals = self.hard_values()
            self._cache["eval"] = {k: ([t.to(dev) for t in v] if isinstance(v, list) else v.to(dev))
                                   for k, v in vals.items()}
        return self._cache["eval"]  # type: ignore[return-value]

    def _hidden_keep(self) -> torch.Tensor:
        if "hidden_keep" not in self._cache:
            self._cache["hidden_keep"] = self.selection().hidden.to(self._device())
        return self._cache["hidden_keep"]

    def _sample(self, key: str, mask: VIBMask, lead: tuple[int, ...]) -> torch.Tensor:
        """One training sample per forward pass and mask, shape (*lead, n); reused by every use in that pass."""
        z = self._cache.get(key)
        if z is None or (tuple(z.shape[:-1]) != lead and not _broadcasts(lead, tuple(z.shape[:-1]))):
            keys = self._noise_keys
            if keys is not None and lead and lead[0] == len(keys):
                eps = _keyed_noise(keys, zlib.crc32(key.encode()), lead[1:], mask.n, mask.mu)  # (*lead, n)
                z = mask.mu + torch.exp(0.5 * mask.logvar) * eps
            else:
                z = mask.sample(lead)
            self._cache[key] = z
        return z

    def set_noise_keys(self, sample_ids: torch.Tensor | None, step: int = 0) -> None:
        """Make the training noise a function of (seed, step, sample id) instead of the global RNG.

        With it, a batch split over data-parallel workers draws exactly the noise one worker would draw for the whole
        batch, and a resumed run draws the noise an uninterrupted run draws. ``None`` goes back to the global RNG.
        """
        if sample_ids is None:
            self._noise_keys = None
            return
        seed = self.config.seed or 0
        self._noise_keys = [(seed * 1_000_003 + step) * 1_000_033 + int(i) for i in sample_ids.flatten().tolist()]

    def _z_hidden(self, lead: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        if self.hidden is None:
            return None
        z = self._sample("hidden", self.hidden, lead) if self._sampling() else self._eval()["hidden"]
        return z.to(dtype)

    def _z_units(self, kind: str, i: int, lead: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        masks = getattr(self, kind)
        if masks is None:
            return None
        if self._sampling():
            return self._sample(f"{kind}.{i}", masks[i], lead).to(dtype)
        return self._eval()["groups" if kind == "heads" else "neurons"][i].to(dtype)

    def _z_gate(self, kind: str, i: int, lead: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        m = getattr(self, kind)
        if m is None:
            return None
        if self._sampling():
            return self._sample(kind, m, lead)[..., i : i + 1].to(dtype)  # (*lead, 1)
        return self._eval()[kind][i : i + 1].to(dtype)

    def _install(self) -> None:
        hp = self.adapter.hook_points(self.model)
        g = self.geometry
        width = g.group_size * g.head_dim
        self._handles.append(hp.base.register_forward_pre_hook(lambda *_: self._cache.clear()))
        for i, mod in enumerate(hp.attn_out):
            self._handles.append(mod.register_forward_pre_hook(functools.partial(self._heads_in, i, width)))
            self._handles.append(mod.register_forward_hook(functools.partial(self._block_out, "mha", i)))
        for i, mod in enumerate(hp.ffn_out):
            self._handles.append(mod.register_forward_pre_hook(functools.partial(self._neurons_in, i)))
            self._handles.append(mod.register_forward_hook(functools.partial(self._block_out, "ffn", i)))
        if self.hidden is not None:
            for mod in hp.embeddings:
                self._handles.append(mod.register_forward_hook(self._embedding_out))
            for mod in hp.norms:
                mod.forward = functools.partial(self._norm_forward, mod, mod.forward)
                self._patched_norms.append(mod)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model without its masks (the dense teacher when the weights are frozen, as in Faster-VTrans)."""
        prev, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = prev

    def _heads_in(self, i: int, width: int, module: nn.Module, args: tuple) -> tuple | None:
        if self._bypass:
            return None
        x = args[0]  # (batch, seq, n_groups * group_size * head_dim), head-major
        z = self._z_units("heads", i, tuple(x.shape[:-1]), x.dtype)
        if z is None:
            return None
        x = (x.unflatten(-1, (-1, width)) * z.unsqueeze(-1)).flatten(-2)  # (batch, seq, groups, width) -> back
        return (x, *args[1:])

    def _neurons_in(self, i: int, module: nn.Module, args: tuple) -> tuple | None:
        if self._bypass:
            return None
        x = args[0]  # (batch, seq, ffn)
        z = self._z_units("neurons", i, tuple(x.shape[:-1]), x.dtype)
        return None if z is None else (x * z, *args[1:])

    def _block_out(self, kind: str, i: int, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self._bypass:
            return out
        lead = tuple(out.shape[:-1])
        gate = self._z_gate(kind, i, lead, out.dtype)
        if gate is not None:
            out = out * gate
        zh = self._z_hidden(lead, out.dtype)
        return out if zh is None else out * zh

    def _embedding_out(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self._bypass:
            return out
        return out * self._z_hidden(tuple(out.shape[:-1]), out.dtype)

    def _norm_forward(self, module: nn.Module, original, x: torch.Tensor) -> torch.Tensor:
        if self._bypass:
            return original(x)
        keep = self._hidden_keep()
        y = original(x) if bool(keep.all()) else _norm_over(module, x, keep)
        return y * self._z_hidden(tuple(x.shape[:-1]), y.dtype)

    def reinstall(self) -> None:
        """Put the hooks again on the modules the model has now: after modules were wrapped or unwrapped in place (LoRA
        adapters between pruning rounds, :mod:`vtrans.lora`), so the masks act on the wrapper's input and output - the
        adapter's path with the weight's. The masks (the same parameters) and their state are unchanged."""
        self._uninstall()
        self._install()

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod in self._patched_norms:
            del mod.forward
        self._patched_norms.clear()

    def remove(self) -> None:
        """Detach the masks: remove every hook; the model computes its dense function again."""
        self._uninstall()
        if getattr(self.model, "_vtrans_vib", None) is self:
            del self.model._vtrans_vib


def _keyed_noise(keys: list[int], salt: int, rest: tuple[int, ...], n: int, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of shape (len(keys), *rest, n), each row drawn from its own seeded generator."""
    rows = []
    for k in keys:
        gen = torch.Generator().manual_seed((k * 2_654_435_761 + salt) % (2**63 - 1))
        rows.append(torch.randn(*rest, n, generator=gen))
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether a tensor of lead shape ``a`` can use a sample drawn for lead shape ``b``."""
    return len(a) == len(b) and all(x == y or x == 1 for x, y in zip(a, b, strict=True))


def _norm_over(module: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """LayerNorm / RMSNorm with statistics over the kept dims only (``keep``: bool (hidden,))."""
    k = keep.to(x.dtype)
    n = k.sum()
    if isinstance(module, nn.LayerNorm):
        mean = (x * k).sum(-1, keepdim=True) / n  # (batch, seq, 1)
        var = ((x - mean).pow(2) * k).sum(-1, keepdim=True) / n
        y = (x - mean) * torch.rsqrt(var + module.eps)
        if module.weight is not None:
            y = y * module.weight
        if module.bias is not None:
            y = y + module.bias
        return y
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise TypeError(f"unsupported norm module {type(module).__name__}")
    xf = x.float()
    var = (xf.pow(2) * k.float()).sum(-1, keepdim=True) / n  # (batch, seq, 1)
    return module.weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def attach(model: PreTrainedModel, config: VIBConfig | None = None) -> VIB:
    """Put VIB masks on every structure of a Hugging Face model (in place, by hooks) and return them.

    The model's parameters, module tree and state dict are unchanged; ``vib.remove()`` restores its dense forward.
    """
    config = config or VIBConfig()
    if not isinstance(config, VIBConfig):
        raise ConfigError(f"config must be a vtrans.VIBConfig, got {config!r}")
    adapter = arch_registry.for_model(model)
    if adapter.is_compressed(model.config):
        raise ConfigError(
            f"model is already compressed by vtrans (model_type={model.config.model_type!r}); attach to a dense model"
        )
    if getattr(model, "_vtrans_vib", None) is not None:
        raise ConfigError("model already has VIB masks attached; call vib.remove() first")
    vib = VIB(model, config, adapter)
    object.__setattr__(model, "_vtrans_vib", vib)  # not a sub-module: the model's state dict stays clean
    return vib

"""LoRA recovery: low-rank adapters (peft) on a compressed model's block projections, merged back before saving.

A fine-tune with ``finetune.method: lora`` freezes every weight of the (heterogeneous, compressed) model and trains
rank-``r`` adapters ``W + (alpha / r) * B @ A`` on the Linear layers of its transformer blocks - attention and MLP
projections, never the embeddings, the classifier or the LM head - so the optimizer holds a few percent of the
parameters. :meth:`LoraAdapters.merge` folds them into the weights and removes them: the model is again the same
class with the same state-dict keys, and saves the same kind of checkpoint as a full fine-tune::

    adapters = add_adapters(model, LoraConfig(rank=8, alpha=16))    # in place; only adapter parameters train
    ...train with torch.optim.AdamW(adapters.parameters()) ...
    model = adapters.merge()                                        # W += (alpha / r) B A; no lora_ keys left

peft is imported inside the functions: vtrans imports without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from vtrans.checks import check_int, check_number, check_text
from vtrans.errors import ConfigError, quote

__all__ = ["ADAPTER_KEY", "LoraAdapters", "LoraConfig", "add_adapters", "block_linears", "check_targets_at",
           "lora_targets"]

#: Part of every state-dict key (and parameter name) of an adapter: ``...q_proj.lora_A.default.weight``.
ADAPTER_KEY = "lora_"
#: The most a rank may be (a typo such as ``rank: 80000`` would allocate matrices larger than the model).
MAX_RANK = 4096
#: Where a :class:`LoraConfig`'s keys live in the pipeline's config (and so what its messages name).
PREFIX = "finetune.lora"


@dataclass
class LoraConfig:
    """Low-rank adapters of a LoRA fine-tune (``finetune.lora``)."""

    rank: int = 8
    """Rank r of every adapter (an int in [1, 4096])."""
    alpha: float = 16.0
    """Scale numerator: an adapter adds ``(alpha / rank) * B @ A`` to its weight (> 0)."""
    dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""
    target_modules: list[str] | None = None
    """Names of the Linear layers to adapt, matched as peft does (a module whose name is, or ends with ``.<name>``):
    ``[q_proj, v_proj]`` for Llama, ``[query, value]`` for BERT, ``[c_attn]`` for GPT-2. None: every Linear of the
    transformer blocks (attention and MLP projections; not the embeddings, the classifier or the LM head). A name
    that matches no Linear of the model is an error."""

    def __post_init__(self) -> None:
        check_int(f"{PREFIX}.rank", self.rank, 1, MAX_RANK)
        check_number(f"{PREFIX}.alpha", self.alpha, 0, low_open=True)
        check_number(f"{PREFIX}.dropout", self.dropout, 0, 1, high_open=True)
        t = self.target_modules
        if t is not None:
            if not isinstance(t, (list, tuple)) or not t:
                raise ConfigError(f"{PREFIX}.target_modules must be null or a non-empty list of module names, got "
                                  f"{quote(t)}")
            for i, name in enumerate(t):
                check_text(f"{PREFIX}.target_modules[{i}]", name)
            if len(set(t)) != len(t):
                raise ConfigError(f"{PREFIX}.target_modules lists a name twice: {quote(list(t))}")
            self.target_modules = list(t)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def block_linears(model: PreTrainedModel) -> list[str]:
    """Full names of every Linear (GPT-2: ``Conv1D``) of the model's transformer blocks, in module order."""
    from vtrans.arch import for_model

    adapter = for_model(model)
    stack = adapter.prefix_of(model) + adapter.layers_path + "."
    return [name for name, m in model.named_modules() if name.startswith(stack) and _is_linear(m)]


def lora_targets(model: PreTrainedModel, config: LoraConfig) -> list[str]:
    """Full names of the modules ``config`` adapts in ``model``. :class:`ConfigError` when a name of
    ``target_modules`` matches no Linear of the model (the message lists the block Linear names it has)."""
    if config.target_modules is None:
        names = block_linears(model)
        if not names:
            raise ConfigError(f"{PREFIX}.target_modules=None: {type(model).__name__} has no Linear layer in its "
                              f"transformer blocks to adapt")
        return names
    linears = [name for name, m in model.named_modules() if _is_linear(m)]
    chosen: list[str] = []
    for wanted in config.target_modules:
        hits = [n for n in linears if n == wanted or n.endswith("." + wanted)]
        if not hits:
            have = sorted({n.rsplit(".", 1)[-1] for n in block_linears(model)})
            raise ConfigError(f"{PREFIX}.target_modules names {quote(wanted)}, which matches no Linear layer of "
                              f"{type(model).__name__}; its blocks' Linear layers are {have}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def check_targets_at(path, task: str, config: LoraConfig, num_labels: int | None = None) -> list[str]:
    """:func:`lora_targets` of the local checkpoint at ``path`` for ``task``, from its config alone (the model is
    built on the meta device, no weights are read): a bad ``target_modules`` fails before any work."""
    from vtrans.checkpoint import _meta_for_task

    require_peft()
    return lora_targets(_meta_for_task(path, task, num_labels), config)


def require_peft() -> None:
    """Raise :class:`ConfigError` in one line where peft cannot be imported (vtrans depends on it; an install with
    ``--no-deps`` skips it), so ``finetune.method: lora`` fails before any work, not in a worker."""
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"finetune.method='lora' needs peft, which cannot be imported ({e}); install it: pip "
                          "install peft (a dependency of vtrans that a --no-deps install skips)") from None


class LoraAdapters:
    """LoRA adapters injected (in place) into a model; made by :func:`add_adapters`."""

    def __init__(self, model: PreTrainedModel, config: LoraConfig, seed: int = 0,
                 targets: list[str] | None = None) -> None:
        require_peft()
        from peft import LoraConfig as PeftLoraConfig
        from peft.tuners.lora import LoraModel

        self.model = model
        self.config = config
        self.targets = list(targets) if targets is not None else lora_targets(model, config)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._class = type(model)
        fan_in_fan_out = all(isinstance(model.get_submodule(n), Conv1D) for n in self.targets)
        peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                     target_modules=self.targets, fan_in_fan_out=fan_in_fan_out, bias="none")
        # the adapters' initial values depend on the seed only, and the caller's RNG stream is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._peft = [LoraModel(model, peft_config, "default")]  # a list: not a submodule of anything
        self.merged = False

    def parameters(self) -> list[nn.Parameter]:
        """The adapter parameters (the only ones that train)."""
        return [p for name, p in self.model.named_parameters() if ADAPTER_KEY in name]

    def split_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The model's state as two state dicts: its weights under the keys they have without the adapters (peft's
        ``.base_layer`` dropped: they load into the model as it was before :func:`add_adapters`) and the adapters'
        tensors under peft's keys (:meth:`load_adapters`)."""
        base: dict[str, torch.Tensor] = {}
        adapters: dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict().items():
            if ADAPTER_KEY in key:
                adapters[key] = value
            else:
                base[key.replace(".base_layer.", ".")] = value
        return base, adapters

    def load_adapters(self, state: dict[str, torch.Tensor]) -> None:
        """Set the adapters to ``state`` (:meth:`split_state`'s second part). :class:`ConfigError` when it does not hold
        exactly this model's adapter tensors (saved with another rank or other target_modules)."""
        have = {k for k in self.model.state_dict() if ADAPTER_KEY in k}
        if set(state) != have:
            odd = sorted(have ^ set(state))
            raise ConfigError(f"the saved LoRA adapters do not match this {PREFIX} ({len(odd)} tensor(s) differ, e.g. "
                              f"{odd[0]!r}): were they saved with another rank or target_modules?")
        for key, value in state.items():
            want = self.model.get_parameter(key)
            if want.shape != value.shape:
                raise ConfigError(f"the saved LoRA adapter {key!r} has shape {tuple(value.shape)}, this {PREFIX} "
                                  f"{tuple(want.shape)}: was it saved with another rank?")
        self.model.load_state_dict(state, strict=False)

    def merge(self) -> PreTrainedModel:
        """Fold the adapters into the weights and remove them (in place; idempotent): the model is again its class
        with the state-dict keys and trainable flags it had before :func:`add_adapters`. On a model sharded by
        :func:`vtrans.sharding.shard` every worker adds its shard of ``(alpha / r) B A`` to its shard of each weight (a
        collective where the adapters are sharded: every worker calls it)."""
        if not self.merged:
            from vtrans.sharding import is_sharded, local_like

            with torch.no_grad():
                for name in self.targets:
                    layer = self.model.get_submodule(name)
                    delta = _delta(layer)
                    if not torch.isfinite(delta).all():
                        raise ValueError(f"the LoRA adapter of {name!r} is not finite (NaN or inf): the fine-tune "
                                         f"diverged; lower its learning rate")
                    weight = layer.get_base_layer().weight
                    if is_sharded(weight):
                        weight.to_local().add_(local_like(weight, delta).to_local())
                    else:
                        weight.add_(delta.to(weight.dtype))
            model = self._peft[0].unload()
            if model is not self.model or not isinstance(model, self._class):  # peft changed how it unloads
                raise RuntimeError(f"peft's unload returned a {type(model).__name__}, not the "
                                   f"{self._class.__name__} it was given")
            for name, p in model.named_parameters():
                p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
            self._peft = []
            self.merged = True
        return self.model


def _delta(layer: nn.Module) -> torch.Tensor:
    """What an adapted layer adds to its weight, ``(alpha / r) B A`` laid out as the weight (transposed for GPT-2's
    ``Conv1D``); whole, also where the adapters are sharded."""
    from vtrans.sharding import is_sharded

    a, b = (t.full_tensor() if is_sharded(t) else t for t in (layer.lora_A["default"].weight,
                                                                layer.lora_B["default"].weight))
    delta = (b @ a) * layer.scaling["default"]  # (out, in)
    return delta.T if layer.fan_in_fan_out else delta


def add_adapters(model: PreTrainedModel, config: LoraConfig, seed: int = 0,
                 targets: list[str] | None = None) -> LoraAdapters:
    """Inject LoRA adapters into ``model`` (in place) on the modules of :func:`lora_targets` (or the full module
    names ``targets``, found before a model was sharded) and freeze every other parameter. The adapters start as peft
    starts them (A random from ``seed``, B zero: the model's function is unchanged until they train)."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"{PREFIX} must be a vtrans.lora.LoraConfig, got {type(config).__name__}")
    return LoraAdapters(model, config, seed, targets)

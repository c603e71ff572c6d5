"""What an architecture adapter describes: where every prunable structure lives in a Hugging Face model."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vtrans.budget import Geometry, Keep
from vtrans.errors import UnsupportedModelError


@dataclass(frozen=True)
class Slot:
    """A segment of one state-dict tensor indexed by the units of a structure.

    Along ``axis`` of tensor ``key``, unit ``u`` owns elements ``[offset + u * width, offset + (u + 1) * width)``.
    ``fold``: the unit's mask value is multiplied into the segment when compressing (the tensor writes the masked
    quantity). ``feeds``: the segment produces the unit's value (used by the magnitude scorer).
    """

    key: str
    axis: int
    offset: int = 0
    width: int = 1
    fold: bool = False
    feeds: bool = False


@dataclass
class Layout:
    """Every tensor touched by every structure, by state-dict key."""

    hidden: list[Slot]
    groups: list[list[Slot]]
    neurons: list[list[Slot]]
    mha_keys: list[list[str]]
    """Tensors of each layer's attention block, dropped when the block is removed."""
    ffn_keys: list[list[str]]
    mha_fold: list[list[str]]
    """Tensors scaled by the attention block's gate value (its output projection)."""
    ffn_fold: list[list[str]]
    tied: dict[str, str] = field(default_factory=dict)
    """``alias -> source``: tensors that share storage with another (tied embeddings)."""


@dataclass
class HookPoints:
    """Modules of the masked forward pass."""

    embeddings: list[nn.Module]
    """Their outputs are multiplied by the hidden mask (token/position embeddings of pre-LN models)."""
    norms: list[nn.Module]
    """LayerNorm/RMSNorm computed over the kept hidden dims only, output multiplied by the hidden mask."""
    attn_out: list[nn.Module]
    """Per layer, the attention output projection: its input is the concatenation of heads (head-major); its output
    is the block output before the residual add."""
    ffn_out: list[nn.Module]
    """Per layer, the FFN output projection: input = intermediate neurons, output = block output."""
    base: nn.Module
    """The transformer body, called once per forward pass."""


@dataclass(frozen=True)
class StockRules:
    """What the stock Hugging Face config of an architecture can express (:mod:`vtrans.uniform`, :mod:`vtrans.export`).

    A stock config has one width per structure for all layers; which combinations of hidden size and key/value groups
    it accepts, and whether whole layers may go, differ per architecture."""

    drop_layers: bool
    """A layer whose attention and FFN blocks are both removed is the identity (pre-norm), so the stock model may have
    fewer layers. Post-norm layers keep their LayerNorms without blocks: not expressible."""
    shapes: tuple[tuple[int, int], ...]
    """``(hidden size, key/value groups)`` pairs a stock config of this model expresses, smallest hidden first."""
    pad_hidden: bool
    """A pruned hidden size may be zero-padded to a larger one exactly (RMSNorm, with its weights and epsilon
    rescaled); a LayerNorm's mean and variance over a padded vector differ, so LayerNorm models cannot."""
    note: str
    """One sentence saying what the stock config can and cannot express, for error messages."""


class Adapter:
    """Base class of architecture adapters. Subclasses describe one family of Hugging Face models."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    #: supported Hugging Face classes -> their compressed class in ``vtrans.modeling_vtrans``
    classes: dict[str, str] = {}
    #: state-dict path of the layer stack below the body prefix (``layers``, ``h``, ``encoder.layer``)
    layers_path: str = ""

    # --- identification ------------------------------------------------------------------------------------------
    def check(self, model: PreTrainedModel) -> None:
        """Raise :class:`UnsupportedModelError` unless this adapter handles the model's class."""
        cls = type(model).__name__
        if cls not in self.classes and cls not in self.classes.values():
            raise UnsupportedModelError(
                f"model class {cls!r} of architecture {self.name!r} is not supported; supported classes: "
                f"{sorted(self.classes)}"
            )

    def is_compressed(self, config: PretrainedConfig) -> bool:
        return getattr(config, "vtrans", None) is not None

    # --- to implement --------------------------------------------------------------------------------------------
    def geometry(self, model: PreTrainedModel) -> Geometry:
        """Dense geometry of the model (for a compressed model: of the dense model it came from)."""
        raise NotImplementedError

    def layout(self, model: PreTrainedModel) -> Layout:
        raise NotImplementedError

    def hook_points(self, model: PreTrainedModel) -> HookPoints:
        raise NotImplementedError

    def compressed_config(self, model: PreTrainedModel, layers: list[dict], hidden: int) -> PretrainedConfig:
        """The config of the compressed model: dense config + kept hidden size + per-layer widths."""
        raise NotImplementedError

    def stock_rules(self, model: PreTrainedModel) -> StockRules:
        """What the stock config can express (uniform selection, stock export)."""
        raise UnsupportedModelError(f"architecture {self.name!r} does not describe its stock config; --uniform and "
                                    f"export --format stock need StockRules (Adapter.stock_rules)")

    def stock_config(self, model: PreTrainedModel, n_layers: int, hidden: int, groups: int,
                     ffn: int) -> PretrainedConfig:
        """The stock config of a vtrans-compressed ``model`` with uniform widths; ``hidden`` may exceed the model's
        kept hidden size only where :attr:`StockRules.pad_hidden`."""
        raise NotImplementedError

    def pad_hidden(self, sd: dict, model: PreTrainedModel, kept: int, padded: int) -> None:
        """Rescale, in the stock state dict ``sd``, what a zero-padded hidden size changes (RMSNorm weights)."""
        raise NotImplementedError

    # --- shared helpers ------------------------------------------------------------------------------------------
    def keep(self, model: PreTrainedModel) -> Keep:
        """Kept counts of the model (all of the dense geometry unless it is a compressed model)."""
        return keep_of_config(model.config, self.geometry(model))

    def compressed_class_name(self, model: PreTrainedModel) -> str:
        name = type(model).__name__
        return name if name in self.classes.values() else self.classes[name]

    @staticmethod
    def prefix_of(model: PreTrainedModel) -> str:
        """State-dict prefix of the transformer body (``"bert."`` for a classifier, ``""`` for a base model)."""
        base = model.base_model_prefix
        return f"{base}." if hasattr(model, base) and getattr(model, base) is not model else ""


def tied_lm_head(model: PreTrainedModel) -> bool:
    """Whether the model has an LM head sharing the token embedding matrix."""
    return hasattr(model, "lm_head") and bool(model.config.tie_word_embeddings)


def stock_config_from(model: PreTrainedModel, config_cls: type[PretrainedConfig], **sizes) -> PretrainedConfig:
    """The stock config of a vtrans-compressed ``model``: its config without the ``vtrans`` record and ``auto_map``,
    with the given sizes."""
    d = model.config.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "vtrans"):
        d.pop(k, None)
    d.update(sizes)
    cfg = config_cls.from_dict(d)
    cfg._attn_implementation = model.config._attn_implementation
    cfg.architectures = [type(model).__name__.removeprefix("Vtrans")]
    return cfg


def compressed_config_from(model: PreTrainedModel, arch: str, hidden: int, dense: dict, layers: list[dict],
                           extra: dict | None = None, **overrides) -> PretrainedConfig:
    """Build the compressed config of ``model``: its config with the kept hidden size and a ``vtrans`` record."""
    from vtrans import modeling_vtrans as mv

    d = model.config.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "vtrans",
              "quantization_config"):
        d.pop(k, None)
    d.update(overrides)
    d["hidden_size"] = hidden
    d["vtrans"] = {"arch": arch, "dense": dense, "layers": layers, **(extra or {})}
    cfg = mv.CONFIGS[arch].from_dict(d)
    cfg._attn_implementation = model.config._attn_implementation
    cfg.auto_map = dict(mv.AUTO_MAP[arch])
    cfg.architectures = [type(model).__name__ if type(model).__name__.startswith("Vtrans")
                         else f"Vtrans{type(model).__name__}"]
    return cfg


def keep_of_config(config: PretrainedConfig, geometry: Geometry) -> Keep:
    """Keep counts of a model: dense, or recorded in a compressed config."""
    rec = getattr(config, "vtrans", None)
    if rec is None:
        return geometry.dense_keep()
    layers = rec["layers"]
    return Keep(
        hidden=config.hidden_size,
        groups=[spec["kv_heads"] for spec in layers],
        neurons=[spec["intermediate_size"] for spec in layers],
        mha=[int(spec["heads"] > 0) for spec in layers],
        ffn=[int(spec["intermediate_size"] > 0) for spec in layers],
    )

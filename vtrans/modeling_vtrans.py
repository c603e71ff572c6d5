"""Modeling code of vtrans-compressed Hugging Face models.

This file is copied next to every compressed checkpoint (``auto_map`` + ``trust_remote_code``) for people without
vtrans, so it imports only torch and transformers and must never import vtrans. Where vtrans is installed, the copy is
never run: ``import vtrans`` registers these classes with transformers' Auto classes and vtrans loads with
``trust_remote_code=False`` (:mod:`vtrans.checkpoint`).

A compressed model is the stock Hugging Face model with per-layer widths: ``config.hidden_size`` is the kept
residual width and ``config.vtrans`` records the dense sizes and, per layer, the kept query heads, key/value heads and
FFN neurons (0 = the block was removed). Each class builds the stock model without layers, then every layer at the
dense shape and shrinks its modules to the recorded widths; a removed attention block keeps the key/value cache
length consistent so ``generate()`` works. Only ``DynamicCache`` (the default) is supported for generation.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import sys
from collections.abc import Iterator

import torch
import transformers
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.roberta.modeling_roberta import RobertaLayer
from transformers.pytorch_utils import Conv1D

COMPRESSION_FILE = "compression.json"
MODELING_FILE = "modeling_vtrans.py"


def modeling_sha256() -> str:
    """SHA-256 of this file, recorded in compression.json as provenance (which vtrans file wrote the checkpoint).

    Not a security check: it lives beside the code it describes, so whoever can change one can change the other;
    vtrans never runs the stored copy."""
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def _validate_vtrans(config) -> None:
    """Per-layer widths replace the dense rule "hidden size is a multiple of the number of heads"."""
    rec = getattr(config, "vtrans", None)
    if not isinstance(rec, dict) or not {"arch", "dense", "layers"} <= set(rec):
        raise ValueError(f"config.vtrans must record arch, dense and layers, got {rec!r}")
    if len(rec["layers"]) != config.num_hidden_layers:
        raise ValueError(f"config.vtrans.layers has {len(rec['layers'])} entries for {config.num_hidden_layers} layers")
    for i, spec in enumerate(rec["layers"]):
        heads, kv = spec["heads"], spec["kv_heads"]
        if heads < 0 or kv < 0 or spec["intermediate_size"] < 0 or (kv and heads % kv) or (bool(heads) != bool(kv)):
            raise ValueError(f"config.vtrans.layers[{i}] is inconsistent: {spec!r}")


@strict
class VtransBertConfig(BertConfig):
    model_type = "vtrans_bert"

    def validate_architecture(self):
        _validate_vtrans(self)


@strict
class VtransRobertaConfig(RobertaConfig):
    model_type = "vtrans_roberta"

    def validate_architecture(self):
        _validate_vtrans(self)


@strict
class VtransGPT2Config(GPT2Config):
    model_type = "vtrans_gpt2"

    def validate_architecture(self):
        _validate_vtrans(self)


# ---------------------------------------------------------------------------------------------------------------------
# Replacements for removed blocks
# ---------------------------------------------------------------------------------------------------------------------


class _Passthrough(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Zeros(nn.Module):
    """A removed pre-norm FFN block: contributes nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class _ResidualNorm(nn.Module):
    """A removed post-norm (BERT) sub-layer: ``LayerNorm(residual)``; keeps the stock ``LayerNorm`` key."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.LayerNorm = norm

    def forward(self, hidden_states: torch.Tensor | None, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(input_tensor)


class _BertAttentionRemoved(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.output = _ResidualNorm(norm)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return self.output(None, hidden_states), None


class _AttentionRemoved(nn.Module):
    """A removed pre-norm attention block. Writes empty keys/values so the cache still knows the sequence length."""

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs) -> tuple[torch.Tensor, None]:
        if past_key_values is not None:
            cache = past_key_values.self_attention_cache if isinstance(past_key_values, EncoderDecoderCache) else (
                past_key_values)
            b, s = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, s, self.head_dim)  # (batch, 0 heads, seq, head_dim)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


# ---------------------------------------------------------------------------------------------------------------------
# Shrinking one layer to its recorded widths
# ---------------------------------------------------------------------------------------------------------------------


def _linear(n_in: int, n_out: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=like.bias is not None, device=like.weight.device, dtype=like.weight.dtype)


def _conv1d(n_in: int, n_out: int, like: Conv1D) -> Conv1D:
    return Conv1D(n_out, n_in).to(device=like.weight.device, dtype=like.weight.dtype)


def _layer_norm(d: int, like: nn.LayerNorm) -> nn.LayerNorm:
    return nn.LayerNorm(d, eps=like.eps, elementwise_affine=True, bias=like.bias is not None,
                        device=like.weight.device, dtype=like.weight.dtype)


def _shrink_bert_layer(layer: nn.Module, d: int, spec: dict, head_dim: int) -> None:
    heads, inter = spec["heads"], spec["intermediate_size"]
    if heads == 0:
        layer.attention = _BertAttentionRemoved(_layer_norm(d, layer.attention.output.LayerNorm))
    else:
        sa, out = layer.attention.self, layer.attention.output
        sa.query, sa.key, sa.value = (_linear(d, heads * head_dim, m) for m in (sa.query, sa.key, sa.value))
        sa.num_attention_heads, sa.all_head_size = heads, heads * head_dim
        out.dense = _linear(heads * head_dim, d, out.dense)
        out.LayerNorm = _layer_norm(d, out.LayerNorm)
    if inter == 0:
        layer.intermediate = _Passthrough()
        layer.output = _ResidualNorm(_layer_norm(d, layer.output.LayerNorm))
    else:
        layer.intermediate.dense = _linear(d, inter, layer.intermediate.dense)
        layer.output.dense = _linear(inter, d, layer.output.dense)
        layer.output.LayerNorm = _layer_norm(d, layer.output.LayerNorm)


def _shrink_gpt2_block(block: nn.Module, d: int, spec: dict, head_dim: int, layer_idx: int) -> None:
    heads, inter = spec["heads"], spec["intermediate_size"]
    if heads == 0:
        block.ln_1 = nn.Identity()
        block.attn = _AttentionRemoved(layer_idx, head_dim)
    else:
        attn = block.attn
        attn.c_attn = _conv1d(d, 3 * heads * head_dim, attn.c_attn)
        attn.c_proj = _conv1d(heads * head_dim, d, attn.c_proj)
        attn.split_size, attn.num_heads, attn.embed_dim = heads * head_dim, heads, d
        block.ln_1 = _layer_norm(d, block.ln_1)
    if inter == 0:
        block.ln_2 = nn.Identity()
        block.mlp = _Zeros()
    else:
        block.mlp.c_fc = _conv1d(d, inter, block.mlp.c_fc)
        block.mlp.c_proj = _conv1d(inter, d, block.mlp.c_proj)
        block.ln_2 = _layer_norm(d, block.ln_2)


def _rms_norm(d: int, like: nn.Module) -> nn.Module:
    return type(like)(d, eps=like.variance_epsilon).to(device=like.weight.device, dtype=like.weight.dtype)


class _QueryHeads:
    """The config as one fused-qkv attention module sees it: Phi-3's forward splits ``qkv_proj``'s output at
    ``config.num_attention_heads * head_dim``, so each layer reads its own query head count; all else is the model's."""

    def __init__(self, config, heads: int) -> None:
        self.__dict__.update(_config=config, num_attention_heads=heads)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_config"], name)


def _shrink_decoder_layer(layer: nn.Module, d: int, spec: dict, head_dim: int, layer_idx: int, config) -> None:
    """A pre-RMSNorm gated-FFN decoder layer (Llama, Mistral, Qwen2/3, Phi-3) at its recorded widths. Phi-3's fused
    ``qkv_proj`` holds the query heads, then the key heads, then the value heads; its ``gate_up_proj`` the gate rows,
    then the up rows. Per-head norms over ``head_dim`` (Qwen3's ``q_norm`` / ``k_norm``) keep their shape."""
    heads, kv, inter = spec["heads"], spec["kv_heads"], spec["intermediate_size"]
    if heads == 0:
        layer.input_layernorm = nn.Identity()
        layer.self_attn = _AttentionRemoved(layer_idx, head_dim)
    else:
        at = layer.self_attn
        if hasattr(at, "qkv_proj"):
            at.qkv_proj = _linear(d, (heads + 2 * kv) * head_dim, at.qkv_proj)
            at.num_key_value_heads = kv
            at.config = _QueryHeads(config, heads)
        else:
            at.q_proj = _linear(d, heads * head_dim, at.q_proj)
            at.k_proj = _linear(d, kv * head_dim, at.k_proj)
            at.v_proj = _linear(d, kv * head_dim, at.v_proj)
        at.o_proj = _linear(heads * head_dim, d, at.o_proj)
        at.num_key_value_groups = heads // kv
        layer.input_layernorm = _rms_norm(d, layer.input_layernorm)
    if inter == 0:
        layer.post_attention_layernorm = nn.Identity()
        layer.mlp = _Zeros()
    else:
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):
            mlp.gate_up_proj = _linear(d, 2 * inter, mlp.gate_up_proj)
        else:
            mlp.gate_proj = _linear(d, inter, mlp.gate_proj)
            mlp.up_proj = _linear(d, inter, mlp.up_proj)
        mlp.down_proj = _linear(inter, d, mlp.down_proj)
        mlp.hidden_size, mlp.intermediate_size = d, inter
        layer.post_attention_layernorm = _rms_norm(d, layer.post_attention_layernorm)


@contextlib.contextmanager
def _without_layers(config) -> Iterator[None]:
    """Let a stock ``__init__`` build everything but the layers (their dense shapes may not be constructible)."""
    n = config.num_hidden_layers
    config.num_hidden_layers = 0
    try:
        yield
    finally:
        config.num_hidden_layers = n


def _dense_layer_config(config):
    dense = config.vtrans["dense"]
    lc = copy.deepcopy(config)
    lc.hidden_size = dense["hidden_size"]
    return lc


def _add_layers(model: nn.Module, config) -> None:
    """Build every layer at the dense shape, shrink it to the recorded widths, and point it at the real config."""
    arch = config.vtrans["arch"]
    lc = _dense_layer_config(config)
    d, head_dim = config.hidden_size, config.vtrans["dense"]["head_dim"]
    base = model.base_model
    layers = []
    for i, spec in enumerate(config.vtrans["layers"]):
        if arch == "bert":
            layer = BertLayer(lc, layer_idx=i)
            _shrink_bert_layer(layer, d, spec, head_dim)
        elif arch == "roberta":
            layer = RobertaLayer(lc, layer_idx=i)
            _shrink_bert_layer(layer, d, spec, head_dim)
        elif arch == "gpt2":
            layer = GPT2Block(lc, layer_idx=i)
            _shrink_gpt2_block(layer, d, spec, head_dim, i)
        elif arch in _DECODER_LAYERS:
            layer = _DECODER_LAYERS[arch](lc, layer_idx=i)
            _shrink_decoder_layer(layer, d, spec, head_dim, i, config)
        else:
            raise ValueError(f"config.vtrans.arch must be one of {sorted(CONFIGS)}; got {arch!r}")
        for m in layer.modules():
            if getattr(m, "config", None) is lc:
                m.config = config
        layers.append(layer)
    container = {"bert": lambda: base.encoder.layer, "roberta": lambda: base.encoder.layer,
                 "gpt2": lambda: base.h}.get(arch, lambda: base.layers)()
    container.extend(layers)


class VtransMixin:
    """Writes the modeling code and compression.json next to the weights; sets ``auto_map``."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        src = os.path.abspath(__file__)
        dst = os.path.abspath(os.path.join(save_directory, MODELING_FILE))
        if src != dst:
            with open(src, "rb") as f_in, open(dst, "wb") as f_out:
                f_out.write(f_in.read())
        tokenizer = getattr(self, "vtrans_tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        report = dict(self.config.vtrans.get("report") or {})
        report["modeling_sha256"] = modeling_sha256()
        with open(os.path.join(save_directory, COMPRESSION_FILE), "w") as f:
            json.dump(report, f, indent=2)
        try:  # the copy stored with a checkpoint runs without vtrans: then no card
            from vtrans.model_card import write_model_card
        except ImportError:
            return result
        write_model_card(save_directory, report, stock=False)
        return result


def _finish(model: nn.Module, config) -> None:
    _add_layers(model, config)
    model.post_init()


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def _bert_pooler(model: nn.Module, config) -> None:
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        pooler.dense = _linear(config.hidden_size, config.vtrans["head_size"], pooler.dense)


class VtransBertModel(VtransMixin, BertModel):
    config_class = VtransBertConfig

    def __init__(self, config, add_pooling_layer: bool = True):
        with _without_layers(config):
            super().__init__(config, add_pooling_layer=add_pooling_layer)
        _bert_pooler(self, config)
        _finish(self, config)


class VtransBertForSequenceClassification(VtransMixin, BertForSequenceClassification):
    config_class = VtransBertConfig

    def __init__(self, config):
        with _without_layers(config):
            super().__init__(config)
        _bert_pooler(self, config)
        self.classifier = _linear(config.vtrans["head_size"], config.num_labels, self.classifier)
        _finish(self, config)


class VtransRobertaModel(VtransMixin, RobertaModel):
    config_class = VtransRobertaConfig

    def __init__(self, config, add_pooling_layer: bool = True):
        with _without_layers(config):
            super().__init__(config, add_pooling_layer=add_pooling_layer)
        _bert_pooler(self, config)
        _finish(self, config)


class VtransRobertaForSequenceClassification(VtransMixin, RobertaForSequenceClassification):
    config_class = VtransRobertaConfig

    def __init__(self, config):
        with _without_layers(config):
            super().__init__(config)
        head = self.classifier
        head.dense = _linear(config.hidden_size, config.vtrans["head_size"], head.dense)
        head.out_proj = _linear(config.vtrans["head_size"], config.num_labels, head.out_proj)
        _finish(self, config)


class VtransGPT2Model(VtransMixin, GPT2Model):
    config_class = VtransGPT2Config

    def __init__(self, config):
        with _without_layers(config):
            super().__init__(config)
        _finish(self, config)


class VtransGPT2LMHeadModel(VtransMixin, GPT2LMHeadModel):
    config_class = VtransGPT2Config

    def __init__(self, config):
        with _without_layers(config):
            super().__init__(config)
        _finish(self, config)


class VtransGPT2ForSequenceClassification(VtransMixin, GPT2ForSequenceClassification):
    config_class = VtransGPT2Config

    def __init__(self, config):
        with _without_layers(config):
            super().__init__(config)
        _finish(self, config)


#: ``auto_map`` written into every compressed config, per architecture.
AUTO_MAP: dict[str, dict[str, str]] = {
    "bert": {
        "AutoConfig": "modeling_vtrans.VtransBertConfig",
        "AutoModel": "modeling_vtrans.VtransBertModel",
        "AutoModelForSequenceClassification": "modeling_vtrans.VtransBertForSequenceClassification",
    },
    "roberta": {
        "AutoConfig": "modeling_vtrans.VtransRobertaConfig",
        "AutoModel": "modeling_vtrans.VtransRobertaModel",
        "AutoModelForSequenceClassification": "modeling_vtrans.VtransRobertaForSequenceClassification",
    },
    "gpt2": {
        "AutoConfig": "modeling_vtrans.VtransGPT2Config",
        "AutoModel": "modeling_vtrans.VtransGPT2Model",
        "AutoModelForCausalLM": "modeling_vtrans.VtransGPT2LMHeadModel",
        "AutoModelForSequenceClassification": "modeling_vtrans.VtransGPT2ForSequenceClassification",
    },
}

CONFIGS = {"bert": VtransBertConfig, "roberta": VtransRobertaConfig, "gpt2": VtransGPT2Config}

# ---------------------------------------------------------------------------------------------------------------------
# Llama-shaped decoders: classes made from the stock ones by family name
# ---------------------------------------------------------------------------------------------------------------------

#: compressed model classes of a decoder family -> the ``auto_map`` key each is loaded with
_DECODER_HEADS = {"Model": "AutoModel", "ForCausalLM": "AutoModelForCausalLM",
                  "ForSequenceClassification": "AutoModelForSequenceClassification"}
#: architecture -> the stock decoder layer class its layers are built from
_DECODER_LAYERS: dict[str, type] = {}


def _body_init(cls: type):
    def __init__(self, config):
        with _without_layers(config):
            super(cls, self).__init__(config)
        _finish(self, config)

    return __init__


def _classifier_init(body: type):
    def __init__(self, config):
        # the stock __init__ builds its body with AutoModel.from_config, which would ask for remote code
        super(GenericForSequenceClassification, self).__init__(config)
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, body(config))
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    return __init__


def add_decoder(family: str) -> str:
    """Define ``Vtrans{family}Config`` and ``Vtrans{family}{Model,ForCausalLM,ForSequenceClassification}`` in this
    module from the stock classes of a pre-RMSNorm gated-FFN decoder family (``"Qwen2"``: ``Qwen2Config``,
    ``Qwen2DecoderLayer``, ...); returns its architecture name (the stock ``model_type``). Idempotent.

    The stored copy of this file runs it on first access to such a name (module ``__getattr__``), so a family works
    without vtrans as long as its layers are built like the ones :func:`_shrink_decoder_layer` knows."""
    stock_config = getattr(transformers, f"{family}Config")
    arch = stock_config.model_type
    if arch in CONFIGS:
        return arch
    modeling = sys.modules[getattr(transformers, f"{family}Model").__module__]
    ns = globals()

    def make(name: str, bases: tuple, body: dict) -> type:
        return type(name, bases, {"__module__": __name__, "__qualname__": name, **body})

    config_cls = strict(make(f"Vtrans{family}Config", (stock_config,), {
        "model_type": f"vtrans_{arch}", "validate_architecture": lambda self: _validate_vtrans(self)}))
    ns[config_cls.__name__] = config_cls
    auto_map = {"AutoConfig": f"modeling_vtrans.{config_cls.__name__}"}
    for head, auto in _DECODER_HEADS.items():
        stock = getattr(transformers, f"{family}{head}", None)
        if stock is None:
            continue
        name = f"Vtrans{family}{head}"
        cls = make(name, (VtransMixin, stock), {"config_class": config_cls})
        cls.__init__ = (_classifier_init(ns[f"Vtrans{family}Model"]) if head == "ForSequenceClassification"
                        else _body_init(cls))
        ns[name] = cls
        auto_map[auto] = f"modeling_vtrans.{name}"
    _DECODER_LAYERS[arch] = getattr(modeling, f"{family}DecoderLayer")
    AUTO_MAP[arch] = auto_map
    CONFIGS[arch] = config_cls
    return arch


def __getattr__(name: str):
    # ``auto_map`` names a class of a decoder family this copy has not built yet (the stored copy, without vtrans)
    if name.startswith("Vtrans"):
        for suffix in ("Config", "ForSequenceClassification", "ForCausalLM", "Model"):
            family = name.removeprefix("Vtrans").removesuffix(suffix)
            if name.endswith(suffix) and hasattr(transformers, f"{family}Config"):
                add_decoder(family)
                if name in globals():
                    return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


add_decoder("Llama")

"""Llama-shaped decoders (pre-RMSNorm, gated FFN, grouped-query attention, optionally tied embeddings: SmolLM2).

:class:`LlamaAdapter` describes the family through a few class attributes, so a family built the same way is a
subclass that only names its classes and what differs (``vtrans/arch/qwen2.py``: q/k/v biases; ``phi3.py``: fused
projections; ``mistral.py``: nothing). Its compressed classes are made from the stock ones by
:func:`vtrans.modeling_vtrans.add_decoder`.
"""

from __future__ import annotations

import math

import transformers
from transformers import PreTrainedModel

from vtrans import modeling_vtrans
from vtrans.arch import register
from vtrans.arch.base import (
    Adapter,
    HookPoints,
    Layout,
    Slot,
    StockRules,
    compressed_config_from,
    stock_config_from,
    tied_lm_head,
)
from vtrans.budget import Geometry


def _dense(model: PreTrainedModel) -> dict:
    c = model.config
    if getattr(c, "vtrans", None) is not None:
        return c.vtrans["dense"]
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads or c.num_attention_heads, "head_dim": hd,
            "intermediate_size": c.intermediate_size}


@register
class LlamaAdapter(Adapter):
    """Llama, and the base class of every Llama-shaped family (one subclass per family, one file each)."""

    name = "llama"
    model_types = ("llama",)
    family = "Llama"
    """Prefix of the stock classes: ``{family}Config``, ``{family}Model``, ``{family}ForCausalLM``, ..."""
    fused_qkv = False
    """One ``qkv_proj`` whose rows are the query heads, then the key heads, then the value heads (Phi-3)."""
    fused_gate_up = False
    """One ``gate_up_proj`` whose rows are the gate neurons, then the up neurons (Phi-3)."""
    layers_path = "layers"

    def __init__(self) -> None:
        modeling_vtrans.add_decoder(self.family)
        self.classes = {f"{self.family}{h}": f"Vtrans{self.family}{h}" for h in ("Model", "ForCausalLM",
                                                                                 "ForSequenceClassification")
                        if hasattr(transformers, f"{self.family}{h}")}

    def biases(self, config) -> tuple[bool, bool, bool]:
        """Whether (q/k/v, output projection, FFN projections) have biases."""
        attn = bool(getattr(config, "attention_bias", False))
        return attn, attn, bool(getattr(config, "mlp_bias", False))

    def geometry(self, model: PreTrainedModel) -> Geometry:
        c, dense = model.config, _dense(model)
        lm = hasattr(model, "lm_head")
        labels = c.num_labels if hasattr(model, "score") else 0
        per_hidden = c.vocab_size + 1 + (c.vocab_size if lm and not tied_lm_head(model) else 0) + labels
        qkv_bias, o_bias, mlp_bias = self.biases(c)
        return Geometry(
            n_layers=c.num_hidden_layers, hidden=dense["hidden_size"], n_groups=dense["num_key_value_heads"],
            group_size=dense["num_attention_heads"] // dense["num_key_value_heads"], head_dim=dense["head_dim"],
            ffn=dense["intermediate_size"], ffn_in_mats=2, q_bias=qkv_bias, kv_bias=qkv_bias, o_bias=o_bias,
            ffn_in_bias=mlp_bias, ffn_out_bias=mlp_bias, norm_params=1, pre_norm=True,
            outside_params_per_hidden=per_hidden, outside_params_const=0,
            outside_flops_per_token_hidden=2 * (c.vocab_size if lm else labels),
            outside_flops_per_seq_hidden=0, outside_flops_per_seq_const=0,
        )

    def _attention_slots(self, lp: str, g: Geometry, bias: bool) -> tuple[list[Slot], list[Slot], list[str]]:
        """(hidden slots, group slots, tensors) of one layer's query/key/value projections."""
        hd, r, n = g.head_dim, g.group_size, g.n_groups
        kinds = ("weight", "bias") if bias else ("weight",)
        if self.fused_qkv:  # rows: n * r query heads | n key heads | n value heads (heads of a group adjacent)
            qkv = f"{lp}self_attn.qkv_proj"
            grp = [Slot(f"{qkv}.{t}", 0, offset=off, width=w, feeds=True) for t in kinds
                   for off, w in ((0, r * hd), (n * r * hd, hd), (n * (r + 1) * hd, hd))]
            return [Slot(f"{qkv}.weight", 1)], grp, [f"{qkv}.{t}" for t in kinds]
        q, k, v = (f"{lp}self_attn.{x}_proj" for x in "qkv")
        grp = [Slot(f"{m}.{t}", 0, width=w, feeds=True) for t in kinds for m, w in ((q, r * hd), (k, hd), (v, hd))]
        return [Slot(f"{m}.weight", 1) for m in (q, k, v)], grp, [f"{m}.{t}" for m in (q, k, v) for t in kinds]

    def _ffn_in_slots(self, lp: str, g: Geometry, bias: bool) -> tuple[list[Slot], list[Slot], list[str]]:
        """(hidden slots, neuron slots, tensors) of one layer's gate/up projections."""
        kinds = ("weight", "bias") if bias else ("weight",)
        if self.fused_gate_up:  # rows: ffn gate neurons | ffn up neurons
            gu = f"{lp}mlp.gate_up_proj"
            neu = [Slot(f"{gu}.{t}", 0, offset=off, feeds=True) for t in kinds for off in (0, g.ffn)]
            return [Slot(f"{gu}.weight", 1)], neu, [f"{gu}.{t}" for t in kinds]
        gate, up = f"{lp}mlp.gate_proj", f"{lp}mlp.up_proj"
        neu = [Slot(f"{m}.{t}", 0, feeds=True) for t in kinds for m in (gate, up)]
        return [Slot(f"{m}.weight", 1) for m in (gate, up)], neu, [f"{m}.{t}" for m in (gate, up) for t in kinds]

    def _head_norms(self, lp: str) -> list[str]:
        """Per-layer attention tensors no structure slices (Qwen3's per-head q/k norms): dropped with the block."""
        return []

    def layout(self, model: PreTrainedModel) -> Layout:
        c = model.config
        g = self.geometry(model)
        p = self.prefix_of(model)
        hd, r = g.head_dim, g.group_size
        qkv_bias, o_bias, mlp_bias = self.biases(c)
        tied = tied_lm_head(model)
        hidden = [Slot(f"{p}embed_tokens.weight", 1, fold=True, feeds=True)]
        groups, neurons, mha_keys, ffn_keys, mha_fold, ffn_fold = [], [], [], [], [], []
        for i in range(g.n_layers):
            lp = f"{p}layers.{i}."
            ln1, ln2 = f"{lp}input_layernorm.weight", f"{lp}post_attention_layernorm.weight"
            o, down = f"{lp}self_attn.o_proj", f"{lp}mlp.down_proj"
            attn_hidden, grp, attn_t = self._attention_slots(lp, g, qkv_bias)
            ffn_hidden, neu, ffn_t = self._ffn_in_slots(lp, g, mlp_bias)
            hidden += [Slot(ln1, 0, fold=True), Slot(ln2, 0, fold=True), *attn_hidden, *ffn_hidden]
            hidden += [Slot(f"{o}.weight", 0, fold=True, feeds=True), Slot(f"{down}.weight", 0, fold=True, feeds=True)]
            if o_bias:
                hidden.append(Slot(f"{o}.bias", 0, fold=True, feeds=True))
            if mlp_bias:
                hidden.append(Slot(f"{down}.bias", 0, fold=True, feeds=True))
            groups.append([*grp, Slot(f"{o}.weight", 1, width=r * hd, fold=True)])
            neurons.append([*neu, Slot(f"{down}.weight", 1, fold=True)])
            o_t = [f"{o}.weight"] + ([f"{o}.bias"] if o_bias else [])
            down_t = [f"{down}.weight"] + ([f"{down}.bias"] if mlp_bias else [])
            mha_keys.append([ln1, *attn_t, *o_t, *self._head_norms(lp)])
            ffn_keys.append([ln2, *ffn_t, *down_t])
            mha_fold.append(o_t)
            ffn_fold.append(down_t)
        hidden.append(Slot(f"{p}norm.weight", 0, fold=not tied))
        tied_map = {}
        if hasattr(model, "lm_head"):
            if tied:
                tied_map["lm_head.weight"] = f"{p}embed_tokens.weight"
            else:
                hidden.append(Slot("lm_head.weight", 1))
        if hasattr(model, "score"):
            hidden.append(Slot("score.weight", 1))
        return Layout(hidden, groups, neurons, mha_keys, ffn_keys, mha_fold, ffn_fold, tied=tied_map)

    def hook_points(self, model: PreTrainedModel) -> HookPoints:
        base = model.base_model
        norms = [n for la in base.layers for n in (la.input_layernorm, la.post_attention_layernorm)] + [base.norm]
        return HookPoints(embeddings=[base.embed_tokens], norms=norms,
                          attn_out=[la.self_attn.o_proj for la in base.layers],
                          ffn_out=[la.mlp.down_proj for la in base.layers], base=base)

    def compressed_config(self, model: PreTrainedModel, layers: list[dict], hidden: int):
        dense = _dense(model)
        return compressed_config_from(model, self.name, hidden, dense, layers, head_dim=dense["head_dim"])

    def stock_rules(self, model: PreTrainedModel) -> StockRules:
        """Stock Llama-shaped configs: one query / key-value head count and one FFN width for every layer;
        ``head_dim`` is a config field (independent of the hidden size), but ``hidden_size`` must be a multiple of
        ``num_attention_heads``. A layer cannot lose only its attention or its FFN block; a layer without both is the
        identity (pre-norm, its norms go with its blocks), so whole layers can go. RMSNorm over a zero-padded hidden
        vector is exact once its weights and epsilon are rescaled, so a pruned hidden size can be padded to a multiple
        of the head count."""
        g = self.geometry(model)
        shapes = tuple((d, k) for d in range(1, g.hidden + 1) for k in range(1, g.n_groups + 1)
                       if d % (k * g.group_size) == 0)
        return StockRules(drop_layers=True, shapes=shapes, pad_hidden=True,
                          note=f"stock {self.name} has one head count and FFN width for all layers, hidden_size a "
                          "multiple of num_attention_heads, and no layer without its attention or FFN block (whole "
                          "layers can go)")

    def stock_config(self, model: PreTrainedModel, n_layers: int, hidden: int, groups: int, ffn: int):
        g, c = self.geometry(model), model.config
        # RMSNorm over a zero-padded vector: the mean of squares shrinks by kept / padded; the epsilon follows
        eps = c.rms_norm_eps * c.hidden_size / hidden
        extra = {}
        if getattr(c, "layer_types", None) is not None:  # per-layer attention kinds of the layers that stay
            specs = c.vtrans["layers"]
            kept = [i for i, s in enumerate(specs) if s["heads"] or s["intermediate_size"]] or [0]
            assert len(kept) == n_layers, (kept, n_layers)
            extra["layer_types"] = [c.layer_types[i] for i in kept]
        return stock_config_from(model, getattr(transformers, f"{self.family}Config"), num_hidden_layers=n_layers,
                                 hidden_size=hidden, num_attention_heads=groups * g.group_size,
                                 num_key_value_heads=groups, head_dim=g.head_dim, intermediate_size=ffn,
                                 rms_norm_eps=eps, **extra)

    def pad_hidden(self, sd: dict, model: PreTrainedModel, kept: int, padded: int) -> None:
        # rms(x_padded) = sqrt(kept / padded) * rms(x): the weights absorb the factor exactly (epsilon: stock_config)
        scale = math.sqrt(kept / padded)
        for key in sd:
            if key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or key == (
                    f"{self.prefix_of(model)}norm.weight"):
                sd[key] = sd[key] * scale

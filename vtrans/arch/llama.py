"""Llama-family decoders (pre-RMSNorm, SwiGLU, grouped-query attention, optionally tied embeddings: SmolLM2)."""

from __future__ import annotations

import math

from transformers import LlamaConfig, PreTrainedModel

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
    name = "llama"
    model_types = ("llama",)
    classes = {"LlamaModel": "VtransLlamaModel", "LlamaForCausalLM": "VtransLlamaForCausalLM",
               "LlamaForSequenceClassification": "VtransLlamaForSequenceClassification"}
    layers_path = "layers"

    def geometry(self, model: PreTrainedModel) -> Geometry:
        c, dense = model.config, _dense(model)
        lm = hasattr(model, "lm_head")
        labels = c.num_labels if hasattr(model, "score") else 0
        per_hidden = c.vocab_size + 1 + (c.vocab_size if lm and not tied_lm_head(model) else 0) + labels
        bias, mlp_bias = bool(c.attention_bias), bool(c.mlp_bias)
        return Geometry(
            n_layers=c.num_hidden_layers, hidden=dense["hidden_size"], n_groups=dense["num_key_value_heads"],
            group_size=dense["num_attention_heads"] // dense["num_key_value_heads"], head_dim=dense["head_dim"],
            ffn=dense["intermediate_size"], ffn_in_mats=2, q_bias=bias, kv_bias=bias, o_bias=bias,
            ffn_in_bias=mlp_bias, ffn_out_bias=mlp_bias, norm_params=1, pre_norm=True,
            outside_params_per_hidden=per_hidden, outside_params_const=0,
            outside_flops_per_token_hidden=2 * (c.vocab_size if lm else labels),
            outside_flops_per_seq_hidden=0, outside_flops_per_seq_const=0,
        )

    def layout(self, model: PreTrainedModel) -> Layout:
        c = model.config
        g = self.geometry(model)
        p = self.prefix_of(model)
        hd, r = g.head_dim, g.group_size
        bias, mlp_bias = bool(c.attention_bias), bool(c.mlp_bias)
        tied = tied_lm_head(model)
        hidden = [Slot(f"{p}embed_tokens.weight", 1, fold=True, feeds=True)]
        groups, neurons, mha_keys, ffn_keys, mha_fold, ffn_fold = [], [], [], [], [], []
        for i in range(g.n_layers):
            lp = f"{p}layers.{i}."
            ln1, ln2 = f"{lp}input_layernorm.weight", f"{lp}post_attention_layernorm.weight"
            q, k, v, o = (f"{lp}self_attn.{n}_proj" for n in "qkvo")
            gate, up, down = (f"{lp}mlp.{n}_proj" for n in ("gate", "up", "down"))
            hidden += [Slot(ln1, 0, fold=True), Slot(ln2, 0, fold=True)]
            hidden += [Slot(f"{m}.weight", 1) for m in (q, k, v, gate, up)]
            hidden += [Slot(f"{o}.weight", 0, fold=True, feeds=True), Slot(f"{down}.weight", 0, fold=True, feeds=True)]
            if bias:
                hidden.append(Slot(f"{o}.bias", 0, fold=True, feeds=True))
            if mlp_bias:
                hidden.append(Slot(f"{down}.bias", 0, fold=True, feeds=True))
            grp = [Slot(f"{q}.weight", 0, width=r * hd, feeds=True), Slot(f"{k}.weight", 0, width=hd, feeds=True),
                   Slot(f"{v}.weight", 0, width=hd, feeds=True), Slot(f"{o}.weight", 1, width=r * hd, fold=True)]
            if bias:
                grp += [Slot(f"{q}.bias", 0, width=r * hd, feeds=True), Slot(f"{k}.bias", 0, width=hd, feeds=True),
                        Slot(f"{v}.bias", 0, width=hd, feeds=True)]
            groups.append(grp)
            neu = [Slot(f"{gate}.weight", 0, feeds=True), Slot(f"{up}.weight", 0, feeds=True),
                   Slot(f"{down}.weight", 1, fold=True)]
            if mlp_bias:
                neu += [Slot(f"{gate}.bias", 0, feeds=True), Slot(f"{up}.bias", 0, feeds=True)]
            neurons.append(neu)
            attn_t = [f"{m}.weight" for m in (q, k, v, o)] + ([f"{m}.bias" for m in (q, k, v, o)] if bias else [])
            mlp_t = [f"{m}.weight" for m in (gate, up, down)] + (
                [f"{m}.bias" for m in (gate, up, down)] if mlp_bias else [])
            mha_keys.append([ln1, *attn_t])
            ffn_keys.append([ln2, *mlp_t])
            mha_fold.append([f"{o}.weight"] + ([f"{o}.bias"] if bias else []))
            ffn_fold.append([f"{down}.weight"] + ([f"{down}.bias"] if mlp_bias else []))
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
        """Stock Llama: one query / key-value head count and one FFN width for every layer; ``head_dim`` is a config
        field (independent of the hidden size), but ``hidden_size`` must be a multiple of ``num_attention_heads``.
        A layer cannot lose only its attention or its FFN block; a layer without both is the identity (pre-norm, its
        norms go with its blocks), so whole layers can go. RMSNorm over a zero-padded hidden vector is exact once its
        weights and epsilon are rescaled, so a pruned hidden size can be padded to a multiple of the head count."""
        g = self.geometry(model)
        shapes = tuple((d, k) for d in range(1, g.hidden + 1) for k in range(1, g.n_groups + 1)
                       if d % (k * g.group_size) == 0)
        return StockRules(drop_layers=True, shapes=shapes, pad_hidden=True,
                          note="stock llama has one head count and FFN width for all layers, hidden_size a multiple "
                          "of num_attention_heads, and no layer without its attention or FFN block (whole layers can "
                          "go)")

    def stock_config(self, model: PreTrainedModel, n_layers: int, hidden: int, groups: int, ffn: int):
        g, c = self.geometry(model), model.config
        # RMSNorm over a zero-padded vector: the mean of squares shrinks by kept / padded; the epsilon follows
        eps = c.rms_norm_eps * c.hidden_size / hidden
        return stock_config_from(model, LlamaConfig, num_hidden_layers=n_layers, hidden_size=hidden,
                                 num_attention_heads=groups * g.group_size, num_key_value_heads=groups,
                                 head_dim=g.head_dim, intermediate_size=ffn, rms_norm_eps=eps)

    def pad_hidden(self, sd: dict, model: PreTrainedModel, kept: int, padded: int) -> None:
        # rms(x_padded) = sqrt(kept / padded) * rms(x): the weights absorb the factor exactly (epsilon: stock_config)
        scale = math.sqrt(kept / padded)
        for key in sd:
            if key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or key == (
                    f"{self.prefix_of(model)}norm.weight"):
                sd[key] = sd[key] * scale

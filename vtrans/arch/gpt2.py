"""GPT-2 (pre-LayerNorm decoder with fused QKV ``Conv1D`` weights, shape ``(in, out)``)."""

from __future__ import annotations

from transformers import GPT2Config, PreTrainedModel

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
    return {"hidden_size": c.n_embd, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head,
            "head_dim": c.n_embd // c.n_head, "intermediate_size": c.n_inner or 4 * c.n_embd}


@register
class GPT2Adapter(Adapter):
    name = "gpt2"
    model_types = ("gpt2",)
    classes = {"GPT2Model": "VtransGPT2Model", "GPT2LMHeadModel": "VtransGPT2LMHeadModel",
               "GPT2ForSequenceClassification": "VtransGPT2ForSequenceClassification"}
    layers_path = "h"

    def geometry(self, model: PreTrainedModel) -> Geometry:
        c, dense = model.config, _dense(model)
        lm = hasattr(model, "lm_head")
        labels = c.num_labels if hasattr(model, "score") else 0
        per_hidden = c.vocab_size + c.n_positions + 2 + (c.vocab_size if lm and not tied_lm_head(model) else 0) + labels
        return Geometry(
            n_layers=c.n_layer, hidden=dense["hidden_size"], n_groups=dense["num_attention_heads"], group_size=1,
            head_dim=dense["head_dim"], ffn=dense["intermediate_size"], ffn_in_mats=1, q_bias=True, kv_bias=True,
            o_bias=True, ffn_in_bias=True, ffn_out_bias=True, norm_params=2, pre_norm=True,
            outside_params_per_hidden=per_hidden, outside_params_const=0,
            outside_flops_per_token_hidden=2 * (c.vocab_size if lm else labels),
            outside_flops_per_seq_hidden=0, outside_flops_per_seq_const=0,
        )

    def layout(self, model: PreTrainedModel) -> Layout:
        g = self.geometry(model)
        p = self.prefix_of(model)
        D, hd = g.hidden, g.head_dim
        tied = tied_lm_head(model)
        hidden = [Slot(f"{p}wte.weight", 1, fold=True, feeds=True), Slot(f"{p}wpe.weight", 1, fold=True, feeds=True)]
        groups, neurons, mha_keys, ffn_keys, mha_fold, ffn_fold = [], [], [], [], [], []
        for i in range(g.n_layers):
            lp = f"{p}h.{i}."
            ln1, ln2 = f"{lp}ln_1", f"{lp}ln_2"
            qkv, o, fc, down = f"{lp}attn.c_attn", f"{lp}attn.c_proj", f"{lp}mlp.c_fc", f"{lp}mlp.c_proj"
            hidden += [Slot(f"{ln}.{t}", 0, fold=True) for ln in (ln1, ln2) for t in ("weight", "bias")]
            hidden += [Slot(f"{qkv}.weight", 0), Slot(f"{fc}.weight", 0)]
            hidden += [Slot(f"{m}.weight", 1, fold=True, feeds=True) for m in (o, down)]
            hidden += [Slot(f"{m}.bias", 0, fold=True, feeds=True) for m in (o, down)]
            groups.append([Slot(f"{qkv}.weight", 1, offset=k * D, width=hd, feeds=True) for k in range(3)]
                          + [Slot(f"{qkv}.bias", 0, offset=k * D, width=hd, feeds=True) for k in range(3)]
                          + [Slot(f"{o}.weight", 0, width=hd, fold=True)])
            neurons.append([Slot(f"{fc}.weight", 1, feeds=True), Slot(f"{fc}.bias", 0, feeds=True),
                            Slot(f"{down}.weight", 0, fold=True)])
            mha_keys.append([f"{m}.{t}" for m in (ln1, qkv, o) for t in ("weight", "bias")])
            ffn_keys.append([f"{m}.{t}" for m in (ln2, fc, down) for t in ("weight", "bias")])
            mha_fold.append([f"{o}.weight", f"{o}.bias"])
            ffn_fold.append([f"{down}.weight", f"{down}.bias"])
        # the final norm's mask is folded into the tied embedding when the LM head shares it
        hidden += [Slot(f"{p}ln_f.{t}", 0, fold=not tied) for t in ("weight", "bias")]
        tied_map = {}
        if hasattr(model, "lm_head"):
            if tied:
                tied_map["lm_head.weight"] = f"{p}wte.weight"
            else:
                hidden.append(Slot("lm_head.weight", 1))
        if hasattr(model, "score"):
            hidden.append(Slot("score.weight", 1))
        return Layout(hidden, groups, neurons, mha_keys, ffn_keys, mha_fold, ffn_fold, tied=tied_map)

    def hook_points(self, model: PreTrainedModel) -> HookPoints:
        base = model.base_model
        norms = [n for block in base.h for n in (block.ln_1, block.ln_2)] + [base.ln_f]
        return HookPoints(embeddings=[base.wte, base.wpe], norms=norms, attn_out=[b.attn.c_proj for b in base.h],
                          ffn_out=[b.mlp.c_proj for b in base.h], base=base)

    def compressed_config(self, model: PreTrainedModel, layers: list[dict], hidden: int):
        dense = _dense(model)
        return compressed_config_from(model, self.name, hidden, dense, layers, n_inner=dense["intermediate_size"])

    def stock_rules(self, model: PreTrainedModel) -> StockRules:
        """Stock GPT-2: the head size is ``n_embd // n_head``, so the hidden size is the kept heads times the head
        size (pruning heads prunes the hidden size with them); one head count and FFN width for every layer; no layer
        without its attention or FFN block, but a layer without both is the identity (pre-norm), so whole layers can
        go (not with ``scale_attn_by_inverse_layer_idx``, which depends on the layer index). LayerNorm over a
        zero-padded vector has another mean and variance: a pruned hidden size cannot be padded."""
        g = self.geometry(model)
        return StockRules(drop_layers=not model.config.scale_attn_by_inverse_layer_idx,
                          shapes=tuple((k * g.head_dim, k) for k in range(1, g.n_groups + 1)), pad_hidden=False,
                          note="stock gpt2 has one head count and FFN width for all layers, n_embd = heads x head "
                          "size (LayerNorm: no padding of a pruned hidden size), and no layer without its attention "
                          "or FFN block (whole layers can go)")

    def stock_config(self, model: PreTrainedModel, n_layers: int, hidden: int, groups: int, ffn: int):
        return stock_config_from(model, GPT2Config, n_layer=n_layers, n_embd=hidden, n_head=groups, n_inner=ffn)

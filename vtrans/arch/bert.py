"""BERT-family encoders (post-LayerNorm): ``bert`` (incl. MiniLM) and ``roberta``."""

from __future__ import annotations

from transformers import PreTrainedModel

from vtrans.arch import register
from vtrans.arch.base import Adapter, HookPoints, Layout, Slot, compressed_config_from
from vtrans.budget import Geometry


def _dense(model: PreTrainedModel) -> dict:
    c = model.config
    if getattr(c, "vtrans", None) is not None:
        return c.vtrans["dense"]
    return {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_attention_heads, "head_dim": c.hidden_size // c.num_attention_heads,
            "intermediate_size": c.intermediate_size}


@register
class BertAdapter(Adapter):
    name = "bert"
    model_types = ("bert",)
    classes = {"BertModel": "VtransBertModel",
               "BertForSequenceClassification": "VtransBertForSequenceClassification"}
    #: state-dict path of the classifier's first layer (reads the hidden size) and its output width
    head_in = {"BertModel": "pooler.dense", "BertForSequenceClassification": "bert.pooler.dense"}

    def _head(self, model: PreTrainedModel) -> str | None:
        cls = type(model).__name__.removeprefix("Vtrans")
        key = self.head_in.get(cls)
        if key is not None and key.endswith("pooler.dense") and getattr(model.base_model, "pooler", None) is None:
            return None
        return key

    def _head_size(self, model: PreTrainedModel) -> int:
        rec = getattr(model.config, "vtrans", None)
        return rec["head_size"] if rec else model.config.hidden_size

    def geometry(self, model: PreTrainedModel) -> Geometry:
        c, dense = model.config, _dense(model)
        head = self._head(model)
        hp = self._head_size(model) if head else 0
        labels = c.num_labels if "SequenceClassification" in type(model).__name__ else 0
        return Geometry(
            n_layers=c.num_hidden_layers, hidden=dense["hidden_size"], n_groups=dense["num_attention_heads"],
            group_size=1, head_dim=dense["head_dim"], ffn=dense["intermediate_size"], ffn_in_mats=1,
            q_bias=True, kv_bias=True, o_bias=True, ffn_in_bias=True, ffn_out_bias=True, norm_params=2,
            pre_norm=False,
            outside_params_per_hidden=c.vocab_size + c.max_position_embeddings + c.type_vocab_size + 2 + hp,
            outside_params_const=hp + (hp * labels + labels),
            outside_flops_per_token_hidden=0,
            outside_flops_per_seq_hidden=2 * hp,  # the pooler / classifier dense reads one token
            outside_flops_per_seq_const=2 * hp * labels,
        )

    def layout(self, model: PreTrainedModel) -> Layout:
        g = self.geometry(model)
        p = self.prefix_of(model)
        hd = g.head_dim
        hidden = [Slot(f"{p}embeddings.{e}.weight", 1, feeds=True)
                  for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
        hidden += [Slot(f"{p}embeddings.LayerNorm.{t}", 0, fold=True) for t in ("weight", "bias")]
        groups, neurons, mha_keys, ffn_keys, mha_fold, ffn_fold = [], [], [], [], [], []
        for i in range(g.n_layers):
            lp = f"{p}encoder.layer.{i}."
            qkv = [f"{lp}attention.self.{n}" for n in ("query", "key", "value")]
            o, ln1 = f"{lp}attention.output.dense", f"{lp}attention.output.LayerNorm"
            up, down, ln2 = f"{lp}intermediate.dense", f"{lp}output.dense", f"{lp}output.LayerNorm"
            hidden += [Slot(f"{m}.weight", 1) for m in qkv]
            hidden += [Slot(f"{o}.weight", 0, fold=True, feeds=True), Slot(f"{o}.bias", 0, fold=True, feeds=True)]
            hidden += [Slot(f"{ln1}.{t}", 0, fold=True) for t in ("weight", "bias")]
            hidden += [Slot(f"{up}.weight", 1)]
            hidden += [Slot(f"{down}.weight", 0, fold=True, feeds=True), Slot(f"{down}.bias", 0, fold=True, feeds=True)]
            hidden += [Slot(f"{ln2}.{t}", 0, fold=True) for t in ("weight", "bias")]
            groups.append([Slot(f"{m}.{t}", 0, width=hd, feeds=True) for m in qkv for t in ("weight", "bias")]
                          + [Slot(f"{o}.weight", 1, width=hd, fold=True)])
            neurons.append([Slot(f"{up}.weight", 0, feeds=True), Slot(f"{up}.bias", 0, feeds=True),
                            Slot(f"{down}.weight", 1, fold=True)])
            mha_keys.append([f"{m}.{t}" for m in (*qkv, o) for t in ("weight", "bias")])
            ffn_keys.append([f"{m}.{t}" for m in (up, down) for t in ("weight", "bias")])
            mha_fold.append([f"{o}.weight", f"{o}.bias"])
            ffn_fold.append([f"{down}.weight", f"{down}.bias"])
        head = self._head(model)
        if head:
            hidden.append(Slot(f"{head}.weight", 1))
        return Layout(hidden, groups, neurons, mha_keys, ffn_keys, mha_fold, ffn_fold)

    def hook_points(self, model: PreTrainedModel) -> HookPoints:
        base = model.base_model
        layers = list(base.encoder.layer)
        norms = [base.embeddings.LayerNorm]
        for layer in layers:
            norms += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
        return HookPoints(embeddings=[], norms=norms, attn_out=[la.attention.output.dense for la in layers],
                          ffn_out=[la.output.dense for la in layers], base=base)

    def compressed_config(self, model: PreTrainedModel, layers: list[dict], hidden: int):
        return compressed_config_from(model, self.name, hidden, _dense(model), layers,
                                      extra={"head_size": self._head_size(model)})


@register
class RobertaAdapter(BertAdapter):
    name = "roberta"
    model_types = ("roberta",)
    classes = {"RobertaModel": "VtransRobertaModel",
               "RobertaForSequenceClassification": "VtransRobertaForSequenceClassification"}
    head_in = {"RobertaModel": "pooler.dense", "RobertaForSequenceClassification": "classifier.dense"}

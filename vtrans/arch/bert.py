"""BERT-family encoders (post-LayerNorm): ``bert`` (incl. MiniLM) and ``roberta``."""

from __future__ import annotations

from transformers import BertConfig, PreTrainedModel, RobertaConfig

from vtrans.arch import register
from vtrans.arch.base import Adapter, HookPoints, Layout, Slot, StockRules, compressed_config_from, stock_config_from
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
    layers_path = "encoder.layer"
    stock_config_class = BertConfig

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

    def stock_rules(self, model: PreTrainedModel) -> StockRules:
        """Stock BERT / RoBERTa: post-LayerNorm, so a layer without blocks still applies its two LayerNorms and no
        layer can go; the head size is ``hidden_size / num_attention_heads`` and the pooler (RoBERTa: the
        classifier's dense layer) maps the hidden size to itself, so with a pooler / classifier the hidden size and
        the head count stay dense (without one, hidden = kept heads x head size); LayerNorm forbids padding a pruned
        hidden size. What shrinks uniformly: the FFN width."""
        g = self.geometry(model)
        if self._head(model):
            hs = self._head_size(model)
            k = hs // g.head_dim
            shapes = ((hs, k),) if hs % g.head_dim == 0 and k <= g.n_groups else ()
        else:
            shapes = tuple((k * g.head_dim, k) for k in range(1, g.n_groups + 1))
        return StockRules(drop_layers=False, shapes=shapes, pad_hidden=False,
                          note=f"stock {self.name} is post-LayerNorm (every layer stays), its head size is hidden / "
                          "heads and its pooler / classifier maps hidden to hidden (hidden size and heads stay dense); "
                          "only the FFN width shrinks")

    def stock_config(self, model: PreTrainedModel, n_layers: int, hidden: int, groups: int, ffn: int):
        return stock_config_from(model, self.stock_config_class, num_hidden_layers=n_layers, hidden_size=hidden,
                                 num_attention_heads=groups, intermediate_size=ffn)


@register
class RobertaAdapter(BertAdapter):
    name = "roberta"
    model_types = ("roberta",)
    classes = {"RobertaModel": "VtransRobertaModel",
               "RobertaForSequenceClassification": "VtransRobertaForSequenceClassification"}
    head_in = {"RobertaModel": "pooler.dense", "RobertaForSequenceClassification": "classifier.dense"}
    stock_config_class = RobertaConfig

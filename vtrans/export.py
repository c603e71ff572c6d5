"""Stock export: a vtrans-compressed model as the stock Hugging Face architecture, computing the same function.

```python
stock = vtrans.export.to_stock(small)         # LlamaForCausalLM, BertModel, ...: no auto_map, no modeling file
stock.save_pretrained("out/")                 # loads where vtrans is not installed: AutoModel*.from_pretrained
```

A stock config has one width per structure for every layer. Every layer is zero-padded to common widths: padded key /
value groups have zero query, key, value and output weights (their scores are uniform, their values zero, their output
columns zero: they add exactly nothing); padded FFN neurons have zero input rows and output columns (``act(0) * 0``);
a removed attention or FFN block becomes one of zero weights and biases. Layers without any block go where the
architecture is pre-norm (the identity; :attr:`StockRules.drop_layers`). A pruned hidden size is padded only under
RMSNorm (Llama): over a vector with ``padded - kept`` zeros the mean of squares is ``kept / padded`` of the kept
vector's, which the norm weights (times ``sqrt(kept / padded)``) and epsilon (times ``kept / padded``) absorb exactly.
A LayerNorm's mean and variance over a padded vector change in a way no weight absorbs: BERT / RoBERTa / GPT-2
checkpoints with a pruned hidden size that their stock config cannot express are refused (:class:`ExportError`).
Padding gives back the dense widths' cost: a checkpoint compressed for speed is better made with ``uniform``.
"""

from __future__ import annotations

import json
import os
import re

import torch
import transformers
from transformers import PreTrainedModel

from vtrans import arch
from vtrans.budget import Selection
from vtrans.compress import axis_masks
from vtrans.errors import ExportError
from vtrans.model_card import write_model_card
from vtrans.modeling_vtrans import COMPRESSION_FILE

#: Formats of ``vtrans export --format``.
FORMATS = ("stock",)


class StockSaveMixin:
    """A stock Hugging Face model that also writes compression.json (and the tokenizer) in ``save_pretrained``; the
    config and weights are the stock class's own (``architectures`` names the stock class, no ``auto_map``)."""

    vtrans_report: dict | None = None

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        tokenizer = getattr(self, "vtrans_tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        if self.vtrans_report is not None:
            with open(os.path.join(save_directory, COMPRESSION_FILE), "w") as f:
                json.dump(self.vtrans_report, f, indent=2)
            write_model_card(save_directory, self.vtrans_report, stock=True)
        return result


_STOCK_CLASSES: dict[type, type] = {}


def stock_class(name: str) -> type[PreTrainedModel]:
    """The stock class ``name`` (``LlamaForCausalLM``) with :class:`StockSaveMixin`, under the same name (so
    ``save_pretrained`` records the stock class in ``architectures``)."""
    base = getattr(transformers, name)
    if base not in _STOCK_CLASSES:
        _STOCK_CLASSES[base] = type(name, (StockSaveMixin, base), {"__module__": base.__module__,
                                                                   "__qualname__": base.__qualname__})
    return _STOCK_CLASSES[base]


def _target_shape(rules, kept: int, groups: int, name: str) -> tuple[int, int]:
    """The smallest ``(hidden, groups)`` of ``rules.shapes`` holding ``kept`` hidden dims and ``groups`` groups."""
    fits = [(d, k) for d, k in rules.shapes if k >= groups and (d == kept or (rules.pad_hidden and d > kept))]
    if not fits:
        raise ExportError(f"hidden_size={kept} with up to {groups} kv groups per layer cannot be written as stock "
                          f"{name} with the same outputs: {rules.note}; a LayerNorm over a pruned hidden size cannot "
                          f"be zero-padded exactly. Compress the dense model with --uniform instead")
    return min(fits)


def stock_shape(model: PreTrainedModel) -> tuple[list[int], int, int, int]:
    """``(kept layers, hidden size, key/value groups, FFN width)`` of the stock form of a vtrans-compressed model
    (from its config alone: a model on the meta device will do), or :class:`ExportError`."""
    adapter = arch.for_model(model)
    rec = getattr(model.config, "vtrans", None)
    if rec is None:
        raise ExportError(f"model of type {model.config.model_type!r} is not vtrans-compressed; only a vtrans "
                          f"checkpoint (model_type vtrans_*) is exported")
    rules = adapter.stock_rules(model)
    specs = rec["layers"]
    kept = [i for i, s in enumerate(specs) if not (rules.drop_layers and s["heads"] == 0
                                                    and s["intermediate_size"] == 0)] or [0]
    groups = max([specs[i]["kv_heads"] for i in kept] + [1])
    ffn = max([specs[i]["intermediate_size"] for i in kept] + [1])
    d_t, groups_t = _target_shape(rules, model.config.hidden_size, groups, adapter.name)
    return kept, d_t, groups_t, ffn


@torch.no_grad()
def to_stock(model: PreTrainedModel) -> PreTrainedModel:
    """The stock Hugging Face model computing what the vtrans-compressed ``model`` computes (see the module doc).

    Raises :class:`ExportError` for a model that is not vtrans-compressed and for one the stock architecture cannot
    express exactly (a LayerNorm model's pruned hidden size). The result's ``save_pretrained`` writes the stock
    checkpoint plus compression.json (and the tokenizer the compressed model carried)."""
    adapter = arch.for_model(model)
    kept, d_t, groups_t, ffn = stock_shape(model)
    rec, specs, d = model.config.vtrans, model.config.vtrans["layers"], model.config.hidden_size

    config = adapter.stock_config(model, n_layers=len(kept), hidden=d_t, groups=groups_t, ffn=ffn)
    cls = stock_class(type(model).__name__.removeprefix("Vtrans"))
    device = next(model.parameters()).device
    with torch.device(device):
        stock = cls(config)
    stock.to(dtype=next(model.parameters()).dtype)

    # the compressed tensors under the stock layer numbering (dropped layers left out)
    stack = re.compile(rf"^({re.escape(adapter.prefix_of(model) + adapter.layers_path)})\.(\d+)\.(.*)$")
    renumber = {old: new for new, old in enumerate(kept)}
    src: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        m = stack.match(key)
        if m is None:
            src[key] = t
        elif int(m.group(2)) in renumber:
            src[f"{m.group(1)}.{renumber[int(m.group(2))]}.{m.group(3)}"] = t

    # where each compressed tensor goes in the stock one: its units first, the padding (zeros) after them
    layout = adapter.layout(stock)
    n = len(kept)
    sel = Selection(hidden=torch.arange(d_t) < d,
                    groups=[torch.arange(groups_t) < specs[i]["kv_heads"] for i in kept],
                    neurons=[torch.arange(ffn) < specs[i]["intermediate_size"] for i in kept],
                    mha=torch.ones(n, dtype=torch.bool), ffn=torch.ones(n, dtype=torch.bool))
    target = {k: v for k, v in stock.state_dict().items() if k not in layout.tied}
    cuts = axis_masks({k: tuple(v.shape) for k, v in target.items()}, layout, sel)
    removed = {k for j in range(n) for k in (layout.mha_keys[j] if specs[kept[j]]["heads"] == 0 else [])
               + (layout.ffn_keys[j] if specs[kept[j]]["intermediate_size"] == 0 else [])}
    params = {k for k, _ in stock.named_parameters()}
    sd: dict[str, torch.Tensor] = {}
    for key, like in target.items():
        if key in src:
            index = [torch.arange(like.shape[ax], device=like.device) for ax in range(like.dim())]
            for ax, keep in cuts.get(key, []):
                index[ax] = torch.nonzero(keep).flatten().to(like.device)
            out = torch.zeros_like(like)
            out[torch.meshgrid(*index, indexing="ij") if like.dim() else ()] = src[key].to(like.dtype)
            sd[key] = out
        elif key in removed:
            sd[key] = torch.zeros_like(like)  # a removed block: zero weights, zero biases, zero norm weights
        elif key in params:
            raise RuntimeError(f"stock export of {type(model).__name__}: no source for parameter {key!r}")
    if d_t != d:
        adapter.pad_hidden(sd, stock, d, d_t)
    missing, unexpected = stock.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k in params and k not in layout.tied]
    if missing or unexpected:
        raise RuntimeError(f"stock state dict does not match {cls.__name__}: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    stock.train(model.training)

    report = dict(rec.get("report") or {})
    report["format"] = "stock"
    report["stock"] = {"model_type": config.model_type, "layers": kept, "hidden_size": d_t,
                       "kv_heads": groups_t, "intermediate_size": ffn,
                       "padded": d_t != d or any(specs[i]["kv_heads"] != groups_t or
                                                 specs[i]["intermediate_size"] != ffn for i in kept)}
    stock.vtrans_report = report
    tokenizer = getattr(model, "vtrans_tokenizer", None)
    if tokenizer is not None:
        stock.vtrans_tokenizer = tokenizer
    return stock

"""The model card (``README.md`` with Hugging Face metadata) every checkpoint vtrans writes carries.

Built from the compression record (``compression.json``, :func:`vtrans.compress.report`): the method, the budget, the
exact parameters and FLOPs against the dense model, the per-layer widths, how to load it, and - where the writer
knows them - the command that made it and measured quality and speed (``report["command"]``, ``report["measured"]``).
The front matter is the Hub's: ``base_model`` (when the source is a Hub id), ``library_name: transformers``,
``tags`` and ``pipeline_tag``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

#: The file name of the card in a checkpoint directory.
MODEL_CARD = "README.md"

#: ``pipeline_tag`` of the Hub by the head a checkpoint's ``architectures`` names.
_PIPELINE_TAGS = (("ForSequenceClassification", "text-classification"), ("ForCausalLM", "text-generation"))

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(source: str) -> str | None:
    """``source`` when it names a Hub repository (``org/name``, not a local path)."""
    if not source or not _HUB_ID.match(source) or os.path.exists(source):
        return None
    return source


def _pipeline_tag(architectures: list[str]) -> str:
    for suffix, tag in _PIPELINE_TAGS:
        if any(a.endswith(suffix) for a in architectures):
            return tag
    return "feature-extraction"


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.4f}" if b else "-"


def model_card(report: dict, architectures: list[str], stock: bool) -> str:
    """The card's text for a checkpoint with compression record ``report`` whose config names ``architectures``;
    ``stock``: saved as the stock Hugging Face architecture (loads without vtrans)."""
    source = str(report.get("source_model") or "")
    hub = _hub_id(source)
    tag = _pipeline_tag(architectures)
    front = ["---"]
    if hub:
        front.append(f"base_model: {hub}")
    front += ["library_name: transformers", "tags:", "- pruned", "- structured-pruning", "- vtrans",
              f"pipeline_tag: {tag}", "---"]
    budget = report.get("budget") or {}
    dense, kept = report.get("dense") or {}, report.get("compressed") or {}
    seq = dense.get("seq_len", 128)
    name = Path(source).name if source else "a transformer"
    lines = [f"# {name}, structurally pruned by vtrans", ""]
    what = f"Method `{report.get('method', '?')}`"
    if budget:
        what += (f", budget `{budget.get('metric')}={budget.get('value')}` ({budget.get('scope')}"
                 + (", uniform" if budget.get("uniform") else "")
                 + (", widths aligned to " + ", ".join(f"{k} {v}" for k, v in budget["align"].items())
                    if budget.get("align") else "") + ")")
    lines += [f"{what}; vtrans {report.get('vtrans_version', '?')}, architecture `{report.get('architecture', '?')}`."
              + (f" Compressed from `{source}`." if source else ""), ""]
    rows = [("parameters (transformer blocks)", "params_blocks"), ("parameters (whole model)", "params_total"),
            (f"FLOPs per sequence of {seq} tokens (blocks)", "flops_blocks"),
            (f"FLOPs per sequence of {seq} tokens (whole model)", "flops_total")]
    lines += ["| | dense | compressed | compressed / dense |", "|---|---|---|---|"]
    for label, key in rows:
        if key in dense and key in kept:
            lines.append(f"| {label} | {dense[key]:,} | {kept[key]:,} | {_ratio(kept[key], dense[key])} |")
    hidden = report.get("hidden_size") or {}
    if hidden:
        lines.append(f"| hidden size | {hidden.get('dense')} | {hidden.get('kept')} | |")
    measured = report.get("measured") or {}
    for key, value in measured.items():
        lines.append(f"| {key} | {value.get('dense', '-')} | {value.get('compressed', '-')} | |")
    layers = report.get("layers") or []
    if layers:
        lines += ["", "Per layer (a removed block keeps no heads or neurons):", "",
                  "| layer | attention | heads | key/value heads | FFN | FFN neurons |", "|---|---|---|---|---|---|"]
        for i, layer in enumerate(layers):
            lines.append(f"| {i} | {'kept' if layer.get('attention') else 'removed'} | {layer.get('heads')} | "
                         f"{layer.get('kv_heads')} | {'kept' if layer.get('ffn') else 'removed'} | "
                         f"{layer.get('ffn_neurons')} |")
    auto = {"text-classification": "AutoModelForSequenceClassification", "text-generation": "AutoModelForCausalLM"}
    cls = auto.get(tag, "AutoModel")
    lines += ["", "## Loading", "", "```python", f"from transformers import {cls}", "",
              f'model = {cls}.from_pretrained("path/to/this/folder")', "```", ""]
    if stock:
        lines.append("A stock Hugging Face checkpoint: it loads with transformers alone, no vtrans and no remote code.")
    else:
        lines.append("Every layer has its own widths. With vtrans installed (`import vtrans` first) it loads with the "
                     "installed vtrans classes and no flag; without vtrans, `trust_remote_code=True` runs the "
                     "`modeling_vtrans.py` stored here - read it first. `vtrans export DIR --format stock` pads it "
                     "to a stock checkpoint where the architecture allows.")
    if report.get("command"):
        lines += ["", "## How it was made", "", "```bash", str(report["command"]), "```"]
    lines += ["", "`compression.json` holds the full record (kept units of every layer, the budget's target and the "
              "achieved fraction).", ""]
    return "\n".join(front + lines)


def write_model_card(directory: str | os.PathLike, report: dict, stock: bool) -> Path:
    """Write :func:`model_card` into ``directory`` (next to a saved ``config.json``) and return its path."""
    directory = Path(directory)
    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    path = directory / MODEL_CARD
    path.write_text(model_card(report, architectures, stock))
    return path

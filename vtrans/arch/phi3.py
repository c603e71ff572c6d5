"""Phi-3: Llama-shaped with fused projections. ``qkv_proj`` rows are all query heads, then all key heads, then all
value heads; ``gate_up_proj`` rows are the gate neurons, then the up neurons. A kept key/value group keeps its query
heads' rows, its key head's rows and its value head's rows; a kept neuron keeps its gate row and its up row."""

from __future__ import annotations

from vtrans.arch import register
from vtrans.arch.llama import LlamaAdapter


@register
class Phi3Adapter(LlamaAdapter):
    name = "phi3"
    model_types = ("phi3",)
    family = "Phi3"
    fused_qkv = True
    fused_gate_up = True

"""Mistral: Llama-shaped (no biases); its sliding-window fields are ordinary config fields and travel with it."""

from __future__ import annotations

from vtrans.arch import register
from vtrans.arch.llama import LlamaAdapter


@register
class MistralAdapter(LlamaAdapter):
    name = "mistral"
    model_types = ("mistral",)
    family = "Mistral"

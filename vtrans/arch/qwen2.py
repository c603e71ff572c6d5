"""Qwen2: Llama-shaped with biases on the query, key and value projections (none on the output projection or the FFN);
the small sizes tie the LM head to the token embeddings."""

from __future__ import annotations

from vtrans.arch import register
from vtrans.arch.llama import LlamaAdapter


@register
class Qwen2Adapter(LlamaAdapter):
    name = "qwen2"
    model_types = ("qwen2",)
    family = "Qwen2"

    def biases(self, config) -> tuple[bool, bool, bool]:
        return True, False, False  # q/k/v, o, FFN: fixed by the architecture, not by a config field

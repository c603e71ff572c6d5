"""Qwen3: Llama-shaped with an explicit ``head_dim`` (not ``hidden_size / num_attention_heads``) and per-head RMSNorms
on the queries and keys (``q_norm`` / ``k_norm``, over ``head_dim``, shared by every head). Heads are pruned whole, so
the norms keep their shape and go only with the attention block: ``2 * head_dim`` parameters per kept block whatever
its width (``Geometry.mha_params_const``). Group masks act on the attention output (``o_proj``'s input), after the
norms, so the norms' scale invariance does not undo them."""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedModel

from vtrans.arch import register
from vtrans.arch.llama import LlamaAdapter
from vtrans.budget import Geometry


@register
class Qwen3Adapter(LlamaAdapter):
    name = "qwen3"
    model_types = ("qwen3",)
    family = "Qwen3"

    def geometry(self, model: PreTrainedModel) -> Geometry:
        g = super().geometry(model)
        return dataclasses.replace(g, mha_params_const=2 * g.head_dim)

    def _head_norms(self, lp: str) -> list[str]:
        return [f"{lp}self_attn.q_norm.weight", f"{lp}self_attn.k_norm.weight"]

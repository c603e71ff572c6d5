"""Qwen3: Llama-shaped with an explicit ``head_dim`` and per-head RMSNorms on the queries and keys (``q_norm`` /
``k_norm``, over ``head_dim``, shared by every head): heads are pruned whole, so the norms keep their shape and go only
with the attention block.

Not registered yet: the norms are ``2 * head_dim`` parameters per kept attention block whatever its width, which
:class:`vtrans.budget.Geometry` cannot express (its attention size is linear in the kept groups and the hidden size).
Registering it needs one Geometry field (``mha_params_const``, added in ``budget.mha_size``) set here to
``2 * head_dim``; until then its counts would be off by that much per layer.
"""

from __future__ import annotations

from vtrans.arch.llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    name = "qwen3"
    model_types = ("qwen3",)
    family = "Qwen3"

    def _head_norms(self, lp: str) -> list[str]:
        return [f"{lp}self_attn.q_norm.weight", f"{lp}self_attn.k_norm.weight"]

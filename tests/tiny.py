"""Tiny models of every registered architecture and head class, built from configs (~10k params, no download)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)

VOCAB = 60
_DECODER_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 64}
#: Llama-shaped decoders (pre-RMSNorm: hidden size padded on stock export, whole layers dropped)
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def _config(arch: str, **kw):
    if arch == "bert":
        c = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=64)
    elif arch == "roberta":
        c = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=64, pad_token_id=1)
    elif arch == "gpt2":
        c = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    elif arch == "llama":  # grouped-query attention (2 query heads per kv group) and tied embeddings, as SmolLM2
        c = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    elif arch == "mistral":  # a sliding window shorter than the test sequences
        c = MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=48, sliding_window=6, **_DECODER_TOKENS)
    elif arch == "qwen2":  # q/k/v biases, tied embeddings (as Qwen2.5-0.5B)
        c = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True, **_DECODER_TOKENS)
    elif arch == "qwen3":  # an explicit head_dim (16, not 32 / 4) and per-head q/k RMSNorms
        c = Qwen3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=48, tie_word_embeddings=False,
                        **_DECODER_TOKENS)
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj
        c = Phi3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=48, **_DECODER_TOKENS)
    else:
        raise ValueError(arch)
    for k, v in kw.items():
        setattr(c, k, v)
    if getattr(c, "layer_types", None) is not None and "layer_types" not in kw:  # one per layer (Qwen2)
        c.layer_types = [c.layer_types[0]] * c.num_hidden_layers
    return c


#: (architecture, class) for every supported head class
CASES: list[tuple[str, type[PreTrainedModel]]] = [
    ("bert", BertModel), ("bert", BertForSequenceClassification),
    ("roberta", RobertaModel), ("roberta", RobertaForSequenceClassification),
    ("gpt2", GPT2Model), ("gpt2", GPT2LMHeadModel), ("gpt2", GPT2ForSequenceClassification),
    ("llama", LlamaModel), ("llama", LlamaForCausalLM), ("llama", LlamaForSequenceClassification),
    # the Llama-shaped families share Llama's body and head code: each with the heads that exercise what is its own
    ("mistral", MistralForCausalLM),
    ("qwen2", Qwen2ForCausalLM), ("qwen2", Qwen2ForSequenceClassification),
    ("qwen3", Qwen3ForCausalLM), ("qwen3", Qwen3ForSequenceClassification),
    ("phi3", Phi3ForCausalLM), ("phi3", Phi3ForSequenceClassification),
]
IDS = [cls.__name__ for _, cls in CASES]


def tiny(arch: str, cls: type[PreTrainedModel], seed: int = 0, attn: str = "eager", **kw) -> PreTrainedModel:
    """A tiny randomly initialised model in eval mode (eager attention so FlopCounterMode sees attention)."""
    torch.manual_seed(seed)
    config = _config(arch, **kw)
    config._attn_implementation = attn
    model = cls(config).eval()
    # a random-init LayerNorm is the identity map; perturb so hidden-dimension folding is really exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def main_output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def input_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))

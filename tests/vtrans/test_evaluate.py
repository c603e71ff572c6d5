"""Quality metrics against a direct computation, and a diverged model's perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

from tests.tiny import tiny
from vtrans.evaluate import accuracy, perplexity


def _samples(n: int, seq: int, labels: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (n, seq), generator=g)
    return [{"input_ids": ids[i], "labels": (ids[i, 0] > 31).long() if labels else ids[i],
             "sample_id": torch.tensor(i)} for i in range(n)]


def test_accuracy_is_the_share_of_argmax_hits() -> None:
    model = tiny("bert", BertForSequenceClassification)
    data = _samples(13, 6, labels=True)
    with torch.no_grad():
        pred = model(input_ids=torch.stack([d["input_ids"] for d in data])).logits.argmax(-1)
    hits = int((pred == torch.stack([d["labels"] for d in data])).sum())
    assert 0 < hits < 13 and accuracy(model, data, pad_token_id=0, batch_size=4) == hits / 13


def test_perplexity_is_exp_of_the_mean_token_loss() -> None:
    model = tiny("llama", LlamaForCausalLM)
    data = _samples(5, 8, labels=False)
    ids = torch.stack([d["input_ids"] for d in data])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert perplexity(model, data, pad_token_id=0, batch_size=2) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_a_diverged_model_has_infinite_perplexity() -> None:
    model = tiny("llama", LlamaForCausalLM)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)  # tied embeddings: logits of order 1e5, a mean loss far past exp's range
    assert perplexity(model, _samples(3, 8, labels=False), pad_token_id=0) == math.inf

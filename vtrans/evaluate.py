"""Task quality of a model on a dataset: accuracy (sequence classification) and perplexity (causal LM)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel

from vtrans.data import collate
from vtrans.progress import progress


def _batches(dataset: Dataset, batch_size: int, pad_token_id: int, desc: str | None = None):
    starts = range(0, len(dataset), batch_size)
    if desc is not None:  # progress lines (a bar on a terminal)
        starts = progress(starts, desc=desc, unit="batch")
    for start in starts:
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_token_id)


@torch.no_grad()
def accuracy(model: PreTrainedModel, dataset: Dataset, pad_token_id: int, batch_size: int = 64,
             desc: str | None = None) -> float:
    """Share of samples whose arg-max logit is the label (``desc``: report progress under that name)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for batch in _batches(dataset, batch_size, pad_token_id, desc):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits  # (batch, labels)
        correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
        total += len(batch["labels"])
    model.train(was_training)
    return correct / max(total, 1)


@torch.no_grad()
def perplexity(model: PreTrainedModel, dataset: Dataset, pad_token_id: int, batch_size: int = 8,
               desc: str | None = None) -> float:
    """``exp`` of the mean next-token loss over every predicted token of the dataset (``desc``: report progress)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for batch in _batches(dataset, batch_size, pad_token_id, desc):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (batch, seq-1, vocab)
        target = batch["labels"][:, 1:].to(device)  # (batch, seq-1)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                                                 reduction="sum")
        nll += float(loss)
        tokens += int((target != -100).sum())
    model.train(was_training)
    mean = nll / max(tokens, 1)
    # a diverged model: exp overflows a float past ~709 (and a NaN loss ranks with it, as the worst)
    return math.exp(mean) if mean < 709 else math.inf

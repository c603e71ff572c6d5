"""Training-free scorers."""

from __future__ import annotations

import pytest
import torch
from transformers import BertModel, LlamaForCausalLM

import vtrans
from tests.tiny import tiny
from vtrans.scoring import magnitude, random, score


def test_magnitude_ranks_a_zeroed_head_and_neuron_last() -> None:
    model = tiny("bert", BertModel)
    att = model.encoder.layer[1].attention.self
    with torch.no_grad():
        for lin in (att.query, att.key, att.value):
            lin.weight[16:24] = 0.0  # head 2 (head_dim 8)
            lin.bias[16:24] = 0.0
        model.encoder.layer[0].intermediate.dense.weight[5] = 0.0
        model.encoder.layer[0].intermediate.dense.bias[5] = 0.0
    sc = magnitude(model)
    assert int(sc.groups[1].argmin()) == 2 and sc.groups[1][2] == 0
    assert int(sc.neurons[0].argmin()) == 5
    assert sc.neurons[0].mean().item() == pytest.approx(1.0)  # normalised per type and layer
    assert torch.isinf(sc.mha).all() and torch.isinf(sc.ffn).all()


def test_gqa_groups_are_scored_per_kv_group() -> None:
    model = tiny("llama", LlamaForCausalLM)
    sc = magnitude(model, p=1)
    assert [s.shape[0] for s in sc.groups] == [2, 2]


def test_random_is_seeded() -> None:
    model = tiny("bert", BertModel)
    assert torch.equal(random(model, 3).hidden, random(model, 3).hidden)
    assert not torch.equal(random(model, 3).hidden, random(model, 4).hidden)


def test_scorer_budget_end_to_end() -> None:
    model = tiny("bert", BertModel)
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    vib.apply_budget(vtrans.Budget(params=0.5), scores=score(model, "magnitude"), method="magnitude")
    small = vtrans.compress(vib)
    assert small.config.vtrans["report"]["method"] == "magnitude"
    with pytest.raises(vtrans.ConfigError, match="'fisher'"):
        score(model, "fisher")

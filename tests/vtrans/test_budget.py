"""Budget accounting (hand-checkable counts) and exact budget selection."""

from __future__ import annotations

import pytest
import torch

import vtrans
from vtrans.budget import Geometry, Keep, Scores, counts, layer_size, select, size

BERT_BASE_LIKE = Geometry(
    n_layers=2, hidden=8, n_groups=2, group_size=1, head_dim=4, ffn=16, ffn_in_mats=1, q_bias=True, kv_bias=True,
    o_bias=True, ffn_in_bias=True, ffn_out_bias=True, norm_params=2, pre_norm=False, outside_params_per_hidden=100,
    outside_params_const=7, outside_flops_per_token_hidden=0, outside_flops_per_seq_hidden=2,
    outside_flops_per_seq_const=3,
)


def test_layer_params_by_hand() -> None:
    g = BERT_BASE_LIKE
    # attention: q,k,v,o weights 4 * 8 * 8 + biases 3 * 8 + 8; ffn: 2 * 8 * 16 + 16 + 8; two post-LNs: 2 * 2 * 8
    assert layer_size(g, "params", 8, 2, 16, 1, 1) == (4 * 64 + 32) + (256 + 24) + 32
    # one head, 3 neurons, hidden 5: q,k,v,o 4 * 5 * 4 + biases 3 * 4 + 5; ffn 2 * 5 * 3 + 3 + 5; norms 2 * 2 * 5
    assert layer_size(g, "params", 5, 1, 3, 1, 1) == (80 + 17) + (30 + 8) + 20
    # removed blocks: the post-LN norms stay
    assert layer_size(g, "params", 5, 0, 0, 0, 0) == 20


def test_layer_flops_by_hand() -> None:
    g = BERT_BASE_LIKE
    s = 10
    # projections 2 * s * (4 * d * q) + attention 2 * 2 * s * s * q; ffn 2 * s * 2 * d * f
    assert layer_size(g, "flops", 8, 2, 16, 1, 1, seq_len=s) == 2 * s * 4 * 64 + 4 * s * s * 8 + 2 * s * 2 * 8 * 16
    assert layer_size(g, "flops", 8, 2, 16, 0, 1, seq_len=s) == 2 * s * 2 * 8 * 16


def test_total_scope_adds_the_outside() -> None:
    g = BERT_BASE_LIKE
    k = g.dense_keep()
    assert size(g, k, "params", "total") == size(g, k, "params", "blocks") + 100 * 8 + 7
    assert size(g, k, "flops", "total", 10) == size(g, k, "flops", "blocks", 10) + 2 * 8 + 3


def test_soft_counts_are_differentiable() -> None:
    g = BERT_BASE_LIKE
    p = torch.full((8,), 0.5, requires_grad=True)
    one = torch.tensor(1.0)
    k = Keep(p.sum(), [one] * 2, [torch.tensor(8.0)] * 2, [one] * 2, [one] * 2)
    s = size(g, k, "params")
    s.backward()
    assert s.item() == pytest.approx(size(g, Keep(4, [1, 1], [8, 8], [1, 1], [1, 1]), "params"))
    assert p.grad is not None and (p.grad > 0).all()


def _geometry(cfg: str) -> Geometry:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        if cfg == "minilm":
            m = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536))
        else:  # SmolLM2-135M shapes
            m = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                                             tie_word_embeddings=True))
    return vtrans.arch.for_model(m).geometry(m)


def _random_scores(g: Geometry, seed: int) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    layers = range(g.n_layers)
    return Scores(torch.rand(g.hidden, generator=gen), [torch.rand(g.n_groups, generator=gen) for _ in layers],
                  [torch.rand(g.ffn, generator=gen) for _ in layers], torch.rand(g.n_layers, generator=gen),
                  torch.rand(g.n_layers, generator=gen))


@pytest.mark.parametrize("model", ["minilm", "smollm2"])
@pytest.mark.parametrize("metric", ["params", "flops"])
@pytest.mark.parametrize("scope", ["blocks", "total"])
@pytest.mark.parametrize("target", [0.9, 0.7, 0.5, 0.3, 0.1])
def test_budget_is_met_exactly(model, metric, scope, target) -> None:
    g = _geometry(model)
    budget = vtrans.Budget(**{metric: target}, scope=scope, seq_len=128)
    sel = select(g, _random_scores(g, seed=int(target * 1000)), budget)
    dense = size(g, g.dense_keep(), metric, scope, 128)
    kept = size(g, sel.keep(), metric, scope, 128)
    assert kept <= target * dense
    assert kept >= (1 - 0.005) * target * dense
    for i in range(g.n_layers):  # block rules: a kept block has a unit, a removed one has none
        assert bool(sel.mha[i]) == bool(sel.groups[i].any())
        assert bool(sel.ffn[i]) == bool(sel.neurons[i].any())
    assert sel.hidden.any()


def test_absolute_budget_and_full_budget() -> None:
    g = _geometry("minilm")
    dense = size(g, g.dense_keep(), "params", "blocks")
    sel = select(g, _random_scores(g, 0), vtrans.Budget(params=5_000_000))
    assert 0.995 * 5_000_000 <= size(g, sel.keep(), "params", "blocks") <= 5_000_000
    full = select(g, _random_scores(g, 0), vtrans.Budget(params=1.0))
    assert size(g, full.keep(), "params", "blocks") == dense


def test_higher_scores_are_kept() -> None:
    g = _geometry("minilm")
    sc = _random_scores(g, 1)
    sc.mha[:] = float("inf")
    sc.ffn[:] = float("inf")
    sel = select(g, sc, vtrans.Budget(params=0.5))
    kept, dropped = sc.neurons[0][sel.neurons[0]], sc.neurons[0][~sel.neurons[0]]
    # the threshold phase keeps every unit above the cut; the fill only adds below it
    assert kept.numel() > 0 and dropped.numel() > 0
    assert kept.max() > dropped.max() and kept.mean() > dropped.mean()


def test_unreachable_budget_is_a_typed_error() -> None:
    g = _geometry("minilm")
    sc = _random_scores(g, 0)
    with pytest.raises(vtrans.BudgetError, match="params=0.001"):
        select(g, sc, vtrans.Budget(params=0.001, scope="total"))  # the embeddings alone are larger


def test_a_budget_the_units_are_too_coarse_for_says_what_the_selection_reached() -> None:
    """A tolerance finer than the model's units: one typed line with the target, what filling the units in score
    order reached, and what to change (not a claim that no selection at all comes closer)."""
    from transformers import LlamaForCausalLM

    from tests.tiny import tiny

    vib = vtrans.attach(tiny("llama", LlamaForCausalLM))
    with pytest.raises(vtrans.BudgetError) as info:
        vib.apply_budget(vtrans.Budget(params=0.5, tolerance=0.0001))
    text = str(info.value)
    assert text.startswith("budget params=0.5 (blocks) = 7744 cannot be met within tolerance=0.0001: taking the units "
                           "in score order (each one that still fits) reaches 7707 (49.76% of dense)") and \
        text.endswith("raise its tolerance or choose another value") and "\n" not in text
    vib.apply_budget(vtrans.Budget(params=0.5, tolerance=0.01))  # within 1% it is met
    assert 0.99 * 7744 <= vib.achieved["size"] <= 7744


def test_counts_both_scopes() -> None:
    c = counts(BERT_BASE_LIKE, BERT_BASE_LIKE.dense_keep(), seq_len=10)
    assert c.params_total - c.params_blocks == 807
    assert c.as_dict()["seq_len"] == 10


def test_low_scored_gates_do_not_strand_the_budget() -> None:
    """Gates ranked below every unit: the threshold removes whole blocks; the fill must reopen them unit by unit."""
    g = _geometry("minilm")
    sc = _random_scores(g, 3)
    sc.mha[:] = -1.0
    sc.ffn[:] = -1.0
    for target in (0.9, 0.5, 0.2):
        sel = select(g, sc, vtrans.Budget(params=target))
        kept = size(g, sel.keep(), "params", "blocks")
        dense = size(g, g.dense_keep(), "params", "blocks")
        assert (1 - 0.005) * target * dense <= kept <= target * dense


# --- quota selection ---------------------------------------------------------------------------------------------


def test_quota_scores_keep_each_groups_quota_of_its_best_units() -> None:
    from vtrans.budget import Keep, Scores, quota_scores

    sc = Scores(torch.tensor([3.0, 1.0, 2.0, 0.0]), [torch.tensor([5.0, 9.0, 7.0])], [torch.tensor([1.0, 4.0])],
                torch.tensor([0.0]), torch.tensor([float("inf")]))
    q = quota_scores(sc, Keep(hidden=2.0, groups=[1.0], neurons=[2.0], mha=[0.25], ffn=[1.0]))
    # rank r of a group with quota q scores 1 - (r + 0.5) / q
    assert q.hidden.tolist() == pytest.approx([0.75, -0.25, 0.25, -0.75])
    assert q.groups[0].tolist() == pytest.approx([-1.5, 0.5, -0.5])
    assert q.neurons[0].tolist() == pytest.approx([0.25, 0.75])
    assert q.mha.tolist() == pytest.approx([-1.0])  # gate with keep probability 0.25
    assert q.ffn.tolist() == [float("inf")]  # never pruned stays never pruned
    kept = [int((x > 0).sum()) for x in (q.hidden, q.groups[0], q.neurons[0])]
    assert kept == [2, 1, 2]  # exactly the rounded quotas above 0


def test_quota_selection_scales_every_group_by_one_factor() -> None:
    """Two layers whose expected keep counts differ: the selection keeps them in that ratio at any budget."""
    from dataclasses import replace

    from vtrans.budget import Keep, Scores, quota_scores

    g = replace(BERT_BASE_LIKE, ffn=100)
    sc = Scores(torch.full((g.hidden,), float("inf")), [torch.full((2,), float("inf"))] * 2,
                [torch.randn(100, generator=torch.Generator().manual_seed(i)) for i in range(2)],
                torch.full((2,), float("inf")), torch.full((2,), float("inf")))
    quotas = Keep(hidden=g.hidden, groups=[2, 2], neurons=[80.0, 20.0], mha=[1, 1], ffn=[1, 1])
    full = size(g, g.dense_keep(), "params")
    budget = vtrans.Budget(params=size(g, Keep(g.hidden, [2, 2], [40, 10], [1, 1], [1, 1]), "params") / full,
                           tolerance=0.02)
    sel = select(g, quota_scores(sc, quotas), budget)
    n0, n1 = (int(x.sum()) for x in sel.neurons)
    assert n0 + n1 in range(48, 51)
    assert abs(n0 / (n0 + n1) - 0.8) < 0.03  # the 80:20 split of the quotas, not the raw scores' ~50:50
    top0 = torch.topk(sc.neurons[0], n0).indices
    assert sel.neurons[0][top0].all()  # within a layer, the best units by score

"""What the Llama-shaped families add to the parametrized tests: generation after a removed attention block (KV cache
and Mistral's sliding window), config fields that survive compression and stock export, and Phi-3's fused rows."""

from __future__ import annotations

import pytest
import torch
from transformers import Phi3ForCausalLM, Qwen3ForCausalLM

import vtrans
from tests.stock import rel_err
from tests.tiny import CASES, DECODERS, input_ids, tiny
from vtrans.export import to_stock

LM_CASES = [(a, c) for a, c in CASES if a in DECODERS and c.__name__.endswith("ForCausalLM")]


@pytest.mark.parametrize(("arch", "cls"), LM_CASES, ids=[c.__name__ for _, c in LM_CASES])
def test_generation_after_a_removed_attention_block_equals_the_masked_model(arch, cls) -> None:
    """Layer 0 loses its attention block, layer 1 a key/value group: 10 new tokens (past Mistral's window of 6) are
    the masked model's, compressed and exported to stock; the family's own config fields are kept."""
    model = tiny(arch, cls, attn="sdpa")
    vib = vtrans.attach(model)
    vib.mha.fix(torch.tensor([False, True]))
    vib.heads[1].fix(torch.tensor([False, True]))
    small = vtrans.compress(vib)
    assert [s["kv_heads"] for s in small.config.vtrans["layers"]] == [0, 1]
    ids = input_ids(1, 5)
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(small.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0), ref)
    stock = to_stock(small)
    assert torch.equal(stock.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0), ref)
    for c in (small.config, stock.config):
        assert getattr(c, "sliding_window", None) == getattr(model.config, "sliding_window", None)
        assert c.tie_word_embeddings == model.config.tie_word_embeddings
    assert stock.config.model_type == arch and small.config.model_type == f"vtrans_{arch}"


def test_phi3_fused_rows_are_sliced_per_group_and_neuron() -> None:
    """Kept group 1 of 2 (2 query heads of 8 dims each): qkv_proj keeps query rows 16:32, key rows 40:48 and value
    rows 56:64 of 64; kept neurons {3, 40} of 48: gate_up_proj keeps rows 3, 40, 51, 88 of 96 (masks at 1: no fold)."""
    model = tiny("phi3", Phi3ForCausalLM)
    vib = vtrans.attach(model, vtrans.VIBConfig(structures=("heads", "neurons")))
    neurons = torch.zeros(48, dtype=torch.bool)
    neurons[[3, 40]] = True
    with torch.no_grad():
        for _, m in vib.masks():
            m.mu.fill_(1.0)
    vib.heads[0].fix(torch.tensor([False, True]))
    vib.neurons[0].fix(neurons)
    small = vtrans.compress(vib)
    dense, got = model.model.layers[0], small.model.layers[0]
    rows = [*range(16, 32), *range(40, 48), *range(56, 64)]
    assert torch.equal(got.self_attn.qkv_proj.weight, dense.self_attn.qkv_proj.weight[rows])
    assert torch.equal(got.mlp.gate_up_proj.weight, dense.mlp.gate_up_proj.weight[[3, 40, 51, 88]])
    assert torch.equal(got.self_attn.o_proj.weight, dense.self_attn.o_proj.weight[:, 16:32])


def test_qwen3_head_norms_count_with_their_block_and_soft_masks_act_after_them() -> None:
    """Qwen3's q/k RMSNorms (over the explicit head_dim 16, shared by the heads) are 2 x 16 parameters per kept
    attention block whatever its width, gone with the block; a soft group mask scales the group's heads after the norms
    (which would undo a scale on the queries): the same as scaling those heads' columns of o_proj."""
    model = tiny("qwen3", Qwen3ForCausalLM)
    g = vtrans.arch.for_model(model).geometry(model)
    assert (g.head_dim, g.group_size, g.mha_params_const) == (16, 2, 32)

    scaled = tiny("qwen3", Qwen3ForCausalLM)
    with torch.no_grad():
        scaled.model.layers[1].self_attn.o_proj.weight[:, :2 * 16] *= 0.5  # group 0 = query heads 0 and 1
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    with torch.no_grad():
        vib.heads[1].mu.copy_(torch.tensor([0.5, 1.0]))
        ids = input_ids()
        assert (model(input_ids=ids).logits - scaled(input_ids=ids).logits).abs().max() < 1e-5
        assert (model(input_ids=ids).logits - tiny("qwen3", Qwen3ForCausalLM)(input_ids=ids).logits).abs().max() > 1e-3

    vib.mha.fix(torch.tensor([False, True]))
    vib.heads[1].fix(torch.tensor([False, True]))
    small = vtrans.compress(vib)
    names = {n: p.shape for n, p in small.named_parameters()}
    assert not any(n.startswith("model.layers.0.self_attn.") for n in names)
    assert names["model.layers.1.self_attn.q_norm.weight"] == names["model.layers.1.self_attn.k_norm.weight"] == (16,)
    assert vtrans.count(small).params_blocks == sum(p.numel() for n, p in small.named_parameters() if ".layers." in n)


#: attention shapes beyond the tiny configs' 4 query heads in 2 groups: one key/value head (multi-query), no grouping,
#: and an explicit head_dim unrelated to hidden / heads (Phi-3's config derives it, so it takes the first two only)
SHAPES = {"mqa": {"num_attention_heads": 4, "num_key_value_heads": 1},
          "mha": {"num_attention_heads": 4, "num_key_value_heads": 4},
          "head-dim-8x8": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8}}
SHAPE_CASES = [(a, c, s) for a, c in LM_CASES for s in SHAPES if not (a == "phi3" and "head_dim" in SHAPES[s])]


@pytest.mark.parametrize(("arch", "cls", "shape"), SHAPE_CASES,
                         ids=[f"{c.__name__}-{s}" for _, c, s in SHAPE_CASES])
def test_attention_shapes_count_and_compress_exactly(arch, cls, shape) -> None:
    """Every family at other attention shapes, embeddings tied and not: the counts are the parameters', a budget
    selection compresses to exactly its predicted count and to the masked model's outputs (the tiny configs' own
    shape runs through every parametrized test)."""
    for tie, budget in ((True, 0.7), (False, 0.5)):
        model = tiny(arch, cls, attn="sdpa", tie_word_embeddings=tie, **SHAPES[shape])
        dense = vtrans.count(model)
        assert dense.params_total == sum(p.numel() for p in model.parameters())
        vib = vtrans.attach(model)
        # a 10% tolerance: one key/value group of 4 heads x 16 is a coarse unit at this size
        sel = vib.apply_budget(vtrans.Budget(params=budget, tolerance=0.1))
        ids = input_ids()
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        small = vtrans.compress(vib).eval()
        counted = vtrans.count(small)
        assert counted.params_total == sum(p.numel() for p in small.parameters())
        assert counted.params_blocks == sel.achieved["size"] <= budget * dense.params_blocks
        with torch.no_grad():
            assert rel_err(ref, small(input_ids=ids).logits) < 1e-5

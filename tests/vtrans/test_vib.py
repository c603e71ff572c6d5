"""VIB masks: the formulas, training vs. evaluation behaviour, hooks that leave the model untouched, and one
posterior serving several budgets."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertModel, DistilBertConfig, DistilBertModel, LlamaForCausalLM

import vtrans
from tests.tiny import input_ids, main_output, tiny
from vtrans.masks import VIBMask


def test_mask_formulas_by_hand() -> None:
    m = VIBMask(3)
    with torch.no_grad():
        m.mu.copy_(torch.tensor([1.0, 0.1, 2.0]))
        m.logvar.copy_(torch.tensor([-9.0, 0.0, math.log(4.0)]))
    la = m.log_alpha()
    assert la.tolist() == pytest.approx([-9.0, -math.log(0.01), math.log(4.0) - math.log(4.0)], abs=1e-5)
    kl = 0.5 * sum(math.log(1 + mu**2 / (math.exp(lv) + 1e-8)) for mu, lv in [(1.0, -9.0), (0.1, 0.0),
                                                                             (2.0, math.log(4.0))])
    assert m.kl().item() == pytest.approx(kl, rel=1e-5)
    assert m.hard_keep(0.0).tolist() == [True, False, False]  # log_alpha < 0
    assert m.keep_prob(10.0, 0.0)[0].item() == pytest.approx(1.0, abs=1e-6)


def test_attach_leaves_the_model_and_its_state_dict_alone() -> None:
    model = tiny("bert", BertModel)
    keys = list(model.state_dict())
    ids = input_ids()
    with torch.no_grad():
        dense = main_output(model(input_ids=ids))
    vib = vtrans.attach(model)
    assert list(model.state_dict()) == keys
    assert not any(p is q for p in model.parameters() for q in vib.parameters())
    with torch.no_grad():  # fresh masks: mu ~ 1, everything kept -> close to dense
        masked = main_output(model(input_ids=ids))
    assert (masked - dense).abs().max() < 0.15 * dense.abs().max()
    vib.remove()
    with torch.no_grad():
        assert torch.equal(main_output(model(input_ids=ids)), dense)


def test_training_samples_noise_and_evaluation_is_deterministic() -> None:
    model = tiny("llama", LlamaForCausalLM)
    vib = vtrans.attach(model, vtrans.VIBConfig(logvar_init=-2.0))
    ids = input_ids()
    model.train()
    vib.train()
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(a, b)
    # gradients reach the mask parameters through the noisy forward
    (a.pow(2).mean() + vib.kl()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vib.mask_parameters())
    model.eval()
    with torch.no_grad():
        c, d = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(c, d)
    # frozen masks while the model trains (fine-tuning): deterministic too
    model.train()
    vib.eval()
    model.config.attention_dropout = 0.0
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, c, atol=1e-6)


def test_kl_weights_and_normalisation() -> None:
    model = tiny("bert", BertModel)
    vib = vtrans.attach(model, vtrans.VIBConfig(kl_weight=2.0, kl_multipliers={"neurons": 0.0},
                                                         kl_normalisation="group"))
    expected = sum(2.0 * m.kl() / m.n for kind, m in vib.masks() if kind != "neurons")
    assert vib.kl().item() == pytest.approx(expected.item(), rel=1e-6)


def test_unit_kl_normalisation_equals_width_ratio_multipliers() -> None:
    """``kl_normalisation="unit"`` divides every group by the FFN width: the same as multipliers r_i / ffn under
    ``group``, so a head, a block gate and a neuron each carry the same KL weight."""
    model = tiny("bert", BertModel)
    unit = vtrans.attach(model, vtrans.VIBConfig(kl_weight=0.5, kl_normalisation="unit", seed=3))
    g = unit.geometry
    widths = {"hidden": g.hidden, "heads": g.n_groups, "neurons": g.ffn, "mha": g.n_layers, "ffn": g.n_layers}
    assert len(set(widths.values())) > 2  # the tiny model's groups really differ in width
    ratios = {k: r / g.ffn for k, r in widths.items()}
    group = vtrans.attach(tiny("bert", BertModel), vtrans.VIBConfig(kl_weight=0.5, kl_multipliers=ratios, seed=3,
                                                                             kl_normalisation="group"))
    with torch.no_grad():
        for (_, a), (_, b) in zip(unit.masks(), group.masks(), strict=True):
            b.mu.copy_(a.mu * 0.3)
            a.mu.mul_(0.3)
    per_unit = sum(0.5 * m.kl() / g.ffn for _, m in unit.masks())
    assert unit.kl().item() == pytest.approx(per_unit.item(), rel=1e-6)
    assert unit.kl().item() == pytest.approx(group.kl().item(), rel=1e-6)
    by_group = sum(0.5 * m.kl() / m.n for _, m in unit.masks())
    assert unit.kl().item() < by_group.item()  # the small groups weigh less per unit
    with pytest.raises(vtrans.ConfigError, match="vib.kl_normalisation must be one of .* got 'layer'"):
        vtrans.VIBConfig(kl_normalisation="layer")


def test_expected_size_at_init_is_the_dense_size() -> None:
    """VIBNet's start (log-variance -9, sharpness 10): every keep probability is exactly 1, so is the expected size."""
    model = tiny("bert", BertModel)
    vib = vtrans.attach(model, vtrans.VIBConfig(logvar_init=-9.0, keep_sharpness=10.0))
    dense = vtrans.count(model)
    assert vib.expected_size("params").item() == pytest.approx(dense.params_blocks, rel=1e-4)
    assert vib.expected_size("flops", "total", 128).item() == pytest.approx(dense.flops_total, rel=1e-4)
    vib.expected_size().backward()
    assert vib.hidden.mu.grad is not None


def test_default_keep_probabilities_start_live() -> None:
    """The default start (log-variance -3, sharpness 1): every unit at keep probability sigmoid(3), with gradient."""
    from vtrans.budget import Keep, size

    model = tiny("bert", BertModel)
    vib = vtrans.attach(model)
    g, p = vib.geometry, float(torch.sigmoid(torch.tensor(3.0)))
    L = g.n_layers
    soft = Keep(p * g.hidden, [p * g.n_groups] * L, [p * g.ffn] * L, [p] * L, [p] * L)
    assert vib.expected_size("params").item() == pytest.approx(size(g, soft, "params"), rel=0.01)
    assert vib.active_fraction() == 1.0
    vib.expected_size().backward()
    assert float(vib.hidden.logvar.grad.abs().min()) > 0  # the budget term reaches every log-variance


def test_structures_option_masks_only_the_chosen_types() -> None:
    model = tiny("bert", BertModel)
    vib = vtrans.attach(model, vtrans.VIBConfig(structures=("heads", "neurons")))
    assert vib.hidden is None and vib.mha is None and vib.ffn is None
    sel = vib.apply_budget(vtrans.Budget(params=0.5))
    assert bool(sel.hidden.all())


def test_one_posterior_serves_several_budgets() -> None:
    model = tiny("llama", LlamaForCausalLM)
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.3))
    ids = input_ids()
    sizes = []
    for target in (0.7, 0.5, 0.3):
        # a tiny model's units are coarse (one neuron is ~1% of it): a looser tolerance than the default 0.5%
        vib.apply_budget(vtrans.Budget(params=target, tolerance=0.05))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        small = vtrans.compress(vib)
        with torch.no_grad():
            out = small(input_ids=ids).logits
        assert (out - ref).abs().max() / ref.abs().max() < 1e-5
        dense = vtrans.count(model).params_blocks
        kept = vtrans.count(small).params_blocks
        assert (1 - 0.05) * target * dense <= kept <= target * dense
        sizes.append(kept)
        assert small.config.vtrans["report"]["budget"]["value"] == target
        achieved = small.config.vtrans["report"]["budget"]["achieved_fraction"]
        assert achieved == pytest.approx(kept / dense, abs=1e-9)
    assert sizes[0] > sizes[1] > sizes[2]
    vib.release_budget()
    assert not any(bool(m.fixed) for _, m in vib.masks())


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    model = DistilBertModel(DistilBertConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    with pytest.raises(vtrans.UnsupportedModelError) as info:
        vtrans.attach(model)
    msg = str(info.value)
    assert "'distilbert'" in msg and "'bert'" in msg and "'llama'" in msg and "vtrans.arch.register" in msg


def test_unsupported_head_class_is_named() -> None:
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    with pytest.raises(vtrans.UnsupportedModelError, match="'BertForMaskedLM'"):
        vtrans.attach(model)


def test_attach_twice_and_to_compressed_models_are_errors() -> None:
    model = tiny("bert", BertModel)
    vib = vtrans.attach(model)
    with pytest.raises(vtrans.ConfigError, match="already has VIB masks"):
        vtrans.attach(model)
    small = vtrans.compress(vib)
    with pytest.raises(vtrans.ConfigError, match="already compressed"):
        vtrans.attach(small)


def test_registry() -> None:
    assert vtrans.arch.registered() == ["bert", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3", "roberta"]
    with pytest.raises(vtrans.UnsupportedModelError, match="registered"):
        vtrans.arch.get("t5")

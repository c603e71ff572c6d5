"""A saved posterior: the trained weights and masks round-trip, and a re-thresholded budget compresses to what the
original masks give at that budget."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

import vtrans
from tests.tiny import input_ids, main_output, tiny
from vtrans.posterior import read_posterior_record, trained_budget


def _trained(model) -> vtrans.VIB:
    """Masks and weights moved away from their initial values, as training leaves them."""
    vib = vtrans.attach(model, vtrans.VIBConfig(kl_weight=0.1, seed=3))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, m in vib.masks():
            m.mu.copy_(0.5 + torch.rand(m.n, generator=gen))
            m.logvar.copy_(-6 + 4 * torch.rand(m.n, generator=gen))
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return vib


@pytest.mark.parametrize("arch,cls", [("bert", BertForSequenceClassification), ("llama", LlamaForCausalLM)])
def test_a_saved_posterior_rethresholds_like_the_original(tmp_path, arch, cls) -> None:
    model = tiny(arch, cls).eval()
    vib = _trained(model)
    vib.apply_budget(vtrans.Budget(params=0.3, tolerance=0.05), method="fast")
    vtrans.save_posterior(vib, tmp_path / "posterior")
    record = read_posterior_record(tmp_path / "posterior")
    assert record["vib"]["kl_weight"] == 0.1 and record["method"] == "fast"
    assert trained_budget(tmp_path / "posterior") == vtrans.Budget(params=0.3, tolerance=0.05)
    assert json.loads((tmp_path / "posterior" / "config.json").read_text())["model_type"] == arch  # a dense model

    loaded = vtrans.load_posterior(tmp_path / "posterior")
    assert loaded.budget is None and not any(bool(m.fixed) for _, m in loaded.masks())  # released
    for (name, a), (_, b) in zip(vib.masks(), loaded.masks()):
        assert torch.equal(a.mu, b.mu) and torch.equal(a.logvar, b.logvar), name
    ids = input_ids()
    for target in (0.7, 0.3):
        budget = vtrans.Budget(params=target, tolerance=0.05)
        want = vib.apply_budget(budget)
        got = loaded.apply_budget(budget)
        assert torch.equal(want.hidden, got.hidden)
        assert all(torch.equal(a, b) for a, b in zip(want.neurons, got.neurons))
        with torch.no_grad():
            ref = main_output(vtrans.compress(vib)(input_ids=ids))
            out = main_output(vtrans.compress(loaded)(input_ids=ids))
        assert torch.allclose(out, ref, atol=1e-6)
        dense = vtrans.count(loaded.model).params_blocks
        kept = vtrans.count(vtrans.compress(loaded)).params_blocks
        assert (1 - 0.05) * target * dense <= kept <= target * dense


def test_a_folder_without_a_posterior_is_refused(tmp_path) -> None:
    tiny("bert", BertForSequenceClassification).save_pretrained(tmp_path / "plain")
    with pytest.raises(vtrans.UnknownModelError, match="not a saved posterior"):
        vtrans.load_posterior(tmp_path / "plain")

"""Physical compression: for every architecture and head class, over random hard masks, the compressed model computes
what the masked model computes, has exactly the predicted size, and reloads without vtrans."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import vtrans
from tests.tiny import CASES, IDS, input_ids, main_output, tiny

LAYER_PARAM = re.compile(r"(^|\.)(layer|h|layers)\.\d+\.")
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _random_masks(vib: vtrans.VIB, seed: int, p_keep: float) -> None:
    """Fix random hard masks on every structure and give the means a spread, so folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for kind, m in vib.masks():
            m.mu.copy_(0.5 + torch.rand(m.n, generator=gen))
            keep = torch.rand(m.n, generator=gen) < p_keep
            if kind == "hidden":
                keep[int(torch.randint(m.n, (1,), generator=gen))] = True  # a model needs one hidden dimension
            m.fix(keep)


def _compare(dense: torch.Tensor, small: torch.Tensor, keep_hidden: torch.Tensor | None) -> float:
    if keep_hidden is not None:  # a base model outputs the hidden state: compare the kept dimensions
        dense = dense[..., keep_hidden]
    return ((dense - small).abs().max() / dense.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize(("arch", "cls"), CASES, ids=IDS)
@SETTINGS
@given(seed=st.integers(0, 10_000), p_keep=st.sampled_from([0.15, 0.4, 0.7, 1.0]))
def test_compressed_equals_masked_and_sizes_are_exact(arch, cls, seed, p_keep) -> None:
    model = tiny(arch, cls)
    vib = vtrans.attach(model, vtrans.VIBConfig())
    _random_masks(vib, seed, p_keep)
    ids = input_ids()
    with torch.no_grad():
        ref = main_output(model(input_ids=ids))
    small = vtrans.compress(vib)
    with torch.no_grad():
        out = main_output(small(input_ids=ids))
    base = not hasattr(model, "lm_head") and not hasattr(model, "score") and not hasattr(model, "classifier")
    sel = vib.selection()
    assert _compare(ref, out, sel.hidden if base else None) < 1e-5

    predicted = vtrans.count(small, seq_len=ids.shape[1])
    assert sum(p.numel() for p in small.parameters()) == predicted.params_total
    assert predicted == vtrans.budget.counts(vib.geometry, sel.keep(), ids.shape[1])
    blocks = sum(p.numel() for n, p in small.named_parameters() if LAYER_PARAM.search(n))
    assert blocks == predicted.params_blocks

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        small(input_ids=ids[:1])
    measured = fc.get_total_flops()
    assert abs(measured - predicted.flops_total) <= 0.01 * predicted.flops_total
    vib.remove()


@pytest.mark.parametrize(("arch", "cls"), CASES, ids=IDS)
def test_dense_counts_match_the_model(arch, cls) -> None:
    model = tiny(arch, cls)
    c = vtrans.count(model, seq_len=12)
    assert c.params_total == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=input_ids(1, 12))
    assert abs(fc.get_total_flops() - c.flops_total) <= 0.01 * c.flops_total
    layer_flops = sum(v for k, d in fc.get_flop_counts().items() if re.search(r"\.(layer|h|layers)\.\d+$", k)
                      for v in d.values())
    assert layer_flops == c.flops_blocks


def test_removed_attention_block_keeps_generation_equal() -> None:
    """Layer 0 loses its whole attention block: the KV cache must still track the sequence length."""
    from transformers import LlamaForCausalLM

    model = tiny("llama", LlamaForCausalLM)
    vib = vtrans.attach(model)
    vib.mha.fix(torch.tensor([False, True]))
    small = vtrans.compress(vib)
    assert small.config.vtrans["layers"][0]["heads"] == 0
    ids = input_ids(1, 5)
    a = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    b = small.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_block_rules_remove_empty_blocks_and_keep_one_head() -> None:
    from transformers import BertModel

    model = tiny("bert", BertModel)
    vib = vtrans.attach(model)
    vib.heads[0].fix(torch.zeros(4, dtype=torch.bool))  # no head left: the attention block goes
    vib.neurons[1].fix(torch.zeros(48, dtype=torch.bool))  # no neuron left: the FFN block goes
    sel = vib.selection()
    assert sel.mha.tolist() == [False, True] and sel.ffn.tolist() == [True, False]
    small = vtrans.compress(vib)
    layers = small.config.vtrans["layers"]
    assert layers[0]["heads"] == 0 and layers[1]["intermediate_size"] == 0
    assert not any(n.startswith("encoder.layer.0.attention.self") for n, _ in small.named_parameters())
    # post-LN: the LayerNorm of the removed block stays (it still normalises the residual)
    assert "encoder.layer.0.attention.output.LayerNorm.weight" in small.state_dict()


_LOAD_WITHOUT_VTRANS = textwrap.dedent("""
    import builtins, json, sys
    real_import = builtins.__import__
    def guarded(name, *args, **kwargs):
        if name == "vtrans" or name.startswith("vtrans."):
            raise ImportError("vtrans is not installed here")
        return real_import(name, *args, **kwargs)
    builtins.__import__ = guarded
    sys.path = [p for p in sys.path if p not in ("", ".")]
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    auto = {"base": AutoModel, "seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}
    results = {}
    for case in json.loads(sys.argv[1]):
        ref = torch.load(case["dir"] + "/ref.pt")
        model = auto[case["task"]].from_pretrained(case["dir"], trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(input_ids=ref["ids"])
        out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        entry = {"err": (out - ref["out"]).abs().max().item(), "class": type(model).__name__}
        if case["task"] == "causal-lm":
            gen = model.generate(ref["ids"][:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
            entry["generate_equal"] = bool(torch.equal(gen, ref["gen"]))
        results[case["dir"]] = entry
    print(json.dumps(results))
""")


def test_save_and_load_in_a_process_without_vtrans(tmp_path: Path) -> None:
    cases = []
    for i, (arch, cls) in enumerate(CASES):
        model = tiny(arch, cls, attn="sdpa")
        vib = vtrans.attach(model)
        _random_masks(vib, seed=i, p_keep=0.6)
        small = vtrans.compress(vib)
        out_dir = tmp_path / cls.__name__
        small.save_pretrained(out_dir)
        files = sorted(p.name for p in out_dir.iterdir())
        assert {"config.json", "model.safetensors", "modeling_vtrans.py", "compression.json"} <= set(files)
        report = json.loads((out_dir / "compression.json").read_text())
        assert report["compressed"]["params_total"] == sum(p.numel() for p in small.parameters())
        assert len(report["modeling_sha256"]) == 64
        ids = input_ids()
        with torch.no_grad():
            out = main_output(small(input_ids=ids))
        ref = {"ids": ids, "out": out}
        task = "causal-lm" if hasattr(model, "lm_head") else "seq-cls" if "Sequence" in cls.__name__ else "base"
        if task == "causal-lm":
            ref["gen"] = small.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        torch.save(ref, out_dir / "ref.pt")
        cases.append({"dir": str(out_dir), "task": task, "name": cls.__name__})
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_VTRANS, json.dumps(cases)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in cases:
        r = results[case["dir"]]
        assert r["err"] < 1e-5, (case["name"], r)
        assert r["class"].startswith("Vtrans")
        if case["task"] == "causal-lm":
            assert r["generate_equal"], case["name"]

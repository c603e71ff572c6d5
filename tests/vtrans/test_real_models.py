"""Integration: the real all-MiniLM-L6-v2 and SmolLM2-135M (ASSETS.md) compressed to 50% of block parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vtrans
from vtrans.assets import resolve_model
from vtrans.checkpoint import load_pretrained, load_tokenizer

pytestmark = pytest.mark.integration

_RELOAD = """
import builtins, json, sys, torch
real_import = builtins.__import__
def guarded(name, *a, **k):
    if name == "vtrans" or name.startswith("vtrans."):
        raise ImportError("vtrans is not installed here")
    return real_import(name, *a, **k)
builtins.__import__ = guarded
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
d, task = sys.argv[1], sys.argv[2]
ref = torch.load(d + "/ref.pt")
cls = AutoModelForCausalLM if task == "causal-lm" else AutoModel
model = cls.from_pretrained(d, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
ids = tok(ref["text"], return_tensors="pt").input_ids
with torch.no_grad():
    out = model(input_ids=ids)
out = out.logits if task == "causal-lm" else out.last_hidden_state
err = ((out - ref["out"]).abs().max() / ref["out"].abs().max()).item()
res = {"err": err, "same_ids": torch.equal(ids, ref["ids"])}
if task == "causal-lm":
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    res["generate_equal"] = torch.equal(gen, ref["gen"])
print(json.dumps(res), flush=True)
"""

TEXT = "The film is a charming, funny and thoughtful look at growing up."


@pytest.mark.parametrize(("name", "task", "cls_name"), [("minilm", "base", "BertModel"),
                                                          ("smollm2", "causal-lm", "LlamaForCausalLM")])
def test_real_model_to_half_of_block_params(name: str, task: str, cls_name: str, tmp_path: Path) -> None:
    path = resolve_model(name)
    model = load_pretrained(path, task=task, dtype=torch.float32).eval()
    assert type(model).__name__ == cls_name
    tok = load_tokenizer(path)
    ids = tok(TEXT, return_tensors="pt").input_ids
    dense = vtrans.count(model)

    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    vib.apply_budget(vtrans.Budget(params=0.5), scores=vtrans.score(model, "magnitude"), method="magnitude")
    with torch.no_grad():
        masked = model(input_ids=ids)
    masked = masked.logits if task == "causal-lm" else masked.last_hidden_state[..., vib.selection().hidden]
    small = vtrans.compress(vib, tokenizer=tok)
    with torch.no_grad():
        out = small(input_ids=ids)
    out = out.logits if task == "causal-lm" else out.last_hidden_state
    # float32, different summation orders through 6-30 layers: ~1e-5 relative is rounding, a wrong unit is > 1e-2
    assert ((out - masked).abs().max() / masked.abs().max()).item() < 1e-4

    kept = vtrans.count(small)
    assert sum(p.numel() for p in small.parameters()) == kept.params_total
    assert 0.995 * 0.5 * dense.params_blocks <= kept.params_blocks <= 0.5 * dense.params_blocks

    small.save_pretrained(tmp_path)
    ref = {"text": TEXT, "ids": ids, "out": out}
    if task == "causal-lm":
        ref["gen"] = small.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(ref["gen"], model.generate(ids, max_new_tokens=8, do_sample=False))
    torch.save(ref, tmp_path / "ref.pt")
    report = json.loads((tmp_path / "compression.json").read_text())
    assert report["compressed"]["params_blocks"] == kept.params_blocks
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path), task], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert res["same_ids"] and res["err"] < 1e-5
    if task == "causal-lm":
        assert res["generate_equal"]

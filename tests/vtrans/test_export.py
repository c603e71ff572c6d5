"""``vtrans export DIR --format stock``: a heterogeneous vtrans checkpoint zero-padded to the stock architecture, which
loads where vtrans cannot be imported and computes the same outputs; what cannot be padded exactly is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertModel, GPT2LMHeadModel

import vtrans
from pipelines.cli import main
from tests.stock import assert_stock_files, load_without_vtrans, rel_err, task_of
from tests.tiny import CASES, DECODERS, input_ids, main_output, tiny
from vtrans.export import to_stock


def _heterogeneous(arch: str, cls: type, seed: int) -> vtrans.VIB:
    """Random per-layer widths; Llama-shaped decoders: hidden 23 of 32 (padded to 24 on export, RMSNorm rescaled);
    GPT-2 / decoders: 3 layers, the middle one without blocks (dropped on export); BERT / RoBERTa: layer 0 without
    attention."""
    layers = {"num_hidden_layers": 3} if arch in ("gpt2", *DECODERS) else {}
    model = tiny(arch, cls, attn="sdpa", **layers)
    structures = vtrans.STRUCTURES if arch in DECODERS else ("heads", "neurons", "mha", "ffn")
    vib = vtrans.attach(model, vtrans.VIBConfig(structures=structures))
    gen = torch.Generator().manual_seed(seed)
    g = vib.geometry
    with torch.no_grad():
        for _, m in vib.masks():
            m.mu.copy_(0.5 + torch.rand(m.n, generator=gen))
        for i in range(g.n_layers):
            heads = torch.rand(g.n_groups, generator=gen) < 0.6
            heads[i % g.n_groups] = True
            neurons = torch.rand(g.ffn, generator=gen) < 0.3 + 0.3 * i
            vib.heads[i].fix(heads)
            vib.neurons[i].fix(neurons)
        blocks = torch.ones(g.n_layers, dtype=torch.bool)
        if arch in ("gpt2", *DECODERS):
            blocks[1] = False
            vib.mha.fix(blocks)
            vib.ffn.fix(blocks.clone())
        else:
            blocks[0] = False
            vib.mha.fix(blocks)
            vib.ffn.fix(torch.ones(g.n_layers, dtype=torch.bool))
        if arch in DECODERS:
            hidden = torch.zeros(g.hidden, dtype=torch.bool)
            hidden[torch.randperm(g.hidden, generator=gen)[:23]] = True
            vib.hidden.fix(hidden)
    return vib


def test_export_pads_to_stock_loads_without_vtrans_and_equals(tmp_path: Path, capsys) -> None:
    cases, refs = [], {}
    for seed, (arch, cls) in enumerate(CASES):
        vib = _heterogeneous(arch, cls, seed)
        sel = vib.selection()
        small = vtrans.compress(vib).eval()
        src = tmp_path / f"{cls.__name__}-vtrans"
        small.save_pretrained(src)
        out = tmp_path / cls.__name__
        assert main(["export", str(src), "--format", "stock", "--out", str(out)]) == 0
        assert "max |vtrans - stock| / max |vtrans|" in capsys.readouterr().out
        assert_stock_files(out, arch)

        # exact widths: the widest kept layer's heads / neurons, pre-norm layers without blocks dropped
        live = [i for i in range(len(sel.mha)) if sel.mha[i] or sel.ffn[i] or arch in ("bert", "roberta")]
        config = json.loads((out / "config.json").read_text())
        n_layers = config.get("num_hidden_layers", config.get("n_layer"))
        inter = config.get("intermediate_size", config.get("n_inner"))
        assert n_layers == len(live) == 2
        assert inter == max(int(sel.neurons[i].sum()) for i in live)
        if arch in DECODERS:
            kv = max(int(sel.groups[i].sum()) for i in live)
            head_dim = vib.geometry.head_dim  # the dense one (Qwen3's explicit 16, else 32 / 4 heads)
            assert (config["hidden_size"], config["num_key_value_heads"], config["head_dim"]) == (24, kv, head_dim)
            assert config["rms_norm_eps"] == pytest.approx(small.config.rms_norm_eps * 23 / 24)
        else:  # hidden kept whole: the dense head count, head size hidden / heads
            assert config.get("hidden_size", config.get("n_embd")) == 32
            assert config.get("num_attention_heads", config.get("n_head")) == 4
        report = json.loads((out / "compression.json").read_text())
        assert report["format"] == "stock" and report["stock"]["padded"] is True

        ids = input_ids()
        torch.save(ids, out / "ids.pt")
        with torch.no_grad():
            ref = main_output(small(input_ids=ids))
        gen = None
        if task_of(small) == "causal-lm":
            gen = small.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        cases.append({"dir": str(out), "task": task_of(small)})
        refs[str(out)] = (ref, gen, cls.__name__)
    for d, res in load_without_vtrans(cases).items():
        ref, gen, name = refs[d]
        out = res["out"]
        assert res["class"] == name and res["module"].startswith("transformers.models."), res["class"]
        if out.shape[-1] != ref.shape[-1]:  # a base model's padded hidden dims are exactly zero
            assert torch.equal(out[..., ref.shape[-1]:], torch.zeros_like(out[..., ref.shape[-1]:])), name
            out = out[..., : ref.shape[-1]]
        assert rel_err(ref, out) < 1e-5, name
        if gen is not None:
            assert torch.equal(res["gen"], gen), name


def _one_line(argv: list[str], capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("vtrans: error: "), err
    return err


def test_export_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    dense = tmp_path / "dense"
    tiny("bert", BertModel).save_pretrained(dense)
    model = tiny("gpt2", GPT2LMHeadModel)
    vib = vtrans.attach(model)
    with torch.no_grad():
        keep = torch.ones(32, dtype=torch.bool)
        keep[:5] = False
        vib.hidden.fix(keep)  # a LayerNorm over 27 of 32 dims: no stock GPT-2 computes that
    hetero = tmp_path / "gpt2-hidden27"
    vtrans.compress(vib).save_pretrained(hetero)
    uniform = tmp_path / "uniform"
    assert main(["compress", "--model", str(dense), "--budget", "params=11888", "--uniform", "--out",
                 str(uniform)]) == 0
    out = tmp_path / "out"
    rows = [
        (["export", str(hetero), "--format", "onnx", "--out", str(out)], ["--format", "'onnx'", "['stock']"]),
        (["export", str(dense), "--format", "stock", "--out", str(out)], ["DIR=", repr(str(dense)), "not a vtrans"]),
        (["export", str(uniform), "--format", "stock", "--out", str(out)], ["not a vtrans", "stock already"]),
        (["export", str(tmp_path / "nope"), "--format", "stock", "--out", str(out)], ["DIR=", "does not exist"]),
        (["export", str(hetero), "--format", "stock", "--out", str(out)],
         ["hidden_size=27", "stock gpt2", "LayerNorm", "--uniform"]),
    ]
    for argv, needles in rows:
        err = _one_line(argv, capsys)
        for needle in needles:
            assert needle in err, (needle, err)
        assert not out.exists(), argv
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_to_stock_refuses_a_dense_model() -> None:
    with pytest.raises(vtrans.ExportError, match="not vtrans-compressed"):
        to_stock(tiny("llama", CASES[8][1]))


@pytest.mark.integration
def test_smollm2_heterogeneous_export(tmp_path: Path, capsys) -> None:
    """The real SmolLM2-135M pruned heterogeneously to 50% (hidden included) exports to stock llama exactly."""
    from vtrans.assets import resolve_model

    src = tmp_path / "hetero"
    assert main(["compress", "--model", "smollm2", "--budget", "params=0.5", "--out", str(src)]) == 0
    out = tmp_path / "stock"
    assert main(["export", str(src), "--format", "stock", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    err = float(text.split("max |vtrans - stock| / max |vtrans| = ")[1].split()[0])
    assert err < 1e-4  # 30 layers, float32 sums in another order
    assert_stock_files(out, "llama")
    assert resolve_model("smollm2").is_dir()

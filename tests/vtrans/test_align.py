"""Aligned widths (issue 20 item 1, ``Budget.align``): every kept width a multiple of its alignment for every selector
(magnitude / random through ``select``, Kwon, a VIB posterior, uniform), the budget never exceeded, no further aligned
step fitting, the compressed model equal to the masked one, and one-line errors for bad alignments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

import vtrans
from pipelines.cli import main
from tests.tiny import CASES, IDS, input_ids, main_output, tiny
from vtrans.budget import Geometry, Selection, align_steps, layer_size, outside_size, select, size
from vtrans.config import parse_align
from vtrans.errors import ConfigError
from vtrans.fisher import kwon_prune
from vtrans.scoring import score

HEAD_CASES = [(a, c) for a, c in CASES if "ForSequenceClassification" in c.__name__ or "LM" in c.__name__]
HEAD_IDS = [c.__name__ for _, c in HEAD_CASES]
BUDGETS = [vtrans.Budget(params=0.5, align=8), vtrans.Budget(flops=0.4, seq_len=16, align={"neurons": 16, "heads": 16}),
           vtrans.Budget(params=0.6, scope="total", align={"hidden": 8, "neurons": 32})]
BUDGET_IDS = ["params-8", "flops-heads16-neurons16", "total-hidden8-neurons32"]


def _check_aligned(g: Geometry, sel: Selection, budget: vtrans.Budget) -> None:
    """Every kept width a multiple of its alignment, the size <= target and equal to ``achieved``, and no further
    aligned step of any group fitting (the rounding filled what the alignment allows)."""
    a, k = budget.alignment, sel.keep()
    assert k.hidden % a["hidden"] == 0 and k.hidden > 0
    assert all(n % a["neurons"] == 0 for n in k.neurons), k.neurons
    assert all(x * g.head_dim % a["heads"] == 0 for x in k.groups), k.groups
    assert all(bool(m) == (x > 0) for m, x in zip(k.mha, k.groups)) and all(
        bool(f) == (n > 0) for f, n in zip(k.ffn, k.neurons))
    metric, scope, s = budget.metric, budget.scope, budget.seq_len
    got = size(g, k, metric, scope, s)
    assert got == sel.achieved["size"] <= sel.achieved["target"]
    assert sel.achieved["of_target"] == pytest.approx(got / sel.achieved["target"])
    assert sel.achieved["align"] == a
    if budget.uniform:
        return
    steps = align_steps(g, budget)
    L = g.n_layers

    def total(d: int, groups: list[int], neurons: list[int]) -> float:
        t = sum(float(layer_size(g, metric, d, groups[i], neurons[i], int(groups[i] > 0), int(neurons[i] > 0), s))
                for i in range(L))
        return t + (float(outside_size(g, metric, d, s)) if scope == "total" else 0.0)

    target = sel.achieved["target"]
    if k.hidden + steps["hidden"] <= g.hidden:
        assert total(k.hidden + steps["hidden"], k.groups, k.neurons) > target
    for i in range(L):
        if k.groups[i] + steps["groups"] <= g.n_groups:
            more = [x + steps["groups"] * (j == i) for j, x in enumerate(k.groups)]
            assert total(k.hidden, more, k.neurons) > target
        if k.neurons[i] + steps["neurons"] <= g.ffn:
            more = [x + steps["neurons"] * (j == i) for j, x in enumerate(k.neurons)]
            assert total(k.hidden, k.groups, more) > target


def _compressed_equals_masked(model, vib: vtrans.VIB, budget: vtrans.Budget) -> None:
    ids = input_ids()
    with torch.no_grad():
        ref = main_output(model(input_ids=ids))
    keep_hidden = vib.selection().hidden
    small = vtrans.compress(vib)
    with torch.no_grad():
        out = main_output(small(input_ids=ids))
    if ref.shape[-1] != out.shape[-1]:  # a base model outputs the hidden state: compare the kept dimensions
        ref = ref[..., keep_hidden]
    assert ((ref - out).abs().max() / ref.abs().max()).item() < 1e-5
    kept = vtrans.count(small, seq_len=budget.seq_len)
    assert sum(p.numel() for p in small.parameters()) == kept.params_total
    assert kept.get(budget.metric, budget.scope) == vib.achieved["size"] <= vib.achieved["target"]
    report = small.config.vtrans["report"] if hasattr(small.config, "vtrans") else None
    if report is not None:
        assert report["budget"]["align"] == budget.alignment
        assert report["budget"]["achieved_of_target"] == pytest.approx(vib.achieved["of_target"])


@pytest.mark.parametrize(("arch", "cls"), CASES, ids=IDS)
@pytest.mark.parametrize("budget", BUDGETS, ids=BUDGET_IDS)
@pytest.mark.parametrize("scorer", ["magnitude", "random"])
def test_scorer_selection_is_aligned_and_compresses_exactly(arch, cls, budget, scorer) -> None:
    model = tiny(arch, cls)
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    sel = vib.apply_budget(budget, scores=score(model, scorer, seed=1), method=scorer)
    _check_aligned(vib.geometry, sel, budget)
    _compressed_equals_masked(model, vib, budget)


def test_exact_counts_by_hand() -> None:
    """Tiny BERT, magnitude scores, params=0.5 of 15,008 block parameters = 7,504: unaligned 23 hidden, 3 + 3 heads,
    29 + 27 neurons (7,468); aligned to 8: 24 hidden, 3 + 3 heads (8-dim heads: any count), 24 + 24 neurons, 7,392 =
    98.5% of the target (one more step of 8 neurons costs 2 * 8 * 24 + 8 = 392 > the 112 left)."""
    model = tiny("bert", BertModel)
    g, sc = vtrans.attach(model).geometry, score(model, "magnitude")
    k = select(g, sc, vtrans.Budget(params=0.5)).keep()
    assert (k.hidden, k.groups, k.neurons) == (23, [3, 3], [29, 27])
    sel = select(g, sc, vtrans.Budget(params=0.5, align=8))
    k = sel.keep()
    assert (k.hidden, k.groups, k.neurons, k.mha, k.ffn) == (24, [3, 3], [24, 24], [1, 1], [1, 1])
    assert sel.achieved["size"] == 7392 and sel.achieved["target"] == 7504
    # the kept units are the best by score within each group
    for keep, s in [(sel.hidden, sc.hidden), *zip(sel.neurons, sc.neurons)]:
        assert s[keep].min() >= s[~keep].max()


def test_alignment_one_is_the_unaligned_selection() -> None:
    model = tiny("llama", LlamaForCausalLM)
    g, sc = vtrans.attach(model).geometry, score(model, "magnitude")
    a = select(g, sc, vtrans.Budget(params=0.5, tolerance=0.02))
    b = select(g, sc, vtrans.Budget(params=0.5, tolerance=0.02, align=1))
    c = select(g, sc, vtrans.Budget(params=0.5, tolerance=0.02, align={"heads": 1, "neurons": 1}))
    for x in (b, c):
        assert x.achieved == a.achieved
        assert all(torch.equal(p, q) for p, q in zip([a.hidden, *a.groups, *a.neurons, a.mha, a.ffn],
                                                     [x.hidden, *x.groups, *x.neurons, x.mha, x.ffn]))


def test_heads_alignment_counts_whole_kv_groups() -> None:
    """Tiny Llama: 2 key/value groups of 2 query heads, head_dim 8. heads=8 leaves the count free (8-dim groups);
    heads=16 keeps 0 or 2 groups per layer (16 / gcd(16, 8) = 2 groups = 4 query heads)."""
    model = tiny("llama", LlamaForCausalLM)
    g = vtrans.attach(model).geometry
    assert (g.n_groups, g.group_size, g.head_dim) == (2, 2, 8)
    assert align_steps(g, vtrans.Budget(params=0.5, align={"heads": 8}))["groups"] == 1
    assert align_steps(g, vtrans.Budget(params=0.5, align={"heads": 16}))["groups"] == 2
    sc = score(model, "magnitude")
    for p in (0.3, 0.5, 0.7):
        sel = select(g, sc, vtrans.Budget(params=p, align={"heads": 16}))
        assert all(int(x.sum()) in (0, 2) for x in sel.groups)


@pytest.mark.parametrize(("arch", "cls"), CASES, ids=IDS)
def test_uniform_aligned(arch, cls) -> None:
    model = tiny(arch, cls)
    # post-LN BERT / RoBERTa keep attention and norms in stock form: only a large budget is uniform-reachable
    budget = vtrans.Budget(params=0.8 if arch in ("bert", "roberta") else 0.5, uniform=True,
                           align={"neurons": 16, "hidden": 8})
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    sel = vib.apply_budget(budget, scores=score(model, "magnitude"), method="magnitude")
    _check_aligned(vib.geometry, sel, budget)
    k = sel.keep()
    kept = [i for i in range(vib.geometry.n_layers) if k.mha[i] or k.ffn[i]]
    assert len({k.neurons[i] for i in kept}) == 1 and len({k.groups[i] for i in kept}) == 1
    ids = input_ids()
    with torch.no_grad():
        ref = main_output(model(input_ids=ids))
    small = vtrans.compress(vib)
    assert small.config.model_type == arch  # the stock class
    with torch.no_grad():
        out = main_output(small(input_ids=ids))
    if ref.shape[-1] != out.shape[-1]:
        ref = ref[..., sel.hidden]
    assert ((ref - out).abs().max() / ref.abs().max()).item() < 1e-5
    assert vtrans.count(small, seq_len=128).params_blocks == sel.achieved["size"]


def _batches(n: int = 2) -> list[dict]:
    out = []
    for k in range(n):
        gen = torch.Generator().manual_seed(100 + k)
        ids = torch.randint(3, 60, (4, 10), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (4,), generator=gen)})
    return out


@pytest.mark.parametrize(("arch", "cls"), HEAD_CASES, ids=HEAD_IDS)
def test_kwon_aligned(arch, cls) -> None:
    model = tiny(arch, cls)
    batches = _batches()
    if "LM" in cls.__name__:
        batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    budget = vtrans.Budget(params=0.5, align={"neurons": 16, "heads": 16})
    vib = vtrans.attach(model)
    sel = kwon_prune(vib, batches, budget)
    assert sel.hidden.all()  # Kwon keeps the hidden size whole
    _check_aligned(vib.geometry, sel, budget)
    assert vib.method == "kwon"
    with torch.no_grad():
        masked = [model(input_ids=b["input_ids"]).logits for b in batches]
    small = vtrans.compress(vib)
    with torch.no_grad():
        out = [small(input_ids=b["input_ids"]).logits for b in batches]
    for a, b in zip(masked, out):
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    assert vtrans.count(small).params_blocks == sel.achieved["size"]


def test_kwon_refuses_a_hidden_alignment_that_does_not_divide_the_hidden_size() -> None:
    model = tiny("gpt2", GPT2LMHeadModel)
    with pytest.raises(ConfigError, match=r"budget.align.hidden=24: Kwon's method keeps the hidden size 32 whole"):
        kwon_prune(vtrans.attach(model), _batches(), vtrans.Budget(params=0.5, align={"hidden": 24}))


@pytest.mark.parametrize("selection", ["threshold", "quota"])
def test_vib_posterior_aligned(selection) -> None:
    model = tiny("llama", LlamaForCausalLM)
    vib = vtrans.attach(model, vtrans.VIBConfig(selection=selection))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking posterior: spread log-variances
        for _, m in vib.masks():
            m.logvar.copy_(-4 + 4 * torch.rand(m.n, generator=gen))
    budget = vtrans.Budget(params=0.4, align=8)
    sel = vib.apply_budget(budget)
    _check_aligned(vib.geometry, sel, budget)
    _compressed_equals_masked(model, vib, budget)


@pytest.mark.parametrize(("kwargs", "needles"), [
    ({"align": 0}, ["budget.align must be a positive integer", "got 0"]),
    ({"align": -8}, ["budget.align", "-8"]),
    ({"align": True}, ["budget.align", "True"]),
    ({"align": 2.5}, ["budget.align", "2.5"]),
    ({"align": "8"}, ["budget.align", "'8'"]),
    ({"align": {}}, ["budget.align must name at least one of", "{}"]),
    ({"align": {"neuron": 8}}, ["budget.align has unknown structure 'neuron'", "'heads', 'neurons', 'hidden'"]),
    ({"align": {"heads": 0}}, ["budget.align.heads must be a positive integer", "got 0"]),
])
def test_bad_alignment_is_a_one_line_error(kwargs, needles) -> None:
    with pytest.raises(ConfigError) as e:
        vtrans.Budget(params=0.5, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


@pytest.mark.parametrize(("align", "needles"), [
    ({"neurons": 64}, ["budget.align.neurons=64 is larger than the FFN width 48"]),
    ({"hidden": 40}, ["budget.align.hidden=40 is larger than the hidden size 32"]),
    (64, ["budget.align=64 (hidden) is larger than the hidden size 32"]),
    ({"heads": 32}, ["budget.align.heads=32 is larger than the attention width", "2 key/value groups x head_dim 8"]),
])
def test_alignment_wider_than_its_structure(align, needles) -> None:
    model = tiny("llama", LlamaForCausalLM)
    vib = vtrans.attach(model)
    for call in (lambda b: vib.apply_budget(b, scores=score(model, "magnitude")),
                 lambda b: vib.apply_budget(vtrans.Budget(params=0.5, uniform=True, align=b.align)),
                 lambda b: kwon_prune(vib, _batches(), b)):
        with pytest.raises(ConfigError) as e:
            call(vtrans.Budget(params=0.5, align=align))
        assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)


def test_parse_align() -> None:
    assert parse_align("8") == 8
    assert parse_align("neurons=64,hidden=8") == {"neurons": 64, "hidden": 8}
    for text, needle in [("eight", "--align must be a positive integer or heads=A,neurons=B,hidden=C, got 'eight'"),
                         ("0", "--align must be a positive integer"), ("neurons=x", "--align.neurons"),
                         ("ffn=8", "--align has unknown structure 'ffn'"), ("heads=2,heads=4", "gives heads twice")]:
        with pytest.raises(ConfigError, match=needle):
            parse_align(text)


def test_budget_describe_and_hash() -> None:
    a = vtrans.Budget(params=0.5, align={"neurons": 64, "hidden": 8})
    assert a.describe() == "params=0.5 (blocks, align=neurons=64,hidden=8)"
    assert vtrans.Budget(params=0.5, align=8).describe() == "params=0.5 (blocks, align=8)"
    assert hash(a) == hash(vtrans.Budget(params=0.5, align={"hidden": 8, "neurons": 64}))
    assert a.alignment == {"heads": 1, "neurons": 64, "hidden": 8} and a.aligned
    assert not vtrans.Budget(params=0.5, align=1).aligned


def test_pipeline_config_align() -> None:
    from pipelines.config import load_config
    from pipelines.typed_config import flatten

    config = "pipelines/configs/minilm-rotten-tomatoes.yaml"
    assert load_config(config, ["prune.budget.align=64"]).prune.budget.align == 64
    cfg = load_config(config, ["prune.budget.align={neurons: 64}", "prune.budget.align.hidden=8"])
    assert cfg.prune.budget.align == {"neurons": 64, "hidden": 8}
    flat = {k: v for k, v in flatten(cfg).items() if "align" in k}
    assert flat == {"prune.budget.align.neurons": "64", "prune.budget.align.hidden": "8"}
    assert load_config(config, [f"{k}={v}" for k, v in flat.items()]).prune.budget == cfg.prune.budget
    with pytest.raises(ConfigError, match=r"prune.budget.align has unknown structure 'neuron'"):
        load_config(config, ["prune.budget.align={neuron: 8}"])


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama", LlamaForCausalLM).save_pretrained(d)
    return d


def test_cli_compress_align(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "small"
    assert main(["compress", "--model", str(tiny_llama_dir), "--budget", "params=0.5", "--align", "8", "--seq-len",
                 "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "align=8" in text and "of the target" in text
    report = json.loads((out / "compression.json").read_text())
    assert report["budget"]["align"] == {"heads": 8, "neurons": 8, "hidden": 8}
    assert report["compressed"]["params_blocks"] <= 0.5 * report["dense"]["params_blocks"]
    assert report["budget"]["achieved_of_target"] == pytest.approx(
        report["compressed"]["params_blocks"] / report["budget"]["target"])
    assert report["hidden_size"]["kept"] % 8 == 0
    assert all(la["ffn_neurons"] % 8 == 0 for la in report["layers"])
    assert "--align 8" in (out / "README.md").read_text()


def test_cli_align_wider_than_the_model_fails_before_loading(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["compress", "--model", str(tiny_llama_dir), "--budget", "params=0.5", "--align", "64", "--out",
                 str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "budget.align=64" in err and "larger than" in err
    assert not (tmp_path / "x").exists()

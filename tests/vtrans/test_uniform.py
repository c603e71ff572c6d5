"""``Budget(uniform=True)`` / ``vtrans compress --uniform``: uniform widths saved as the stock architecture, which loads
where vtrans cannot be imported and computes what the masked model computes; exact sizes; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertModel, LlamaForCausalLM

import vtrans
from pipelines.cli import main
from tests.stock import assert_stock_files, load_without_vtrans, rel_err, task_of
from tests.tiny import CASES, IDS, input_ids, main_output, tiny
from vtrans.scoring import score
from vtrans.uniform import select_uniform

#: per architecture: budget, then (layers, hidden, kv heads, FFN width, params in the blocks) of the stock result,
#: checked by hand with vtrans.budget's formulas (README of each number in the comments)
EXPECTED = {
    # BERT: every layer, 4 heads, hidden 32 stay; FFN 48 -> 24: 2 x (4224 attention + 1592 FFN + 128 norms)
    "bert": (11888, (2, 32, 4, 24, 11888)),
    "roberta": (11888, (2, 32, 4, 24, 11888)),
    # GPT-2: hidden = 3 heads x 8; 2 x (2448 attention + 3894 FFN incl. their LayerNorms) = 12684 <= 12704 (0.16% under)
    "gpt2": (0.5, (2, 24, 3, 78, 12684)),
    # Llama: one whole decoder layer goes, the other stays dense: 7744 = 15488 / 2 exactly
    "llama": (0.5, (1, 32, 2, 48, 7744)),
    # Mistral: Llama's shapes and parameters
    "mistral": (0.5, (1, 32, 2, 48, 7744)),
    # Phi-3 (its magnitude scores prefer narrower layers): 2 x ((24 x 16 + 2 x 24 x 8 + 16 x 24 + 24) attention
    # + (3 x 24 x 37 + 24) FFN) = 2 x (1176 + 2688) = 7728 <= 7744 (0.2% under)
    "phi3": (0.5, (2, 24, 1, 37, 7728)),
    # Qwen2: Llama + q/k/v biases (32 + 2 x 16 per layer): 7808 = 15616 / 2
    "qwen2": (0.5, (1, 32, 2, 48, 7808)),
    # Qwen3 (head_dim 16, q/k norms 2 x 16 per kept attention block): 2 x ((20 x 64 + 2 x 20 x 32 + 64 x 20 + 20 +
    # 32) attention + (3 x 20 x 25 + 20) FFN) = 2 x (3892 + 1520) = 10824 <= 21696 / 2 = 10848 (0.2% under)
    "qwen3": (0.5, (2, 20, 2, 25, 10824)),
}


def _uniform(arch: str, cls: type, budget: float | int) -> tuple[torch.nn.Module, vtrans.VIB, vtrans.Selection]:
    model = tiny(arch, cls, attn="sdpa")
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    with torch.no_grad():  # mask means away from 1, so folding them into the weights is really exercised
        for _, m in vib.masks():
            m.mu.copy_(0.5 + torch.rand(m.n, generator=torch.Generator().manual_seed(m.n)))
    sel = vib.apply_budget(vtrans.Budget(params=budget, uniform=True), scores=score(model, "magnitude"))
    return model, vib, sel


def test_uniform_result_is_stock_loads_without_vtrans_and_equals_masked(tmp_path: Path) -> None:
    cases, refs = [], {}
    for arch, cls in CASES:
        budget, (layers, hidden, kv, ffn, params) = EXPECTED[arch]
        model, vib, sel = _uniform(arch, cls, budget)
        keep = sel.keep()
        live = [i for i in range(len(keep.mha)) if keep.mha[i]]
        assert {keep.groups[i] for i in live} == {kv} and {keep.neurons[i] for i in live} == {ffn}  # uniform
        assert (len(live), keep.hidden) == (layers, hidden)
        ids = input_ids()
        with torch.no_grad():
            ref = main_output(model(input_ids=ids))
        if task_of(model) == "base":
            ref = ref[..., sel.hidden]  # the masked model's pruned hidden dims are zero
        gen = None
        if task_of(model) == "causal-lm":
            gen = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        stock = vtrans.compress(vib)
        assert type(stock).__name__ == cls.__name__ and not type(stock).__name__.startswith("Vtrans")
        c = stock.config
        assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size if arch != "gpt2" else c.n_inner) == (
            layers, hidden, ffn)
        assert getattr(c, "num_key_value_heads", c.num_attention_heads) == kv
        assert vtrans.count(stock).params_blocks == params == sel.achieved["size"]
        with torch.no_grad():
            assert rel_err(ref, main_output(stock(input_ids=ids))) < 1e-5
        out = tmp_path / cls.__name__
        stock.save_pretrained(out)
        assert_stock_files(out, arch)
        report = json.loads((out / "compression.json").read_text())
        assert report["format"] == "stock" and report["budget"]["value"] == budget
        torch.save(ids, out / "ids.pt")
        cases.append({"dir": str(out), "task": task_of(model)})
        refs[str(out)] = (ref, gen, cls.__name__)
    for d, res in load_without_vtrans(cases).items():
        ref, gen, name = refs[d]
        assert res["class"] == name and res["module"].startswith("transformers.models."), res["class"]
        assert rel_err(ref, res["out"]) < 1e-5, name
        if gen is not None:
            assert torch.equal(res["gen"], gen), name


@pytest.mark.parametrize(("arch", "cls"), CASES, ids=IDS)
def test_uniform_budget_met_within_tolerance_or_one_line_error(arch, cls) -> None:
    """Over a range of budgets every uniform selection lands in [0.995 target, target] or says why it cannot."""
    model = tiny(arch, cls)
    vib = vtrans.attach(model)
    g, sc = vib.geometry, score(model, "magnitude")
    rules = vib.adapter.stock_rules(model)
    for value in (0.95, 0.8, 0.6, 0.45, 0.3):
        budget = vtrans.Budget(params=value, uniform=True)
        try:
            sel = select_uniform(g, sc, budget, rules)
        except vtrans.BudgetError as e:
            assert "\n" not in str(e) and "uniform" in str(e) and rules.note in str(e)
            continue
        size = vtrans.budget.size(g, sel.keep(), "params", "blocks")
        assert 0.995 * value * sel.achieved["dense"] <= size <= value * sel.achieved["dense"]
        live = [i for i in range(g.n_layers) if sel.mha[i]]
        assert len({int(sel.groups[i].sum()) for i in live}) == 1 and len({int(sel.neurons[i].sum())
                                                                           for i in live}) == 1
        assert bool((sel.mha == sel.ffn).all())  # blocks go only as whole layers
        if not rules.drop_layers:
            assert len(live) == g.n_layers


def test_bert_floor_is_attention_and_norms() -> None:
    """Post-LN BERT keeps every layer, head and hidden dim: below attention + norms + one neuron nothing fits."""
    model = tiny("bert", BertModel)
    vib = vtrans.attach(model)
    with pytest.raises(vtrans.BudgetError) as e:
        vib.apply_budget(vtrans.Budget(params=0.5, uniform=True), scores=score(model, "magnitude"))
    # 2 x (4224 attention + (2 x 32 x 1 + 1 + 32) FFN + 128 norms) = 8898 of 15008
    assert "the smallest uniform model has 8898 (59.29% of dense)" in str(e.value)
    assert "post-LayerNorm" in str(e.value) and "\n" not in str(e.value)


def test_cli_compress_uniform_and_unreachable_budget(tmp_path: Path, capsys) -> None:
    src = tmp_path / "llama"
    tiny("llama", LlamaForCausalLM).save_pretrained(src)
    out = tmp_path / "uniform"
    assert main(["compress", "--model", str(src), "--budget", "params=0.5", "--uniform", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stock llama" in text and "max |masked - compressed|" in text
    assert_stock_files(out, "llama")
    report = json.loads((out / "compression.json").read_text())
    assert report["compressed"]["params_blocks"] == 7744 and report["dense"]["params_blocks"] == 15488

    bert = tmp_path / "bert"
    tiny("bert", BertModel).save_pretrained(bert)
    capsys.readouterr()
    bad = tmp_path / "never"
    code = main(["compress", "--model", str(bert), "--budget", "params=0.3", "--uniform", "--out", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "budget params=0.3 (blocks, uniform)" in err and "8898" in err
    assert not bad.exists()


def test_pipeline_budget_key_uniform() -> None:
    from pipelines.config import load_config

    cfg = load_config("pipelines/configs/minilm-rotten-tomatoes.yaml", ["prune.budget.uniform=true"])
    assert cfg.prune.budget.uniform is True and cfg.prune.budget.params == 0.5
    with pytest.raises(vtrans.ConfigError, match=r"prune\.budget\.uniform"):
        load_config("pipelines/configs/minilm-rotten-tomatoes.yaml", ["prune.budget.uniform=3"])
    with pytest.raises(vtrans.ConfigError, match="uniform must be true or false"):
        vtrans.Budget(params=0.5, uniform="yes")


@pytest.mark.integration
def test_smollm2_uniform_loads_without_vtrans(tmp_path: Path) -> None:
    """The real SmolLM2-135M at 50% of its block parameters, uniform: stock llama, equal logits and generation, and
    transformers' ``pipeline("text-generation")`` in a process without vtrans gives the masked model's text."""
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_pretrained, load_tokenizer

    model = load_pretrained(resolve_model("smollm2"), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(resolve_model("smollm2"))
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    sel = vib.apply_budget(vtrans.Budget(params=0.5, uniform=True), scores=score(model, "magnitude"))
    assert 0.995 * 0.5 <= sel.achieved["fraction"] <= 0.5
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    prompt = "The history of the city"
    enc = tokenizer(prompt, return_tensors="pt")
    text = tokenizer.decode(model.generate(**enc, max_new_tokens=4, do_sample=False,
                                           pad_token_id=tokenizer.eos_token_id)[0, enc["input_ids"].shape[1]:],
                            skip_special_tokens=True)
    stock = vtrans.compress(vib)
    assert stock.config.hidden_size % stock.config.num_attention_heads == 0
    stock.save_pretrained(tmp_path / "s")
    tokenizer.save_pretrained(tmp_path / "s")
    assert_stock_files(tmp_path / "s", "llama")
    torch.save(ids, tmp_path / "s" / "ids.pt")
    res = load_without_vtrans([{"dir": str(tmp_path / "s"), "task": "causal-lm", "new_tokens": 4, "prompt": prompt}])
    res = res[str(tmp_path / "s")]
    assert rel_err(ref, res["out"]) < 1e-4  # 30 layers of float32 sums in another order: 1e-5 is not always met
    assert torch.equal(res["gen"], gen)
    assert res["pipeline"] == {"text": text, "class": "LlamaForCausalLM"}


def test_every_round_of_a_uniform_pruning_run_is_uniform() -> None:
    """``prune.rounds > 1`` fixes an intermediate budget after each round: uniform too, not only the last one."""
    from transformers import LlamaForCausalLM as Llama

    from vtrans.train import PruneConfig, Pruner

    model = tiny("llama", Llama, attn="sdpa", num_hidden_layers=4)
    pruner = Pruner(model, PruneConfig(method="faster", task="causal-lm", rounds=2, steps=2, init="constant",
                                       budget=vtrans.Budget(params=0.5, uniform=True, tolerance=0.3)))
    with torch.no_grad():  # unequal scores, so a heterogeneous selection would give unequal widths
        for _, m in pruner.vib.masks():
            m.mu.copy_(0.5 + torch.rand(m.n, generator=torch.Generator().manual_seed(m.n + 1)))
    pruner.fix_round_budget(0)  # the first round's target, 0.75
    keep = pruner.vib.selection().keep()
    kept = [i for i in range(4) if keep.mha[i] or keep.ffn[i]]
    assert pruner.vib.budget.uniform and pruner.vib.budget.value == pytest.approx(0.75)
    assert all(keep.mha[i] and keep.ffn[i] for i in kept)  # stock Llama: a layer stays whole or goes
    assert len({keep.groups[i] for i in kept}) == 1 and len({keep.neurons[i] for i in kept}) == 1


def test_kwon_refuses_a_uniform_budget_in_one_line() -> None:
    model = tiny("bert", BertModel)
    vib = vtrans.attach(model)
    with pytest.raises(vtrans.ConfigError) as e:
        vtrans.kwon_prune(vib, [], vtrans.Budget(params=0.5, uniform=True))
    assert "budget.uniform=true" in str(e.value) and "\n" not in str(e.value)

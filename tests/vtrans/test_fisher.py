"""Kwon et al. 2022 (Fisher masks, search, rearrangement, tuning): per-sample Fisher against a brute-force
computation, budgets met exactly by the compressed model, exact folding of the tuned masks, and each step's
guarantee on its own objective."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification, BertModel, GPT2LMHeadModel, LlamaForCausalLM

import vtrans
from tests.tiny import CASES, tiny
from vtrans.budget import Selection, size
from vtrans.fisher import (
    Fisher,
    fisher_information,
    fisher_scores,
    kwon_prune,
    layer_errors,
    rearrange_masks,
    search_masks,
    tune_masks,
)

#: every head class with a task loss (base models have none)
HEAD_CASES = [(a, c) for a, c in CASES if "ForSequenceClassification" in c.__name__ or "LM" in c.__name__]
HEAD_IDS = [c.__name__ for _, c in HEAD_CASES]
FFN_KEY = {"bert": "intermediate_size", "roberta": "intermediate_size", "llama": "intermediate_size",
           "mistral": "intermediate_size", "qwen2": "intermediate_size", "qwen3": "intermediate_size",
           "phi3": "intermediate_size", "gpt2": "n_inner"}


def _model(arch: str, cls: type, ffn: int | None = None, **kw) -> nn.Module:
    if ffn is not None:
        kw[FFN_KEY[arch]] = ffn
    return tiny(arch, cls, **kw)


def _batches(model: nn.Module, n: int = 2, size_: int = 4, seq: int = 10, labels: bool = True) -> list[dict]:
    """Right-padded batches (two shorter samples per batch), with labels for classifiers."""
    out = []
    for k in range(n):
        gen = torch.Generator().manual_seed(100 + k)
        ids = torch.randint(3, 60, (size_, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0
        mask[1, 4:] = 0
        batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
        if labels and "SequenceClassification" in type(model).__name__:
            batch["labels"] = torch.randint(0, 2, (size_,), generator=gen)
        out.append(batch)
    return out


def _out_weight(module: nn.Module) -> torch.Tensor:
    """The projection weight as (out, in): a view, so writing to it edits the module."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()  # GPT-2 Conv1D is (in, out)


def _brute_force(model: nn.Module, batches: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fisher blocks from one sample at a time, unpadded, with one shared mask per layer."""
    adapter = vtrans.arch.for_model(model)
    g, hp = adapter.geometry(model), adapter.hook_points(model)
    w = g.group_size * g.head_dim
    heads = [torch.zeros(g.n_groups, g.n_groups, dtype=torch.float64) for _ in range(g.n_layers)]
    neurons = [torch.zeros(g.ffn, g.ffn, dtype=torch.float64) for _ in range(g.n_layers)]
    masks: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i in range(g.n_layers):
        handles.append(hp.attn_out[i].register_forward_pre_hook(
            lambda m, a, i=i: ((a[0].unflatten(-1, (-1, w)) * masks["h"][i][:, None]).flatten(-2),)))
        handles.append(hp.ffn_out[i].register_forward_pre_hook(lambda m, a, i=i: (a[0] * masks["n"][i],)))
    try:
        for batch in batches:
            for b in range(batch["input_ids"].shape[0]):
                n = int(batch["attention_mask"][b].sum())
                ids = batch["input_ids"][b : b + 1, :n]  # (1, n)
                masks["h"] = [torch.ones(g.n_groups, requires_grad=True) for _ in range(g.n_layers)]
                masks["n"] = [torch.ones(g.ffn, requires_grad=True) for _ in range(g.n_layers)]
                logits = model(input_ids=ids).logits
                if "labels" in batch:
                    loss = F.cross_entropy(logits, batch["labels"][b : b + 1])
                else:
                    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
                grads = torch.autograd.grad(loss, masks["h"] + masks["n"])
                for i in range(g.n_layers):
                    gh, gn = grads[i].double(), grads[g.n_layers + i].double()
                    heads[i] += torch.outer(gh, gh)
                    neurons[i] += torch.outer(gn, gn)
    finally:
        for h in handles:
            h.remove()
    return heads, neurons


@pytest.mark.parametrize(("arch", "cls"), HEAD_CASES, ids=HEAD_IDS)
def test_fisher_equals_brute_force_per_sample_gradients(arch, cls) -> None:
    model = _model(arch, cls)
    batches = _batches(model)
    fisher = fisher_information(model, batches)
    heads, neurons = _brute_force(model, batches)
    assert fisher.samples == 8
    for i in range(len(heads)):
        for got, want in ((fisher.heads[i], heads[i]), (fisher.neurons[i], neurons[i])):
            assert want.abs().max() > 0
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    diag = fisher_scores(model, batches)
    assert torch.allclose(diag.neurons[1].double(), neurons[1].diagonal(), rtol=1e-4,
                          atol=1e-6 * float(neurons[1].abs().max()))
    assert torch.isinf(diag.hidden).all() and torch.isinf(diag.mha).all() and torch.isinf(diag.ffn).all()


def test_fisher_without_labels_uses_the_models_own_prediction() -> None:
    model = _model("bert", BertForSequenceClassification)
    batches = _batches(model, labels=False)
    with torch.no_grad():
        pred = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1) for b in batches]
    labelled = [{**b, "labels": p} for b, p in zip(batches, pred)]
    a, b = fisher_information(model, batches), fisher_information(model, labelled)
    assert all(torch.equal(x, y) for x, y in zip(a.heads + a.neurons, b.heads + b.neurons))


@pytest.mark.parametrize(("arch", "cls"), HEAD_CASES, ids=HEAD_IDS)
def test_a_unit_that_cannot_affect_the_loss_has_zero_fisher(arch, cls) -> None:
    model = _model(arch, cls)
    adapter = vtrans.arch.for_model(model)
    g, hp = adapter.geometry(model), adapter.hook_points(model)
    w = g.group_size * g.head_dim  # a key/value group's width in the attention output (2 query heads for Llama)
    with torch.no_grad():
        _out_weight(hp.attn_out[0])[:, w : 2 * w] = 0.0  # group 1 of layer 0 writes nothing
        _out_weight(hp.ffn_out[1])[:, 5] = 0.0  # neuron 5 of layer 1 writes nothing
    fisher = fisher_information(model, _batches(model))
    assert fisher.heads[0][1].abs().max() == 0 and fisher.heads[0][:, 1].abs().max() == 0
    assert fisher.neurons[1][5].abs().max() == 0 and fisher.neurons[1][:, 5].abs().max() == 0
    assert fisher.heads[0].diagonal()[[0]].min() > 0 and fisher.neurons[1].diagonal()[:5].min() > 0


def test_search_removes_the_least_important_units_first() -> None:
    model = tiny("bert", BertForSequenceClassification)
    g = vtrans.arch.for_model(model).geometry(model)
    head_params = 4 * g.hidden * g.head_dim + 3 * g.head_dim  # q, k, v, o slices + q, k, v biases: 1048
    dense = int(size(g, g.dense_keep()))
    groups = [torch.ones(4), torch.tensor([0.0, 1.0, 1.0, 0.0])]
    scores = vtrans.Scores(torch.full((g.hidden,), float("inf")), groups, [torch.ones(g.ffn)] * 2,
                           torch.full((2,), float("inf")), torch.full((2,), float("inf")))
    sel = search_masks(g, scores, vtrans.Budget(params=dense - 2 * head_params))
    assert sel.groups[1].tolist() == [False, True, True, False] and sel.groups[0].all()
    assert all(n.all() for n in sel.neurons) and sel.hidden.all()
    assert sel.achieved["size"] == dense - 2 * head_params


def test_rearrangement_finds_interacting_units_the_diagonal_misses() -> None:
    # units 2 and 3 (the least important alone) push the loss the same way, so removing both costs 4x their diagonal;
    # unit 1 pushes against them: removing 1 with 3 nearly cancels
    a, b, e = torch.tensor([3.0, -2.0, 1.0]), torch.tensor([0.5, 0.2, -0.4]), torch.tensor([0.05, -0.02, 0.01])
    grads = torch.stack([a, -1.2 * b, b, b + e], 1).double()  # (samples, units)
    block = grads.T @ grads
    fisher = Fisher([block], [torch.eye(3, dtype=torch.float64)], samples=3, hidden=8)
    sel = Selection.normalised(torch.ones(8), [torch.tensor([True, True, False, False])],
                               [torch.ones(3, dtype=torch.bool)], torch.ones(1), torch.ones(1))
    out = rearrange_masks(sel, fisher)
    assert out.groups[0].tolist() == [True, False, True, False]
    assert fisher.loss_increase(sel) == pytest.approx(float((2 * b + e).pow(2).sum()) / 6)
    assert fisher.loss_increase(out) == pytest.approx(float((-0.2 * b + e).pow(2).sum()) / 6)
    assert fisher.loss_increase(out, diagonal=True) > fisher.loss_increase(sel, diagonal=True)


@pytest.mark.parametrize(("arch", "cls"), HEAD_CASES, ids=HEAD_IDS)
def test_rearrangement_never_increases_the_block_diagonal_estimate(arch, cls) -> None:
    model = _model(arch, cls, ffn=96)
    fisher = fisher_information(model, _batches(model))
    g = vtrans.arch.for_model(model).geometry(model)
    for budget in (vtrans.Budget(params=0.5, tolerance=0.05), vtrans.Budget(flops=0.3, tolerance=0.05)):
        sel = search_masks(g, fisher.scores(), budget)
        out = rearrange_masks(sel, fisher, passes=3)
        assert out.keep() == sel.keep()  # the search's per-layer counts stay
        before, after = fisher.loss_increase(sel), fisher.loss_increase(out)
        assert after <= before * (1 + 1e-9)
        for i in range(g.n_layers):  # block by block, too
            for blk, new, old in (("heads", out.groups[i], sel.groups[i]), ("neurons", out.neurons[i],
                                                                            sel.neurons[i])):
                f = getattr(fisher, blk)[i]
                zo, zn = (~old).double(), (~new).double()
                assert float(zn @ f @ zn) <= float(zo @ f @ zo) * (1 + 1e-9)


@pytest.mark.parametrize(("arch", "cls"), HEAD_CASES, ids=HEAD_IDS)
@pytest.mark.parametrize("budget", [vtrans.Budget(params=0.5), vtrans.Budget(flops=0.4, seq_len=16),
                                    vtrans.Budget(params=0.7, scope="total")], ids=["params", "flops", "total"])
def test_budget_met_and_compressed_model_equals_the_masked_one(arch, cls, budget) -> None:
    model = _model(arch, cls, ffn=256)
    batches = _batches(model)
    dense = vtrans.count(model, seq_len=budget.seq_len)
    vib = vtrans.attach(model)
    sel = kwon_prune(vib, batches, budget)
    assert sel.hidden.all()  # Kwon never prunes the hidden dimension
    assert any((m.mu != 1).any() for _, m in vib.masks())  # tuned values are folded below
    with torch.no_grad():
        masked = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
    small = vtrans.compress(vib)
    with torch.no_grad():
        out = [small(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
    for a, b in zip(masked, out):
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    kept = vtrans.count(small, seq_len=budget.seq_len)
    assert sum(p.numel() for p in small.parameters()) == kept.params_total
    target = budget.target(dense.get(budget.metric, budget.scope))
    assert (1 - budget.tolerance) * target <= kept.get(budget.metric, budget.scope) <= target
    assert small.config.vtrans["report"]["method"] == "kwon"


@pytest.mark.parametrize(("arch", "cls"), [("bert", BertForSequenceClassification), ("gpt2", GPT2LMHeadModel),
                                           ("llama", LlamaForCausalLM)], ids=["bert", "gpt2", "llama"])
def test_tuning_lowers_the_layer_reconstruction_error(arch, cls) -> None:
    # larger weights than the tiny default, so that pruning visibly changes every sub-layer's output
    model = _model(arch, cls, ffn=96, initializer_range=0.3)
    batches = _batches(model, n=3)
    vib = vtrans.attach(model)
    kwon_prune(vib, batches, vtrans.Budget(params=0.5, tolerance=0.05), tune=False)
    before = layer_errors(vib, batches)
    fits = tune_masks(vib, batches)
    after = layer_errors(vib, batches)
    print(f"\n{arch}: relative squared error per sub-layer, untuned {[f'{e:.4f}' for e in before]}, "
          f"tuned {[f'{e:.4f}' for e in after]}")
    assert fits and all(f.error_after <= f.error_before for f in fits)
    assert sum(f.accepted for f in fits) >= 2
    # the first tuned sub-layer sees the same input before and after: its fit is what layer_errors measures
    first = 2 * fits[0].layer + (fits[0].block == "ffn")
    assert fits[0].error_before == pytest.approx(before[first], rel=1e-6)
    assert fits[0].error_after == pytest.approx(after[first], rel=1e-6)
    assert after[-1] < before[-1] and sum(after) < sum(before)


def test_results_are_deterministic() -> None:
    base = _model("llama", LlamaForCausalLM, ffn=96)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base)
        vib = vtrans.attach(model, vtrans.VIBConfig(seed=None))  # random initial means: reset to 1 by kwon_prune
        sel = kwon_prune(vib, _batches(model), vtrans.Budget(flops=0.5, tolerance=0.05))
        runs.append((sel, [m.mu.detach().clone() for _, m in vib.masks()]))
    (a, mu_a), (b, mu_b) = runs
    assert all(torch.equal(x, y) for x, y in zip(a.groups + a.neurons, b.groups + b.neurons))
    assert all(torch.equal(x, y) for x, y in zip(mu_a, mu_b))


def test_fisher_scores_serve_as_a_scorer() -> None:
    model = _model("gpt2", GPT2LMHeadModel, ffn=256)
    vib = vtrans.attach(model)
    budget = vtrans.Budget(params=0.5)
    vib.apply_budget(budget, scores=fisher_scores(model, _batches(model)), method="fisher")
    small = vtrans.compress(vib)
    kept, dense = vtrans.count(small).params_blocks, vtrans.count(model).params_blocks
    assert (1 - budget.tolerance) * 0.5 * dense <= kept <= 0.5 * dense


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_typed_one_line_errors() -> None:
    model = _model("bert", BertForSequenceClassification)
    vib = vtrans.attach(model)
    budget = vtrans.Budget(params=0.5, tolerance=0.05)
    with pytest.raises(vtrans.ConfigError) as e:
        kwon_prune(vib, [], budget)
    assert "empty" in _one_line(e)
    with pytest.raises(vtrans.ConfigError) as e:
        kwon_prune(vib, [{"labels": torch.zeros(2, dtype=torch.long)}], budget)
    assert "input_ids" in _one_line(e)
    with pytest.raises(vtrans.ConfigError) as e:
        kwon_prune(model, _batches(model), budget)
    assert "vtrans.attach" in _one_line(e)
    with pytest.raises(vtrans.ConfigError) as e:
        kwon_prune(vib, _batches(model), "params=0.5")
    assert "'params=0.5'" in _one_line(e)
    with pytest.raises(vtrans.BudgetError) as e:
        kwon_prune(vib, _batches(model), vtrans.Budget(params=10))
    assert "params=10" in _one_line(e)
    with pytest.raises(vtrans.ConfigError) as e:
        fisher_information(tiny("bert", BertModel), _batches(model))
    assert "'BertModel'" in _one_line(e)
    diag = fisher_information(model, _batches(model), blocks=False)
    sel = search_masks(vib.geometry, diag.scores(), budget)
    with pytest.raises(vtrans.ConfigError) as e:
        rearrange_masks(sel, diag)
    assert "blocks=True" in _one_line(e)
    with pytest.raises(vtrans.ConfigError) as e:
        vtrans.score(model, "fisher")
    assert "kwon_prune" in _one_line(e)
    only_heads = vtrans.attach(_model("gpt2", GPT2LMHeadModel), vtrans.VIBConfig(structures=("heads",)))
    with pytest.raises(vtrans.ConfigError) as e:
        kwon_prune(only_heads, _batches(model), budget)
    assert "['heads']" in _one_line(e)


# --------------------------------------------------------------------------------------------------------------------
# integration: the real all-MiniLM-L6-v2 on Rotten Tomatoes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_minilm_kwon_beats_magnitude_at_half_the_block_parameters() -> None:
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_pretrained, load_tokenizer
    from vtrans.data import ClassificationDataset, collate, pad_token_id_of, rotten_tomatoes, stratified_subset
    from vtrans.scoring import magnitude

    t0 = time.perf_counter()
    torch.manual_seed(0)
    path = resolve_model("minilm")
    model = load_pretrained(path, task="seq-cls", num_labels=2, dtype=torch.float32).eval()
    tok = load_tokenizer(path)
    data = rotten_tomatoes()
    idx = stratified_subset(data.labels, count=512, seed=0)

    def batches(indices: list[int]) -> list[dict]:
        ds = ClassificationDataset(data, tok, max_length=48, indices=indices)
        return [collate([ds[i] for i in range(s, min(s + 32, len(ds)))], pad_token_id_of(tok))
                for s in range(0, len(ds), 32)]

    train, held_out = batches(idx[:256]), batches(idx[256:])
    # MiniLM has no classifier: a teacher head fitted on its pooled output (logistic regression, 256 texts)
    with torch.no_grad():
        feats = torch.cat([model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output
                           for b in train])  # (256, 384)
    labels = torch.cat([b["labels"] for b in train])
    head = nn.Linear(feats.shape[1], 2)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    model.classifier.load_state_dict(head.state_dict())
    y = torch.cat([b["labels"] for b in held_out])

    @torch.no_grad()
    def logits(m: nn.Module) -> torch.Tensor:
        return torch.cat([m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in held_out])

    dense = logits(model)

    def metrics(lg: torch.Tensor) -> dict[str, float]:
        return {"agreement": float((lg.argmax(-1) == dense.argmax(-1)).float().mean()),
                "kl": float(F.kl_div(lg.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                     reduction="batchmean")),
                "loss": float(F.cross_entropy(lg, y)), "accuracy": float((lg.argmax(-1) == y).float().mean())}

    budget = vtrans.Budget(params=0.5)
    calibration = train[:2]  # 64 labelled texts
    results: dict[str, dict[str, float]] = {"dense": metrics(dense)}
    for name in ("magnitude", "kwon (search)", "kwon (search + rearrange)", "kwon (search + rearrange + tune)"):
        m = copy.deepcopy(model)
        vib = vtrans.attach(m, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
        t = time.perf_counter()
        if name == "magnitude":
            vib.apply_budget(budget, scores=magnitude(m), method="magnitude")
        else:
            kwon_prune(vib, calibration, budget, rearrange="rearrange" in name, tune="tune" in name)
        seconds = time.perf_counter() - t
        small = vtrans.compress(vib)
        kept, whole = vtrans.count(small).params_blocks, vtrans.count(model).params_blocks
        assert (1 - budget.tolerance) * 0.5 * whole <= kept <= 0.5 * whole
        results[name] = {**metrics(logits(small)), "prune_s": seconds}
    print("\nall-MiniLM-L6-v2, 50% of block params, 256 held-out Rotten Tomatoes texts "
          f"(total {time.perf_counter() - t0:.0f}s):")
    for name, r in results.items():
        print(f"  {name:33s} " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
    mag = results["magnitude"]
    for name in ("kwon (search)", "kwon (search + rearrange)", "kwon (search + rearrange + tune)"):
        assert results[name]["agreement"] > mag["agreement"] and results[name]["kl"] < mag["kl"]

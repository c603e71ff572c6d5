"""Latency budgets (:mod:`vtrans.latency_table`): the table from a fake clock has exact numbers, the cache is hit only
for the same device / threads / shape, a selection's predicted latency is <= the target for every selector, and bad
budgets are one-line errors. Timing goals are not asserted here (they belong in benchmark scripts)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

import vtrans
from tests.tiny import tiny
from vtrans import latency_table as lt
from vtrans.config import Budget
from vtrans.errors import BudgetError, ConfigError
from vtrans.fisher import kwon_prune
from vtrans.scoring import magnitude, random

SEQ = 8
H, HEAD_DIM, FFN, LAYERS = 32, 8, 48, 2  # tests.tiny's shapes


class FakeClock:
    """Seconds advance only inside the linear layers of a forward pass, by the number of their weights: a layer's
    measured "latency" is exactly 1000 x its matrix sizes (ms)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.t

    def hook(self, module, args, out) -> None:
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            self.t += module.weight.numel()


@pytest.fixture
def clock():
    c = FakeClock()
    handle = torch.nn.modules.module.register_module_forward_hook(c.hook)
    yield c
    handle.remove()


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def test_table_from_a_fake_clock_has_the_exact_numbers(clock: FakeClock) -> None:
    model = tiny("bert", BertForSequenceClassification)
    table = lt.measure(model, batch_size=1, seq_len=SEQ, clock=clock, repeats=3, warmup=1)
    # q, k, v, o of k heads of 8 dims; the FFN's two matrices; outside: pooler (32x32) and classifier (2x32)
    assert table.attention == {k: 1000.0 * 4 * H * k * HEAD_DIM for k in (1, 2, 3, 4)}
    assert sorted(table.ffn) == lt.grid(FFN, lt.FFN_POINTS) == [1, 6, 12, 18, 24, 30, 36, 42, 48]
    assert all(v == 1000.0 * 2 * H * n for n, v in table.ffn.items())
    assert table.outside_ms == 1000.0 * (H * H + 2 * H)
    assert table.ffn_ms(7) == 1000.0 * 2 * H * 7  # interpolated between grid points
    assert table.attention_ms(0) == table.ffn_ms(0) == 0.0  # a removed sub-layer costs nothing
    assert table.dense_ms == table.dense_measured_ms == 1000.0 * (H * H + 2 * H + LAYERS * (4 * H * H + 2 * H * FFN))
    keep = vtrans.Keep(H, [1, 0], [10, 48], [1, 0], [1, 1])
    assert table.predict(keep) == 1000.0 * (H * H + 2 * H + 4 * H * HEAD_DIM + 2 * H * 58)


def test_grouped_query_table_counts_key_value_groups(clock: FakeClock) -> None:
    model = tiny("llama", LlamaForCausalLM)  # 4 query heads in 2 key/value groups, tied LM head (60 x 32)
    table = lt.measure(model, batch_size=1, seq_len=SEQ, clock=clock, repeats=1, warmup=0)
    assert table.attention == {k: 1000.0 * (2 * H * 2 * k * HEAD_DIM + 2 * H * k * HEAD_DIM) for k in (1, 2)}
    assert table.ffn[FFN] == 1000.0 * 3 * H * FFN
    assert table.outside_ms == 1000.0 * 60 * H
    assert table.dense_ms == table.dense_measured_ms


def test_pav_fit_is_monotone_and_nonnegative() -> None:
    assert lt._pav({1: 2.0, 2: 1.0, 3: 3.0}) == {1: 1.5, 2: 1.5, 3: 3.0}
    assert lt._pav({1: -1.0, 2: 4.0}) == {1: 0.0, 2: 4.0}


def test_cache_hit_only_for_the_same_key(clock: FakeClock, tmp_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny("bert", BertForSequenceClassification)
    first = lt.table_for(model, 1, SEQ, clock=clock, repeats=1, warmup=0)
    assert clock.calls > 0 and not first.cached
    files = list((tmp_cache / "latency").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == lt.table_key(model, 1, SEQ)
    assert set(first.key) == {"version", "device", "model_type", "model_class", "attn_implementation", "dtype",
                              "threads", "batch_size", "seq_len", "vocab_size", "num_labels", "n_layers", "hidden",
                              "n_groups", "group_size", "head_dim", "ffn"}
    calls = clock.calls
    hit = lt.table_for(model, 1, SEQ, clock=clock, repeats=1, warmup=0)
    assert hit.cached and clock.calls == calls and hit == first  # no clock call: nothing measured

    torch.set_num_threads(2)  # another thread count: a miss (the conftest fixture restores 1)
    other = lt.table_for(model, 1, SEQ, clock=clock, repeats=1, warmup=0)
    assert not other.cached and clock.calls > calls and other.key["threads"] == 2
    with pytest.raises(ConfigError) as e:  # a table of 2 threads is refused for a run with 1
        torch.set_num_threads(1)
        other.check_key(lt.table_key(model, 1, SEQ))
    assert "threads 2 (table) != 1 (this run)" in _one_line(e)

    calls = clock.calls
    monkeypatch.setattr(lt, "device_name", lambda device: "cuda:Some GPU")  # another device: a miss
    assert not lt.table_for(model, 1, SEQ, clock=clock, repeats=1, warmup=0).cached and clock.calls > calls
    calls = clock.calls
    assert not lt.table_for(model, 2, SEQ, clock=clock, repeats=1, warmup=0).cached and clock.calls > calls
    assert len(list((tmp_cache / "latency").glob("*.json"))) == 4


def test_a_file_whose_key_differs_from_its_name_is_refused(clock: FakeClock, tmp_cache) -> None:
    model = tiny("bert", BertForSequenceClassification)
    key = lt.table_key(model, 1, SEQ)
    table = lt.measure(model, 1, SEQ, clock=clock, repeats=1, warmup=0)
    table.key = {**key, "threads": key["threads"] + 7}  # measured elsewhere, copied in under this key's name
    lt.save(table, lt.cache_path(key))
    with pytest.raises(ConfigError) as e:
        lt.table_for(model, 1, SEQ, clock=clock)
    text = _one_line(e)
    assert "refused" in text and f"threads {key['threads'] + 7} (table) != {key['threads']} (this run)" in text
    lt.cache_path(key).write_text("{not json")
    with pytest.raises(ConfigError) as e:
        lt.table_for(model, 1, SEQ, clock=clock)
    assert "cannot be read" in _one_line(e)


def _fits_no_further_step(g, sel, table, budget) -> bool:
    """No single further unit (alignment step) of any sub-layer keeps the prediction <= the target."""
    steps = lt._steps(g, budget)
    keep = sel.keep()
    target = sel.achieved["target_ms"]
    for i in range(g.n_layers):
        for kind, dense, step in (("groups", g.n_groups, steps["groups"]), ("neurons", g.ffn, steps["neurons"])):
            counts = getattr(keep, kind)
            if counts[i] + step > dense:
                continue
            trial = vtrans.Keep(keep.hidden, list(keep.groups), list(keep.neurons), list(keep.mha), list(keep.ffn))
            getattr(trial, kind)[i] += step
            trial.mha = [int(x > 0) for x in trial.groups]
            trial.ffn = [int(x > 0) for x in trial.neurons]
            if table.predict(trial) <= target:
                return False
    return True


@pytest.mark.parametrize("arch_cls", [("bert", BertForSequenceClassification), ("llama", LlamaForCausalLM)],
                         ids=["bert", "llama"])
@pytest.mark.parametrize("selector", ["magnitude", "random", "vib", "kwon"])
def test_selection_predicts_at_most_the_target(arch_cls, selector: str, clock: FakeClock) -> None:
    model = tiny(*arch_cls)
    table = lt.measure(model, 1, SEQ, clock=clock, repeats=1, warmup=0)
    vib = vtrans.attach(model, vtrans.VIBConfig(logvar_init_std=1.0))
    g = vib.geometry
    for fraction in (1.0, 0.8, 0.55, 0.3):
        budget = Budget(latency=fraction, seq_len=SEQ)
        if selector == "kwon":
            ids = torch.randint(3, 60, (4, SEQ), generator=torch.Generator().manual_seed(0))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if "Sequence" in type(model).__name__:
                batch["labels"] = torch.tensor([0, 1, 0, 1])
            sel = kwon_prune(vib, [batch], budget, table=table, tune=False)
        else:
            scores = {"magnitude": lambda: magnitude(model), "random": lambda: random(model, seed=1),
                      "vib": lambda: None}[selector]()
            sel = vib.apply_budget(budget, scores=scores, table=table)
        a = sel.achieved
        assert a["predicted_ms"] == pytest.approx(table.predict(sel.keep()), rel=1e-12)
        assert a["predicted_ms"] <= a["target_ms"] == pytest.approx(fraction * table.dense_ms)
        assert a["of_target"] == a["predicted_ms"] / a["target_ms"] <= 1.0
        assert bool(sel.hidden.all())  # the hidden size is never pruned by a latency budget
        assert _fits_no_further_step(g, sel, table, budget)
        assert vib.latency_table is table
    small = vtrans.compress(vib)
    report = small.config.vtrans["report"]
    assert report["budget"]["metric"] == "latency" and report["budget"]["batch_size"] == 1
    assert report["latency"]["predicted_ms"] <= report["latency"]["target_ms"]
    assert report["latency"]["table_key"] == table.key and report["latency"]["measured_ms"] is None
    with torch.no_grad():
        small(input_ids=torch.randint(3, 60, (1, SEQ)))


def test_aligned_latency_budget(clock: FakeClock) -> None:
    model = tiny("bert", BertForSequenceClassification)
    table = lt.measure(model, 1, SEQ, clock=clock, repeats=1, warmup=0)
    vib = vtrans.attach(model)
    budget = Budget(latency=0.5, seq_len=SEQ, align={"neurons": 8, "heads": 16})  # heads: 2 groups of 8 dims
    sel = vib.apply_budget(budget, scores=magnitude(model), table=table)
    keep = sel.keep()
    assert all(n % 8 == 0 for n in keep.neurons) and all(k % 2 == 0 for k in keep.groups)
    assert sel.achieved["predicted_ms"] <= sel.achieved["target_ms"]
    assert sel.achieved["align"] == {"heads": 16, "neurons": 8, "hidden": 1}
    assert _fits_no_further_step(vib.geometry, sel, table, budget)


def test_apply_budget_measures_with_the_default_clock_and_caches(clock: FakeClock, tmp_cache,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lt, "default_clock", clock)
    model = tiny("bert", BertForSequenceClassification)
    vib = vtrans.attach(model)
    sel = vib.apply_budget(Budget(latency=0.6, seq_len=SEQ), scores=magnitude(model))
    assert not vib.latency_table.cached and sel.achieved["predicted_ms"] <= sel.achieved["target_ms"]
    calls, table = clock.calls, vib.latency_table
    vib.apply_budget(Budget(latency=0.4, seq_len=SEQ), scores=magnitude(model))
    assert vib.latency_table is table and clock.calls == calls  # the table in use
    vib.remove()
    other = vtrans.attach(model)
    other.apply_budget(Budget(latency=0.4, seq_len=SEQ), scores=magnitude(model))
    assert other.latency_table.cached and other.latency_table == table and clock.calls == calls  # from the cache
    sel = other.apply_budget(Budget(params=0.5), scores=magnitude(model))
    assert "predicted_ms" not in sel.achieved and "latency" not in vtrans.compress(other).config.vtrans["report"]


@pytest.mark.parametrize(("kwargs", "needles"), [
    ({"params": 0.5, "latency": 0.5}, ["exactly one of params, flops or latency", "params=0.5", "latency=0.5"]),
    ({"flops": 0.5, "latency": 0.5}, ["exactly one of params, flops or latency", "flops=0.5"]),
    ({"latency": 0.0}, ["budget.latency", "(0, 1]", "0.0"]),
    ({"latency": 1.5}, ["budget.latency", "1.5"]),
    ({"latency": 5}, ["budget.latency", "5"]),
    ({"latency": -0.2}, ["budget.latency", "-0.2"]),
    ({"latency": "fast"}, ["budget.latency", "'fast'"]),
    ({"latency": 0.5, "uniform": True}, ["budget.uniform", "budget.latency"]),
    ({"latency": 0.5, "batch_size": 0}, ["budget.batch_size", "0"]),
    ({"latency": 0.5, "align": 0}, ["budget.align", "0"]),
    ({"latency": 0.5, "align": {"neurons": 2.5}}, ["budget.align.neurons", "2.5"]),
])
def test_bad_latency_budgets_are_one_line(kwargs, needles) -> None:
    with pytest.raises(ConfigError) as e:
        Budget(**kwargs)
    text = _one_line(e)
    for needle in needles:
        assert needle in text, text


def test_parse() -> None:
    b = Budget.parse("latency=0.6", seq_len=64, batch_size=4)
    assert (b.metric, b.value, b.seq_len, b.batch_size) == ("latency", 0.6, 64, 4)
    assert Budget.parse("latency=1").value == 1.0
    assert b.describe() == "latency=0.6 (batch_size=4, seq_len=64)"
    with pytest.raises(ConfigError) as e:
        Budget.parse("latency=0.5,params=0.5")
    assert "exactly one of" in _one_line(e)


def test_unreachable_and_oversized_alignments_fail_before_selection(clock: FakeClock) -> None:
    model = tiny("bert", BertForSequenceClassification)
    table = lt.measure(model, 1, SEQ, clock=clock, repeats=1, warmup=0)
    vib = vtrans.attach(model)
    g = vib.geometry
    low = table.outside_ms / table.dense_ms  # the cost outside the sub-layers: 1088 / 15424 of the dense model
    with pytest.raises(BudgetError) as e:
        vib.apply_budget(Budget(latency=round(low / 2, 4), seq_len=SEQ), scores=magnitude(model), table=table)
    text = _one_line(e)
    assert f"latency={round(low / 2, 4)}" in text and f"give latency >= {math.ceil(low * 1000) / 1000:g}" in text
    vib.apply_budget(Budget(latency=math.ceil(low * 1000) / 1000, seq_len=SEQ), scores=magnitude(model), table=table)
    with pytest.raises(ConfigError) as e:
        lt.check_reachable(g, Budget(latency=0.5, seq_len=SEQ, align={"neurons": 64}), table)
    assert "budget.align.neurons=64" in _one_line(e) and "48" in str(e.value)
    with pytest.raises(ConfigError) as e:
        lt.check_reachable(g, Budget(latency=0.5, seq_len=SEQ, align={"hidden": 5}), table)
    assert "budget.align.hidden=5" in _one_line(e)
    with pytest.raises(ConfigError) as e:  # select without a table
        vtrans.budget.select(g, magnitude(model), Budget(latency=0.5))
    assert "latency table" in _one_line(e)


def test_soft_prediction_is_differentiable_and_exact_at_integer_counts(clock: FakeClock) -> None:
    model = tiny("bert", BertForSequenceClassification)
    table = lt.measure(model, 1, SEQ, clock=clock, repeats=1, warmup=0)
    keep = vtrans.Keep(H, [3, 0], [7, 48], [1, 0], [1, 1])
    assert float(table.predict_soft(keep)) == table.predict(keep)
    x = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    table.predict_soft(vtrans.Keep(H, [x, 4], [48, 48], [1, 1], [1, 1])).backward()
    assert float(x.grad) == 1000.0 * 4 * H * HEAD_DIM  # the slope of one head


def test_vib_training_to_a_latency_budget(clock: FakeClock, tmp_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    from vtrans.distill import DistillConfig
    from vtrans.train import PruneConfig, Pruner, fit

    monkeypatch.setattr(lt, "default_clock", clock)
    model = tiny("bert", BertForSequenceClassification)
    x = torch.randint(3, 60, (32, SEQ), generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 31).long()

    def batches(step: int) -> dict[str, torch.Tensor]:
        idx = torch.randperm(32, generator=torch.Generator().manual_seed(step))[:8]
        return {"input_ids": x[idx], "attention_mask": torch.ones_like(x[idx]), "labels": y[idx], "sample_id": idx}

    budget = Budget(latency=0.5, seq_len=SEQ)
    pruner = Pruner(model, PruneConfig(method="faster", budget=budget, steps=6, rounds=2, finetune_steps=0,
                                       distill=DistillConfig(logit_weight=0.0)))
    assert pruner.dense_size == pruner.vib.latency_table.dense_ms
    assert 0.0 < float(pruner.expected_fraction().detach()) <= 1.0
    fit(pruner, batches)
    pruner.finish()
    a = pruner.vib.achieved
    assert pruner.vib.budget == budget and a["predicted_ms"] <= a["target_ms"]

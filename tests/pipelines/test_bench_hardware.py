"""The hardware-aware budget benchmark (pipelines.bench.hardware) on a tiny BERT: every (metric, budget, alignment)
row exact against the selection it made, with a fake clock for the latency table and FLOPs for the timings (so
speedup ÷ FLOPs reduction is exactly 1); the comparison at equal latency by hand; bad lists name the flag."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForSequenceClassification

import vtrans
from pipelines.bench import hardware
from tests.tiny import tiny
from tests.vtrans.test_latency_table import SEQ, FakeClock
from vtrans import latency_table as lt
from vtrans.errors import ConfigError


def _batches() -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 60, (4, SEQ), generator=gen)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}]


def test_rows_are_what_each_selection_made() -> None:
    clock = FakeClock()
    handle = torch.nn.modules.module.register_module_forward_hook(clock.hook)
    try:
        table = lt.measure(tiny("bert", BertForSequenceClassification), 1, SEQ, clock=clock, repeats=1, warmup=0)
    finally:
        handle.remove()

    def fresh():
        return tiny("bert", BertForSequenceClassification)

    def flops_ms(model) -> float:  # a "latency" proportional to the FLOPs
        return vtrans.count(model, seq_len=SEQ).flops_total / 1e6

    ids = _batches()[0]["input_ids"]

    def quality(model) -> float:
        with torch.no_grad():
            return float(model(input_ids=ids).logits.softmax(-1)[:, 1].mean())

    dense = vtrans.count(fresh(), seq_len=SEQ)
    budgets, aligns = [0.8, 0.5], [1, 8]
    rows = hardware.prune_rows(fresh, _batches(), quality, table, budgets, aligns, flops_ms, batch_size=1,
                               seq_len=SEQ, tolerance=0.05, dense_ms=lambda: flops_ms(fresh()), log=lambda _: None)
    assert [(r["metric"], r["budget"], r["align"]) for r in rows] == [
        (m, b, a) for m in ("params", "latency") for b in budgets for a in aligns]
    dense_ms = flops_ms(fresh())
    for r in rows:
        assert "error" not in r, r
        assert r["speedup_per_flops"] == pytest.approx(1.0)  # the timing is the FLOPs
        assert r["dense_ms"] == dense_ms and r["speedup"] == pytest.approx(dense_ms / r["measured_ms"])
        assert r["params_fraction"] == pytest.approx(r["params_blocks"] / dense.params_blocks)
        assert r["neurons"] % r["align"] == 0 and r["hidden"] == 32  # Kwon keeps the hidden size whole
        if r["metric"] == "params":
            assert r["params_fraction"] <= r["budget"]
            if r["align"] == 1:
                assert r["params_fraction"] >= 0.95 * r["budget"]
        else:  # the table's prediction meets the target the selection searched for
            assert r["predicted_ms"] <= r["budget"] * table.dense_ms + 1e-9
            assert r["target_ms"] == pytest.approx(r["budget"] * dense_ms)
            assert r["measured_of_target"] == pytest.approx(r["measured_ms"] / r["target_ms"])
    # a smaller budget keeps less
    p = {(r["budget"], r["align"]): r["params_blocks"] for r in rows if r["metric"] == "params"}
    assert p[(0.5, 1)] < p[(0.8, 1)]
    md = hardware.render({"metric": "accuracy", "model_name": "tiny", "command": "cmd", "machine": "m",
                          "date": "d", "batch_size": 1, "seq_len": SEQ, "threads": 1, "repeats": 1,
                          "dense_quality": 0.5, "dense_ms": 1.0, "dense_end_ms": 1.0, "dense_predicted_ms": 1.0,
                          "rows": rows, "equal_latency": hardware.at_equal_latency(rows)})  # 3 tables
    assert md.count("\n| 0.8 | 8 |") == 3 and "#### Latency budget against parameter budget at equal" in md


def test_quality_at_equal_speedup_interpolates_the_parameter_rows_of_the_same_alignment() -> None:
    rows = [{"metric": "params", "budget": 0.7, "align": 1, "speedup": 1.2, "quality": 0.80},
            {"metric": "params", "budget": 0.5, "align": 1, "speedup": 1.6, "quality": 0.70},
            {"metric": "params", "budget": 0.5, "align": 8, "speedup": 1.7, "quality": 0.10},
            {"metric": "latency", "budget": 0.6, "align": 1, "speedup": 1.3, "quality": 0.79},
            {"metric": "latency", "budget": 0.3, "align": 1, "speedup": 3.0, "quality": 0.60},
            {"metric": "latency", "budget": 0.2, "align": 8, "error": "below the smallest"}]
    eq = hardware.at_equal_latency(rows)
    assert [(e["budget"], e["align"]) for e in eq] == [(0.6, 1), (0.3, 1)]
    assert eq[0]["quality_params_budget"] == pytest.approx(0.775) and eq[0]["quality_latency_budget"] == 0.79
    assert eq[1]["quality_params_budget"] is None  # faster than every parameter-budget row: nothing to compare
    assert hardware.interpolate([(1.0, 2.0)], 1.0) == 2.0


@pytest.mark.parametrize(("fn", "text", "key"), [(hardware._fraction_list, "0.7,1.5", "--budgets"),
                                                 (hardware._fraction_list, "half", "--budgets"),
                                                 (hardware._int_list, "1,0", "--aligns"),
                                                 (hardware._int_list, "8,x", "--aligns")])
def test_bad_lists_name_the_flag(fn, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}={text!r} must be comma-separated"):
        fn(text, key)


@pytest.mark.parametrize(("argv", "message"), [
    (["--threads", "0"], "--threads must be an int >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be an int >= 0, got -1"),
    (["--device", "tpu"], "--device must be one of ['cpu', 'cuda'], got 'tpu'"),
    (["--budgets", "0.5,2"], "--budgets='0.5,2' must be comma-separated fractions in (0, 1)")])
def test_bad_flags_are_one_line_before_any_work(argv: list[str], message: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        hardware.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith(f"error: {message}") and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing prepared

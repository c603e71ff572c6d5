"""Latency budgets in the pipeline: ``prune.budget.latency`` loads with the evaluation's batch / sequence length,
refusals are one line, stage keys of other budgets do not change, the evaluate stage reports predicted against
measured latency, and a sweep over latency budgets validates with its front on measured latency. No Ray, no MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import pipelines
from pipelines.config import load_config
from pipelines.stages import evaluate, prune
from pipelines.sweep import load_sweep
from vtrans.errors import ConfigError

MINILM = Path(pipelines.__file__).parent / "configs" / "minilm-rotten-tomatoes.yaml"
ONE = "ray.num_workers=1"


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_latency_budget_follows_the_evaluations_first_point() -> None:
    cfg = load_config(MINILM, ["prune.budget.latency=0.6", ONE, "evaluate.latency_batch_sizes=[4, 32]",
                               "evaluate.latency_seq_lens=[64]"])
    b = cfg.prune.budget
    assert (b.metric, b.value, b.batch_size, b.seq_len, b.params) == ("latency", 0.6, 4, 64, None)  # params dropped
    own = load_config(MINILM, ["prune.budget.latency=0.6", ONE, "prune.budget.batch_size=2",
                               "prune.budget.seq_len=32"]).prune.budget
    assert (own.batch_size, own.seq_len) == (2, 32)
    assert evaluate.grid(load_config(MINILM, ["prune.budget.latency=0.6", ONE, "prune.budget.batch_size=2"])) == [
        (1, 128), (32, 128), (2, 128)]  # the budget's point is timed too


@pytest.mark.parametrize(("overrides", "needles"), [
    (["prune.budget.latency=1.5"], ["budget.latency", "(0, 1]", "1.5"]),
    (["prune.budget.latency=0"], ["budget.latency", "0"]),
    (["prune.budget.latency=0.5", "prune.budget.uniform=true"], ["budget.uniform", "budget.latency"]),
    (["prune.budget.latency=0.5", "prune.budget.batch_size=0"], ["budget.batch_size", "0"]),
    (["prune.budget.latency=0.5", "prune.budget.batch_size=5000"], ["prune.budget.batch_size", "4,096", "5000"]),
    (["prune.budget={params: 0.5, latency: 0.5}"], ["exactly one of params, flops or latency", "latency=0.5"]),
    (["prune.budget.latency=0.5", "ray.num_workers=2", "prune.batch_size=16"],
     ["prune.budget.latency=0.5", "ray.num_workers=2"]),
])
def test_bad_latency_budgets_are_one_line(overrides, needles) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(MINILM, [ONE, *overrides])
    text = _one_line(e)
    for needle in needles:
        assert needle in text, text


def test_stage_keys_of_other_budgets_are_unchanged() -> None:
    params = prune.material(load_config(MINILM, [ONE]))["prune"]["budget"]
    assert "latency" not in params and "batch_size" not in params
    latency = prune.material(load_config(MINILM, [ONE, "prune.budget.latency=0.5"]))["prune"]["budget"]
    assert latency["latency"] == 0.5 and latency["batch_size"] == 1
    assert "latency_point" not in evaluate.material(load_config(MINILM, [ONE]))
    assert evaluate.material(load_config(MINILM, [ONE, "prune.budget.latency=0.5"]))["latency_point"] == (1, 128)


def _measurement(ms: float) -> dict:
    counts = {"params_blocks": 10, "params_total": 20, "flops_blocks": 30, "flops_total": 40}
    timing = {"median_ms": ms, "p90_ms": ms, "throughput": 1.0, "tokens_per_s": 1.0, "peak_gpu_mb": None}
    return {"accuracy": 0.8, "counts": {"128": counts}, "latency": {"b1_s128": timing, "b32_s128": timing},
            "peak_rss_mb": 1.0, "peak_rss_over_baseline_mb": 1.0, "model_mb": 1.0}


def test_evaluate_reports_predicted_against_measured_latency() -> None:
    cfg = load_config(MINILM, [ONE, "prune.budget.latency=0.5"])
    comp, dense = _measurement(6.0), _measurement(10.0)
    comp["latency_record"] = {"predicted_ms": 5.0, "target_ms": 5.5, "dense_predicted_ms": 11.0}
    m = evaluate.compare(cfg, dense, comp)
    assert (m["latency_predicted_ms"], m["latency_target_ms"], m["dense_latency_predicted_ms"]) == (5.0, 5.5, 11.0)
    assert (m["latency_measured_ms"], m["dense_latency_measured_ms"]) == (6.0, 10.0)
    assert m["latency_measured_over_predicted"] == 6.0 / 5.0 and m["latency_measured_fraction"] == 0.6
    assert "predicted / measured ms" in evaluate.markdown(cfg, m, "cpu")
    plain = evaluate.compare(load_config(MINILM, [ONE]), _measurement(10.0), _measurement(6.0))
    assert "latency_predicted_ms" not in plain


def test_latency_sweep_validates_with_a_front_on_measured_latency(tmp_path: Path) -> None:
    base = yaml.safe_load(MINILM.read_text())
    base["ray"] = {**base.get("ray", {}), "num_workers": 1}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**base, "sweep": {"space": {"prune.budget.latency": [0.7, 0.5]},
                                                      "reuse_posterior": True}}))
    s = load_sweep(path)
    assert s.objectives(next(iter(s.models))) == [("accuracy", "max"), ("latency_measured_ms", "min"),
                                                  ("params_blocks", "min")]
    label = next(iter(s.models))
    cfg = s.point_config(label, {"prune.budget.latency": 0.7})
    assert cfg.prune.budget.latency == 0.7 and cfg.prune.budget.params is None
    assert cfg.posterior_budget.latency == 0.5 and cfg.posterior_budget.batch_size == cfg.prune.budget.batch_size
    path.write_text(yaml.safe_dump({**base, "sweep": {"space": {"prune.budget.latency": [0.7, 1.5]}}}))
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert "budget.latency" in _one_line(e) and "1.5" in str(e.value)

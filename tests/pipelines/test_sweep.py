"""Sweep configs: the space, the models and the objectives are checked before any trial (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.sweep import load_sweep, max_concurrent
from vtrans.errors import ConfigError

BASE = {
    "model": {"name": "minilm", "task": "seq-cls"},
    "data": {"name": "rotten_tomatoes", "max_length": 32, "max_train_samples": 200},
    "teacher": {"steps": 2, "batch_size": 8},
    "prune": {"method": "faster", "budget": {"params": 0.5}, "steps": 2, "batch_size": 8},
    "finetune": {"steps": 0, "batch_size": 8},
    "ray": {"num_workers": 2},
}


def _write(tmp_path: Path, sweep: dict, **base) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, **base, "sweep": sweep}))
    return path


def test_grid_points_models_and_objectives(tmp_path: Path) -> None:
    path = _write(tmp_path, {"space": {"prune.budget.params": [0.7, 0.5], "prune.vib.kl_weight": [0.01, 0.1]},
                             "models": {"a": {}, "b": {"prune.method": "fast"}}})
    s = load_sweep(path)
    assert len(s.grid_points()) == 4 and list(s.models) == ["a", "b"]
    cfg = s.point_config("b", {"prune.budget.params": 0.5, "prune.vib.kl_weight": 0.1})
    assert (cfg.prune.method, cfg.prune.budget.value, cfg.prune.vib.kl_weight) == ("fast", 0.5, 0.1)
    assert cfg.name == "s-b"
    assert s.objectives("a") == [("accuracy", "max"), ("params_blocks", "min")]
    # overrides reach both the base and the sweep section
    s2 = load_sweep(path, ["prune.steps=5", "sweep.num_samples=3", "sweep.space={prune.budget.params: [0.3]}"])
    assert s2.model_configs["a"].prune.steps == 5 and s2.config.num_samples == 3
    assert s2.config.space["prune.budget.params"] == [0.3] and s2.key != s.key
    assert max_concurrent(s, cluster_cpus=5, cluster_gpus=0) == 2  # two 2-worker jobs fit on 5 CPUs
    assert max_concurrent(s, cluster_cpus=1, cluster_gpus=0) == 1


@pytest.mark.parametrize(("sweep", "needles"), [
    ({"space": {}}, ["sweep.space is empty"]),
    ({"space": {"prune.budget.parms": [0.5]}}, ["sweep.space", "prune.budget.parms", "did you mean"]),
    ({"space": {"prune.budget.params": []}}, ["sweep.space['prune.budget.params'] is an empty list"]),
    ({"space": {"prune.budget.params": [0.5, 1.5]}}, ["prune.budget.params", "1.5"]),
    ({"space": {"prune.budget.params": {"uniform": [0.2, 0.8]}}}, ["distribution", "sweep.search='grid'"]),
    ({"space": {"prune.vib.kl_weight": {"loguniform": [0, 1]}}, "search": "random"}, ["loguniform", "0 < low"]),
    ({"space": {"prune.budget.params": [0.5]}, "models": {"a": {}, "b": {}}}, ["same model twice", "'a'", "'b'"]),
    ({"space": {"prune.budget.params": [0.5]}, "models": {"a": {"model.nam": "x"}}}, ["sweep.models['a']",
                                                                                      "model.nam"]),
    ({"space": {"prune.budget.params": [0.5]}, "objectives": ["perplexity:min", "params_blocks:min"]},
     ["perplexity", "not produced", "seq-cls"]),
    ({"space": {"prune.budget.params": [0.5]}, "objectives": ["accuracy:max", "params_block:min"]},
     ["sweep.objectives[1]='params_block:min'", "not a size the trials", "did you mean 'params_blocks'?"]),
    ({"space": {"prune.budget.params": [0.5]}, "objectives": ["accuracy:max", "latency_ms_b64_s128:min"]},
     ["'latency_ms_b64_s128' is not a size", "did you mean 'latency_ms_b1_s128'?"]),  # b64 is not a timed point
    ({"space": {"prune.budget.params": [0.5]}, "serach": "grid"}, ["sweep.serach", "did you mean 'sweep.search'"]),
    ({"space": {"prune.budget.params": [0.5]}, "num_samples": 0}, ["sweep.num_samples", "0"]),
])
def test_bad_sweeps_fail_before_any_trial(tmp_path: Path, sweep: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, sweep))
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


LM_BASE = {"model": {"name": "smollm2", "task": "causal-lm"}, "data": {"name": "wikipedia", "seq_len": 32},
           "prune": {"method": "faster", "budget": {"params": 0.5}, "steps": 2, "batch_size": 8},
           "finetune": {"steps": 0, "batch_size": 8}, "ray": {"num_workers": 2}}


def test_lm_eval_metrics_are_objectives(tmp_path: Path) -> None:
    """``lm_eval_<task>_<metric>`` of an ``evaluate.lm_eval_tasks`` task is a quality objective; of a task the
    pipeline does not run, or with ASHA (which stops on the fine-tune's own quality), it is refused."""
    sweep = {"space": {"prune.budget.params": [0.5]}, "objectives": ["lm_eval_lambada_local_acc:max",
                                                                     "params_blocks:min"]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, **LM_BASE, "evaluate": {"lm_eval_tasks": ["lambada_local"]},
                                    "sweep": sweep}))
    assert load_sweep(path).objectives(next(iter(load_sweep(path).models))) == [
        ("lm_eval_lambada_local_acc", "max"), ("params_blocks", "min")]
    # a hub task's metrics are known when it runs: any metric of it is accepted
    ok = load_sweep(path, ["evaluate.lm_eval_tasks=[arc_easy]",
                           "sweep.objectives=[lm_eval_arc_easy_acc_norm:max, params_blocks:min]"])
    assert ok.config.objectives[0] == "lm_eval_arc_easy_acc_norm:max"
    with pytest.raises(ConfigError) as e:
        load_sweep(path, ["evaluate.lm_eval_tasks=null"])
    assert "'lm_eval_lambada_local_acc' is not produced" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_sweep(path, ["sweep.objectives=[lm_eval_lambada_local_f1:max, params_blocks:min]"])
    assert "'lm_eval_lambada_local_f1' is not produced" in str(e.value) and "lm_eval_lambada_local_acc" in str(e.value)
    with pytest.raises(ConfigError, match="ASHA stops trials on the fine-tune's held-out 'perplexity'"):
        load_sweep(path, ["sweep.early_stopping=asha", "finetune.steps=8", "finetune.eval_every=2"])


def test_a_pipeline_config_is_not_a_sweep(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="has no sweep: section"):
        load_sweep(path)


def test_shipped_sweep_configs_load() -> None:
    from pipelines.config import read_yaml

    configs = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
    sweeps = [p for p in sorted(configs.glob("*.yaml")) if "sweep" in read_yaml(p)]
    assert [p.name for p in sweeps] == ["sweep-minilm.yaml"]
    s = load_sweep(sweeps[0])
    assert len(s.grid_points()) == 8 and list(s.models) == ["minilm"]
    assert s.model_configs["minilm"].prune.method == "faster"


ASHA_FT = {"steps": 40, "batch_size": 8, "eval_every": 10, "eval_samples": 32}


def test_asha_compares_within_budgets_from_the_first_evaluation(tmp_path: Path) -> None:
    from pipelines.sweep import asha_grace_period, asha_group_keys

    space = {"prune.budget.params": [0.7, 0.3], "prune.vib.kl_weight": [0.01, 0.1]}
    s = load_sweep(_write(tmp_path, {"space": space, "early_stopping": "asha"}, finetune=ASHA_FT))
    assert asha_group_keys(s.config) == ["prune.budget.params"] and asha_grace_period(s, "minilm") == 10
    s = load_sweep(_write(tmp_path, {"space": space, "early_stopping": "asha",
                                     "asha": {"by_budget": False, "grace_period": 20, "reduction_factor": 3}},
                          finetune=ASHA_FT))
    assert asha_group_keys(s.config) == [] and asha_grace_period(s, "minilm") == 20
    assert s.config.asha.reduction_factor == 3


@pytest.mark.parametrize(("sweep", "finetune", "needles"), [
    ({}, {"steps": 0}, ["sweep.early_stopping='asha'", "finetune.steps=0", "finetune.eval_every"]),
    ({}, {"eval_every": 0}, ["model 'minilm'", "finetune.eval_every=0", "set finetune.eval_every (e.g. 10)"]),
    ({}, {"eval_every": 40}, ["first rung (fine-tune step 40)", "finetune.steps=40", "lower finetune.eval_every"]),
    ({"asha": {"grace_period": 50}}, {}, ["first rung (fine-tune step 50)", "lower sweep.asha.grace_period"]),
    ({"asha": {"reduction_factor": 1}}, {}, ["sweep.asha.reduction_factor must be a number > 1, got 1"]),
    ({"asha": {"grace_period": 0}}, {}, ["sweep.asha.grace_period must be an integer >= 1", "got 0"]),
    ({"space": {"prune.budget.params": [0.5], "finetune.steps": [20, 40]}}, {},
     ["may not sweep finetune.steps", "early_stopping='asha'"]),
    ({"space": {"prune.budget.params": {"uniform": [0.2, 0.8]}}, "search": "random"}, {},
     ["sweep.asha.by_budget=true", "'prune.budget.params'", "uniform", "set sweep.asha.by_budget=false"]),
    ({"asha": {"by_budgets": True}}, {}, ["sweep.asha.by_budgets", "did you mean"]),
])
def test_bad_asha_settings_fail_before_any_trial(tmp_path: Path, sweep: dict, finetune: dict,
                                                 needles: list[str]) -> None:
    spec = {"space": {"prune.budget.params": [0.5]}, "early_stopping": "asha", **sweep}
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, spec, finetune={**ASHA_FT, **finetune}))
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_asha_by_budget_accepts_a_choice_of_budgets(tmp_path: Path) -> None:
    s = load_sweep(_write(tmp_path, {"space": {"prune.budget.params": {"choice": [0.3, 0.6]}}, "search": "random",
                                     "num_samples": 4, "early_stopping": "asha"}, finetune=ASHA_FT))
    assert s.config.early_stopping == "asha"


def test_reuse_posterior_trains_at_the_smallest_budget(tmp_path: Path) -> None:
    s = load_sweep(_write(tmp_path, {"space": {"prune.budget.params": [0.7, 0.2, 0.5],
                                               "prune.vib.kl_weight": [0.01, 0.1]}, "reuse_posterior": True},
                          prune={**BASE["prune"], "budget": {"params": 0.5, "seq_len": 64, "tolerance": 0.01}}))
    from pipelines.validate import plan

    configs = {(p["prune.budget.params"], p["prune.vib.kl_weight"]): s.point_config("minilm", p)
               for p in s.grid_points()}
    for (budget, _kl), cfg in configs.items():  # the point's budget, trained at 0.2 with its other settings
        assert cfg.prune.budget.params == budget and cfg.posterior_budget.params == 0.2
        assert (cfg.posterior_budget.seq_len, cfg.posterior_budget.tolerance) == (64, 0.01)
        assert (cfg.posterior is None) == (budget == 0.2)
    # one posterior per KL weight: the 0.2 trial's own prune stage
    for kl in (0.01, 0.1):
        posterior = plan(configs[(0.2, kl)])["prune"]
        assert {plan(configs[(b, kl)].posterior)["prune"] for b in (0.7, 0.5)} == {posterior}
    assert plan(configs[(0.2, 0.01)])["prune"] != plan(configs[(0.2, 0.1)])["prune"]
    # a distribution's low end is the smallest budget
    r = load_sweep(_write(tmp_path, {"space": {"prune.budget.params": {"uniform": [0.3, 0.6]}}, "search": "random",
                                     "reuse_posterior": True}))
    assert r.point_config("minilm", {"prune.budget.params": 0.45}).posterior_budget.params == 0.3


@pytest.mark.parametrize(("sweep", "base", "needles"), [
    ({"space": {"prune.vib.kl_weight": [0.01, 0.1]}}, {}, ["reuse_posterior", "exactly one of", "prune.budget.params"]),
    ({"space": {"prune.budget.params": [0.5, 0.3]}}, {"posterior_budget": {"params": 0.2}},
     ["posterior_budget", "contradicts sweep.reuse_posterior"]),
])
def test_bad_reuse_posterior_fails_before_any_trial(tmp_path: Path, sweep: dict, base: dict,
                                                    needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, {**sweep, "reuse_posterior": True}, **base))
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_asha_settings_change_the_sweep_key_only_when_used(tmp_path: Path) -> None:
    path = _write(tmp_path, {"space": {"prune.budget.params": [0.5, 0.3]}}, finetune=ASHA_FT)
    key = load_sweep(path).key
    assert load_sweep(path, ["sweep.asha.reduction_factor=3"]).key == key
    with_asha = load_sweep(path, ["sweep.early_stopping=asha"]).key
    assert with_asha != key != load_sweep(path, ["sweep.early_stopping=asha", "sweep.asha.reduction_factor=3"]).key

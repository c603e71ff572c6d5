"""A real sweep on local Ray Tune with the embedded MLflow: 2 models x 2 budgets, one MLflow run per
trial under the sweep's parent, one mask training per model re-thresholded for the other budget
(``reuse_posterior``), Pareto tables equal to a recomputation from the trial runs, the Pareto models in the registry
with their aliases, and a registered model consumed in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import BertForSequenceClassification

from pipelines.pareto import Objective, pareto_front
from tests.tiny import tiny

pytestmark = pytest.mark.integration

SWEEP = {
    "name": "tiny-sweep",
    "model": {"name": "tiny-a", "task": "seq-cls"},
    "data": {"name": "rotten_tomatoes", "test_fraction": 0.02, "max_length": 32, "max_train_samples": 64},
    "calibration": {"fraction": 0.5},
    "teacher": {"steps": 0},  # the dense model is the teacher: no Train job before the trials (test_pipeline has one)
    "prune": {"method": "faster", "budget": {"params": 0.5, "seq_len": 32, "tolerance": 0.05}, "steps": 2,
              "batch_size": 8},
    "finetune": {"steps": 0, "batch_size": 8},
    "evaluate": {"latency_batch_sizes": [2], "latency_seq_lens": [32], "latency_repeats": 2, "warmup": 1},
    "ray": {"num_workers": 1},  # trials of two-worker jobs, across two nodes: tests/clusters/test_local_cluster.py
    "tracking": {"experiment": "sweep-test"},
    "sweep": {"models": {"a": {}, "b": {"model.name": "tiny-b"}},
              "space": {"prune.budget.params": [0.6, 0.4]},  # a posterior per KL weight etc.: test_sweep.py
              "reuse_posterior": True},
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    import ray

    from pipelines.sweep import load_sweep
    from pipelines.sweep_runner import run_sweep
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_tokenizer

    d = tmp_path_factory.mktemp("sweep")
    tok = load_tokenizer(resolve_model("minilm"))
    for name, seed in (("tiny-a", 0), ("tiny-b", 1)):
        tiny("bert", BertForSequenceClassification, seed=seed, vocab_size=30522).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    (d / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    old = os.getcwd()
    os.chdir(d)
    try:
        yield d, run_sweep(load_sweep("sweep.yaml"))
    finally:
        os.chdir(old)
        ray.shutdown()


def _client(run):
    from mlflow import MlflowClient

    return MlflowClient(run.tracking_uri)


def test_one_parent_and_one_run_per_trial(swept) -> None:
    _, run = swept
    assert run.errors == 0 and len(run.rows) == 4
    client = _client(run)
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["vtrans.sweep"] == "tiny-sweep"
    assert parent.data.params["sweep.space.prune.budget.params"] == "[0.6, 0.4]"
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'")
    assert len(trials) == 4
    points = {(t.data.params["sweep.model"], t.data.params["prune.budget.params"]) for t in trials}
    assert points == {(m, b) for m in ("a", "b") for b in ("0.6", "0.4")}
    for t in trials:  # every stage inside the one trial run, none in runs of their own
        assert t.info.status == "FINISHED"
        assert {"evaluate.accuracy", "accuracy", "prune.params_blocks_ratio"} <= set(t.data.metrics)
        assert t.data.params["posterior_budget.params"] == "0.4"
        assert not client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{t.info.run_id}'")
        ratio = t.data.metrics["params_blocks_ratio"]
        budget = float(t.data.params["prune.budget.params"])
        assert budget - 0.05 <= ratio <= budget  # tolerance 0.05 of the tiny model


def test_the_trials_of_a_model_compare_against_one_dense_measurement(swept) -> None:
    d, run = swept
    client = _client(run)
    trials = client.search_runs([client.get_run(run.run_id).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{run.run_id}'")
    stages = d / "runs" / "stages" / "evaluate"
    reports = {(t.data.params["sweep.model"], t.data.params["prune.budget.params"]):
               json.loads((stages / t.data.tags["vtrans.key.evaluate"] / "report.json").read_text()) for t in trials}
    dense = sorted(stages.glob("dense/*/dense.json"))
    assert len(dense) == 2  # one per model (one teacher each), not one per trial
    for m in ("a", "b"):
        small, large = reports[(m, "0.4")], reports[(m, "0.6")]
        assert small["dense"] == large["dense"]  # the same timings to the last digit: one measurement
        assert small["compressed"]["latency"] != large["compressed"]["latency"]
        assert small["dense"] in [json.loads(f.read_text()) for f in dense]
    assert reports[("a", "0.4")]["dense"] != reports[("b", "0.4")]["dense"]


def test_one_mask_training_per_model(swept) -> None:
    """reuse_posterior: the 0.4 prune stage of each model is its only mask training; the 0.6 trial
    re-thresholds that posterior. Whichever trial got there first trained it, with its curves in that trial's run."""
    d, run = swept
    client = _client(run)
    trials = client.search_runs([client.get_run(run.run_id).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{run.run_id}'")
    assert len(list((d / "runs" / "stages" / "prune").glob("*/train/output/posterior"))) == 2
    for m in ("a", "b"):
        group = {t.data.params["prune.budget.params"]: t for t in trials if t.data.params["sweep.model"] == m}
        small, large = group["0.4"], group["0.6"]
        trained = [(t.info.run_id, key) for t in (small, large) for key in ("prune.loss", "posterior.loss")
                   if client.get_metric_history(t.info.run_id, key)]
        assert len(trained) == 1, trained  # one training, 2 steps of curves
        trainer, key = trained[0]
        assert len(client.get_metric_history(trainer, key)) == 2
        assert (trainer, key) in ((small.info.run_id, "prune.loss"), (large.info.run_id, "posterior.loss"))
        assert large.data.tags["vtrans.posterior_run_id"] == trainer
        assert large.data.tags["vtrans.key.posterior"] == small.data.tags["vtrans.key.prune"]
        assert "prune.job_wall_s" not in large.data.metrics and large.data.metrics["prune.derive_wall_s"] < 60
        assert "prune.final_expected_size" not in large.data.metrics  # the posterior's, at the small budget


def test_pareto_tables_equal_a_recomputation_from_the_trial_runs(swept) -> None:
    d, run = swept
    client = _client(run)
    trials = client.search_runs([client.get_run(run.run_id).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{run.run_id}'")
    for label in ("a", "b"):
        rows = [{"run_id": t.info.run_id, **t.data.metrics} for t in trials if t.data.params["sweep.model"] == label]
        expected = pareto_front(rows, [Objective("accuracy", "max"), Objective("params_blocks", "min")])
        path = client.download_artifacts(run.run_id, f"pareto/{label}-accuracy-vs-params_blocks.table.json",
                                         str(d / "dl"))
        table = json.loads(Path(path).read_text())
        logged = [dict(zip(table["columns"], row)) for row in table["data"]]
        # the same points; exact duplicates (two trials that kept the same units) may come in either order
        assert sorted(r["run_id"] for r in logged) == sorted(rows[i]["run_id"] for i in expected)
        assert [r["params_blocks"] for r in logged] == [rows[i]["params_blocks"] for i in expected]
        assert [r["accuracy"] for r in logged] == pytest.approx([rows[i]["accuracy"] for i in expected], abs=1e-9)
        names = {a.path for a in client.list_artifacts(run.run_id, "pareto")}
        assert {f"pareto/{label}-accuracy-vs-params_blocks.{ext}" for ext in ("png", "txt")} <= names
        text = Path(client.download_artifacts(run.run_id, f"pareto/{label}-accuracy-vs-params_blocks.txt",
                                              str(d / "dl"))).read_text()
        cells = "".join(line.split("|", 1)[1] for line in text.splitlines() if "|" in line)
        assert 1 <= cells.count("o") <= len(expected) and cells.count("*") == 1  # front points may share a cell


def test_pareto_models_are_registered_with_aliases_and_load_in_a_fresh_process(swept) -> None:
    d, run = swept
    client = _client(run)
    for label in ("a", "b"):
        name = f"{label}-seq-cls-vtrans"
        front = run.fronts[label]["params_blocks"]
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == len(front)
        assert {v.tags["source_run"] for v in versions} == {run.rows[i]["run_id"] for i in front}
        best = client.get_model_version_by_alias(name, "best")
        assert float(best.tags["quality"]) == max(run.rows[i]["accuracy"] for i in front)
        source = next(r for r in run.rows if r["run_id"] == best.tags["source_run"])
        assert int(best.tags["params_blocks"]) == source["params_blocks"]  # exact counts, not rounded
    code = ("import mlflow, sys; m = mlflow.pyfunc.load_model('models:/a-seq-cls-vtrans@best'); "
            "out = m.predict(['a gripping film', 'dull']); print(out.to_json(orient='records'))")
    env = dict(os.environ, MLFLOW_TRACKING_URI=run.tracking_uri)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=d)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out) == 2 and {"label", "score", "probabilities"} <= set(out[0])
    assert out[0]["label"] in ("rotten", "fresh") and abs(sum(out[0]["probabilities"]) - 1) < 1e-5  # class names

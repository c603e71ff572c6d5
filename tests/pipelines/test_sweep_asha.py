"""ASHA early stopping on a real local Ray Tune sweep (tiny Llama on the built-in Wikipedia text, embedded MLflow).

Two budgets x two fine-tune learning rates, one trial at a time (grid order: for each budget, the sane learning rate
first). A learning rate of 1.0 wrecks the model within two Adam steps; ASHA sees its held-out perplexity at the first
rung and stops it, per budget: each stopped trial's run is KILLED and tagged, takes no place on the front, and the
sweep still ends FINISHED. The sane trials run to the end although the 0.3 one competes only with its own budget. One
mask training serves both budgets (``reuse_posterior``): the trials differ in their fine-tunes, which is what ASHA
stops."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.tiny import tiny

pytestmark = pytest.mark.integration

STEPS, EVERY = 8, 2
SWEEP = {
    "name": "asha-sweep",
    "model": {"name": "tinyllama", "task": "causal-lm"},
    "data": {"name": "wikipedia", "test_fraction": 0.15, "seq_len": 32, "max_train_samples": 64,
             "max_test_samples": 24},
    "calibration": {"count": 16},
    "prune": {"method": "faster", "budget": {"params": 0.6, "seq_len": 32, "tolerance": 0.05}, "steps": 2,
              "batch_size": 4, "distill": {"cache_teacher": False}},
    "finetune": {"steps": STEPS, "batch_size": 4, "eval_every": EVERY, "eval_samples": 16},
    "evaluate": {"batch_size": 8, "latency_batch_sizes": [2], "latency_seq_lens": [32], "latency_repeats": 2,
                 "warmup": 1},
    "ray": {"num_workers": 1},  # ASHA stops trials, not workers: two workers per job is test_pipeline's (and CI time)
    "tracking": {"experiment": "asha-test"},
    "sweep": {"space": {"prune.budget.params": [0.6, 0.3], "finetune.lr": [1e-4, 1.0]},
              "early_stopping": "asha", "asha": {"reduction_factor": 2}, "max_concurrent_trials": 1,
              "reuse_posterior": True,  # one mask training for both budgets: the fine-tunes are what ASHA stops
              "registry": {"register": False}},
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    import ray
    from transformers import LlamaForCausalLM

    from pipelines.sweep import load_sweep
    from pipelines.sweep_runner import run_sweep
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_tokenizer

    d = tmp_path_factory.mktemp("asha")
    tiny("llama", LlamaForCausalLM, vocab_size=49152).save_pretrained(d / "tinyllama")
    load_tokenizer(resolve_model("smollm2")).save_pretrained(d / "tinyllama")
    (d / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    old = os.getcwd()
    os.chdir(d)
    try:
        yield d, run_sweep(load_sweep("sweep.yaml"))
    finally:
        os.chdir(old)
        ray.shutdown()


def _trials(run) -> dict[tuple[str, str], object]:
    from mlflow import MlflowClient

    client = MlflowClient(run.tracking_uri)
    runs = client.search_runs([run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'")
    return {(r.data.params["prune.budget.params"], r.data.params["finetune.lr"]): r for r in runs}


def test_asha_stops_the_wrecked_trials_of_each_budget(swept) -> None:
    from mlflow import MlflowClient

    _, run = swept
    client = MlflowClient(run.tracking_uri)
    trials = _trials(run)
    assert len(trials) == 4 and run.errors == 0 and run.stopped == 2
    order = sorted(trials, key=lambda k: trials[k].info.start_time)
    assert order == [("0.6", "0.0001"), ("0.6", "1.0"), ("0.3", "0.0001"), ("0.3", "1.0")]
    for budget in ("0.6", "0.3"):
        good, bad = trials[(budget, "0.0001")], trials[(budget, "1.0")]
        # the sane trial: every held-out evaluation, evaluated, on the front
        assert good.info.status == "FINISHED" and "vtrans.early_stopped" not in good.data.tags
        steps = [m.step for m in client.get_metric_history(good.info.run_id, "finetune.val_perplexity")]
        assert steps == [1, 3, 5, 7]  # logged at the 0-based step of fine-tune steps 2, 4, 6, 8
        assert good.data.metrics["finetune.final_val_perplexity"] > 1 and "perplexity" in good.data.metrics
        # the wrecked one: stopped at the first rung, no evaluation
        assert bad.info.status == "KILLED" and bad.data.tags["vtrans.early_stopped"] == f"fine-tune step {EVERY}"
        curve = client.get_metric_history(bad.info.run_id, "finetune.val_perplexity")
        # its job may get one more evaluation in while Tune stops the trial, never all four
        assert [m.step for m in curve][:1] == [EVERY - 1] and len(curve) < STEPS // EVERY
        first_good = client.get_metric_history(good.info.run_id, "finetune.val_perplexity")[0].value
        assert curve[0].value > first_good
        assert "perplexity" not in bad.data.metrics
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["trials"], parent.data.metrics["stopped_trials"]) == (2, 2)
    assert sorted(r["finetune.lr"] for r in run.rows) == [1e-4, 1e-4]


def test_finished_trials_record_their_node(swept) -> None:
    import ray

    _, run = swept
    trials = _trials(run)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    for key in (("0.6", "0.0001"), ("0.3", "0.0001")):
        nodes = trials[key].data.tags["vtrans.nodes"].split(",")
        assert len(nodes) == 1 and len(nodes[0]) == 56  # one local node (a 28-byte hex id)
        if node is not None:
            assert nodes == [node]

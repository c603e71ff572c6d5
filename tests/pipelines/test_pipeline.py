"""The whole pipeline on a real local Ray with the embedded MLflow store: every stage, MLflow queried back, the logged
model reloaded, re-runs that skip finished stages.

A tiny BERT (built from a config, with MiniLM's real tokenizer) on 300 real Rotten Tomatoes snippets written to a csv
with string labels, so the local-file source, label mapping, stratified calibration, both Ray Train jobs, the
evaluation processes and the pyfunc model all run for real in about two minutes.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import BertForSequenceClassification

from pipelines.config import flatten, load_config
from pipelines.stages import NAMES
from pipelines.tracking import global_tracking_uri
from tests.tiny import tiny

pytestmark = pytest.mark.integration

STEPS = 4

CONFIG = f"""
model: {{name: tinybert, task: seq-cls}}
data: {{files: [reviews.csv], text_column: review, label_column: verdict, test_fraction: 0.2, max_length: 32}}
calibration: {{fraction: 0.25, stratified: true}}
teacher: {{steps: {STEPS}, batch_size: 8, lr: 1.0e-3}}
prune:
  method: faster
  budget: {{params: 0.5, seq_len: 32, tolerance: 0.05}}
  steps: {STEPS}
  batch_size: 8
finetune: {{steps: {STEPS}, batch_size: 8}}
evaluate: {{latency_batch_sizes: [1, 4], latency_seq_lens: [32], latency_repeats: 3, warmup: 1}}
ray: {{num_workers: 2}}
tracking: {{experiment: pipeline-test}}
"""



def one_worker_no_teacher(config: str) -> str:
    """CONFIG for the fault tests (a killed driver, a dead store): one Train worker and the dense model as teacher;
    what they check is the driver's and the store's side, and each Train job of two workers costs CI a minute."""
    out = config.replace("ray: {num_workers: 2}", "ray: {num_workers: 1}").replace(
        "teacher: {steps: " + str(STEPS), "teacher: {steps: 0")
    assert out.count("num_workers: 1") == 1 and "teacher: {steps: 0," in out
    return out

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory holding the tiny model, the csv and the config; the embedded MLflow store lands here."""
    import ray

    from vtrans.assets import load_rotten_tomatoes, resolve_model
    from vtrans.checkpoint import load_tokenizer

    d = tmp_path_factory.mktemp("pipeline")
    model = tiny("bert", BertForSequenceClassification, vocab_size=30522, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    model.save_pretrained(d / "tinybert")
    load_tokenizer(resolve_model("minilm")).save_pretrained(d / "tinybert")
    rows = load_rotten_tomatoes()
    picked = [r for r in rows if r["label"] == 1][:180] + [r for r in rows if r["label"] == 0][:120]
    with open(d / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "verdict"])
        w.writerows([(r["text"], "fresh" if r["label"] else "rotten") for r in picked])
    (d / "tiny.yaml").write_text(CONFIG)
    old = os.getcwd()
    os.chdir(d)
    try:
        yield d
    finally:
        os.chdir(old)
        ray.shutdown()


@pytest.fixture(scope="module")
def first(workdir):
    from pipelines.dag import run_pipeline

    cfg = load_config("tiny.yaml")
    return cfg, run_pipeline(cfg)


def _client():
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{Path.cwd() / 'mlflow.db'}")


def _children(client, parent):
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags["vtrans.stage"]: r for r in runs}


def test_every_stage_runs_and_meets_the_budget(first) -> None:
    cfg, run = first
    assert list(run.results) == list(NAMES)
    assert {r.status for r in run.results.values()} == {"ran"}
    cal = run.results["calibrate"]
    # 300 rows, 20% stratified test (60: 36 fresh + 24 rotten), calibration 25% of the 240 training rows
    assert (cal.metrics["train_samples"], cal.metrics["test_samples"], cal.metrics["calibration_samples"]) == \
        (240, 60, 60)
    assert cal.info["label_names"] == ["fresh", "rotten"] and cal.info["num_labels"] == 2
    m = run.metrics
    assert 0.45 <= m["params_blocks_ratio"] <= 0.5  # budget params=0.5 with tolerance 0.05
    assert m["params_blocks"] < m["dense_params_blocks"] and m["flops_total"] < m["dense_flops_total"]
    for key in ("latency_ms_b1_s32", "latency_ms_b4_s32", "speedup_b4_s32", "speedup_per_flops_reduction_b1_s32",
                "peak_rss_mb", "dense_peak_rss_mb"):
        assert m[key] > 0, key
    assert m["speedup_per_flops_reduction_b1_s32"] == pytest.approx(
        m["speedup_b1_s32"] / m["flops_reduction_s32"])
    assert run.tracking_uri == f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    summary = json.loads(Path(run.summary_path).read_text())
    assert summary["run_id"] == run.run_id and summary["stages"]["prune"]["status"] == "ran"


def test_mlflow_holds_parent_children_curves_and_artifacts(first) -> None:
    cfg, run = first
    client = _client()
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    assert parent.data.params == flatten(cfg)  # the flattened config, every key
    assert parent.data.metrics["accuracy"] == pytest.approx(run.metrics["accuracy"])
    assert {a.path for a in client.list_artifacts(run.run_id)} >= {"config.yaml", "summary.json", "evaluation"}

    children = _children(client, run.run_id)
    assert set(children) == set(NAMES)
    assert all(c.info.status == "FINISHED" and c.data.tags["vtrans.status"] == "ran" for c in children.values())
    prune = children["prune"]
    assert prune.data.params["key"] == run.results["prune"].key
    assert prune.data.params["material.prune.budget.params"] == "0.5"
    for curve in ("loss", "kl", "expected_size", "lambda1", "lambda2", "lr_masks"):
        history = client.get_metric_history(prune.info.run_id, curve)
        assert [h.step for h in sorted(history, key=lambda h: h.step)] == list(range(STEPS)), curve
    assert len(client.get_metric_history(children["teacher"].info.run_id, "loss")) == STEPS
    artifacts = {a.path for a in client.list_artifacts(prune.info.run_id, "layers")}
    assert artifacts == {"layers/compression.json", "layers/layers.png"}
    assert [a.path for a in client.list_artifacts(prune.info.run_id, "masks")] == ["masks/masks.safetensors"]
    layers = json.loads(client.download_artifacts(prune.info.run_id, "layers/compression.json")
                        and Path(client.download_artifacts(prune.info.run_id, "layers/compression.json")).read_text())
    assert layers["compressed"]["params_blocks"] == run.metrics["params_blocks"]
    ev = children["evaluate"]
    assert ev.data.tags["vtrans.model_uri"] == run.model_uri
    assert {a.path for a in client.list_artifacts(ev.info.run_id, "evaluation")} == \
        {"evaluation/report.json", "evaluation/report.md"}

    # the UI's model-training view: the experiment kind, the data sets as inputs, the model as an output of the
    # pipeline's run (issue 18)
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    for run_id in (run.run_id, children["calibrate"].info.run_id):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        got = {i.dataset.name: ({t.key: t.value for t in i.tags}["mlflow.data.context"],
                                json.loads(i.dataset.profile)["num_rows"]) for i in inputs}
        assert got == {"reviews-train": ("training", 240), "reviews-test": ("testing", 60),
                       "reviews-calibration": ("calibration", 60)}, got
    outputs = client.get_run(run.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [run.model_uri.removeprefix("models:/")]


def test_logged_model_reloads_and_matches_the_evaluation(first) -> None:
    import mlflow
    from transformers import AutoModelForSequenceClassification

    from pipelines.stages.calibrate import TokenizedDataset
    from vtrans.checkpoint import load_pretrained
    from vtrans.data import collate

    cfg, run = first
    with global_tracking_uri(run.tracking_uri):
        model = mlflow.pyfunc.load_model(run.model_uri)
    test = TokenizedDataset(run.results["calibrate"].outputs["test"], "seq-cls")
    pred = model.predict(pd.DataFrame({"text": test.texts}), params={"max_length": cfg.data.max_length})
    names = run.results["calibrate"].info["label_names"]  # the predictions carry the data's class names
    assert set(pred["label"]) <= set(names)
    acc = sum(int(p == names[y]) for p, y in zip(pred["label"].tolist(), test.labels.tolist())) / len(test)
    assert acc == pytest.approx(run.metrics["accuracy"], abs=1e-9)

    # the artifact is a Hugging Face checkpoint plain transformers loads after `import vtrans` (no flag), equal to the
    # pipeline's output
    checkpoint = model.get_raw_model().checkpoint
    hf = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    ours = load_pretrained(run.results["finetune"].outputs["model"]).eval()
    batch = collate([test[i] for i in range(8)], pad_token_id=0)
    with torch.no_grad():
        a = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b)
    assert sum(p.numel() for p in hf.parameters()) == run.metrics["params_total"]


def test_rerun_skips_every_stage(first) -> None:
    from pipelines.dag import run_pipeline
    from pipelines.stages.base import RECORD

    cfg, run = first
    records = {n: json.loads((Path(r.dir) / RECORD).read_text()) for n, r in run.results.items()}
    again = run_pipeline(load_config("tiny.yaml"))
    assert {n: r.status for n, r in again.results.items()} == dict.fromkeys(NAMES, "cached")
    for name, r in again.results.items():  # nothing was written again: same records, same finish times
        assert json.loads((Path(r.dir) / RECORD).read_text()) == records[name]
        assert r.finished_at == run.results[name].finished_at
    assert again.metrics == run.metrics and again.model_uri == run.model_uri
    children = _children(_client(), again.run_id)
    assert {n: c.data.tags["vtrans.status"] for n, c in children.items()} == dict.fromkeys(NAMES, "cached")
    assert {n: c.data.tags["vtrans.source_run_id"] for n, c in children.items()} == \
        {n: r.run_id for n, r in run.results.items()}


def test_from_stage_reruns_that_stage_and_the_later_ones(first) -> None:
    from pipelines.dag import run_pipeline

    cfg, run = first
    again = run_pipeline(load_config("tiny.yaml"), from_stage="finetune")
    assert {n: r.status for n, r in again.results.items()} == {
        "calibrate": "cached", "teacher": "cached", "prune": "cached", "finetune": "ran", "evaluate": "ran"}
    assert again.results["finetune"].finished_at > run.results["finetune"].finished_at
    # the same inputs and seeds train the same model again
    assert again.metrics["accuracy"] == pytest.approx(run.metrics["accuracy"])
    assert again.metrics["params_total"] == run.metrics["params_total"]


DECODER = """
name: tiny-lm
model: {name: tinyllama, task: causal-lm}
data: {name: wikipedia, test_fraction: 0.15, seq_len: 32, max_train_samples: 64, max_test_samples: 40}
calibration: {count: 16}
prune:
  method: faster
  budget: {params: 0.6, seq_len: 32, tolerance: 0.05}
  steps: 3
  batch_size: 4
  distill: {cache_teacher: false}
finetune: {steps: 0, batch_size: 4}
evaluate: {batch_size: 8, latency_batch_sizes: [2], latency_seq_lens: [32], latency_repeats: 2, warmup: 1,
           lm_eval_tasks: [lambada_local], lm_eval_limit: 8}
ray: {num_workers: 2}
tracking: {experiment: pipeline-test}
"""


def test_decoder_pipeline_without_teacher_or_finetune(workdir) -> None:
    """A causal LM (tiny Llama, GQA, tied embeddings, SmolLM2's tokenizer) on the built-in Wikipedia text: the dense
    model is its own teacher and the pruned model is not fine-tuned; perplexity of both, the pyfunc generates."""
    import mlflow
    from transformers import LlamaForCausalLM

    from pipelines.dag import run_pipeline
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_tokenizer

    tiny("llama", LlamaForCausalLM, vocab_size=49152).save_pretrained(workdir / "tinyllama")
    load_tokenizer(resolve_model("smollm2")).save_pretrained(workdir / "tinyllama")
    (workdir / "lm.yaml").write_text(DECODER)
    run = run_pipeline(load_config("lm.yaml"))
    assert {n: r.status for n, r in run.results.items()} == dict.fromkeys(NAMES, "ran")
    assert run.results["teacher"].outputs["model"] == str((workdir / "tinyllama").resolve())
    assert run.results["finetune"].outputs["model"] == run.results["prune"].outputs["compressed"]
    cal = run.results["calibrate"].metrics
    assert (cal["train_samples"], cal["test_samples"], cal["calibration_samples"]) == (64, 40, 16)
    m = run.metrics
    assert m["perplexity"] > 1 and m["dense_perplexity"] > 1
    assert 0.55 <= m["params_blocks_ratio"] <= 0.6
    # lm-eval's lambada_local on both models (the compressed one: vtrans's own classes, handed to HFLM in memory)
    logged = _client().get_run(run.run_id).data.metrics
    for prefix in ("", "dense_"):
        assert logged[f"{prefix}lm_eval_lambada_local_samples"] == 8
        assert 0 <= logged[f"{prefix}lm_eval_lambada_local_acc"] <= 1
        assert logged[f"{prefix}lm_eval_lambada_local_perplexity"] > 1
    assert logged["lm_eval_lambada_local_perplexity"] != logged["dense_lm_eval_lambada_local_perplexity"]
    report = Path(run.results["evaluate"].outputs["report_md"]).read_text()
    assert "| lm_eval_lambada_local_acc |" in report
    with global_tracking_uri(run.tracking_uri):
        out = mlflow.pyfunc.load_model(run.model_uri).predict(["The history of"], params={"max_new_tokens": 3})
    assert list(out.columns) == ["generated_text"] and len(out) == 1


def test_posterior_budget_rethresholds_the_trained_posterior(first) -> None:
    """``posterior_budget`` = the first run's budget: no second mask training; the 70% model is the first run's
    posterior re-thresholded (the same outputs as doing it by hand), then fine-tuned and evaluated as usual - here by
    LoRA (``finetune.method: lora``, the Ray Train job's path): its saved model has the adapters merged, the
    compressed model's class and keys."""
    import vtrans
    from pipelines.dag import run_pipeline
    from pipelines.stages.base import RECORD
    from tests.tiny import input_ids, main_output
    from vtrans.checkpoint import load_pretrained

    cfg, run = first
    source = run.results["prune"]
    record = (Path(source.dir) / RECORD).read_text()
    derived = run_pipeline(load_config("tiny.yaml", [
        "name=tiny-p70", "prune.budget={params: 0.7, seq_len: 32, tolerance: 0.05}",
        "posterior_budget={params: 0.5, seq_len: 32, tolerance: 0.05}", "finetune.method=lora",
        "finetune.lora={rank: 2, alpha: 4}", "finetune.lr=1e-2"]))
    prune = derived.results["prune"]
    assert prune.status == "ran" and prune.key != source.key
    assert prune.info["posterior"]["key"] == source.key and prune.info["posterior"]["run_id"] == source.run_id
    assert (Path(source.dir) / RECORD).read_text() == record  # the posterior was not trained again
    assert 0.665 <= prune.metrics["params_blocks_ratio"] <= 0.7
    # the posterior's training metrics stay the posterior's: its E[size] (0.5) is no miss of this stage's 0.7
    assert "final_expected_size" not in prune.metrics and "final_kl" not in prune.metrics
    assert derived.results["finetune"].status == "ran" and 0.665 <= derived.metrics["params_blocks_ratio"] <= 0.7
    from safetensors import safe_open

    tuned, pruned = (load_pretrained(d) for d in (derived.results["finetune"].outputs["model"],
                                                  prune.outputs["compressed"]))
    assert type(tuned) is type(pruned) and tuned.state_dict().keys() == pruned.state_dict().keys()
    with safe_open(str(Path(derived.results["finetune"].outputs["model"]) / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k]
    frozen = "bert.embeddings.word_embeddings.weight"  # not adapted: as pruned; the adapted projections moved
    assert torch.equal(tuned.state_dict()[frozen], pruned.state_dict()[frozen])
    from vtrans.lora import block_linears

    adapted = [f"{name}.weight" for name in block_linears(pruned)]
    assert adapted and all(not torch.equal(tuned.state_dict()[k], pruned.state_dict()[k]) for k in adapted)

    vib = vtrans.load_posterior(source.outputs["posterior"])
    vib.apply_budget(vtrans.Budget(params=0.7, seq_len=32, tolerance=0.05))
    ids = input_ids()
    with torch.no_grad():
        want = main_output(vtrans.compress(vib)(input_ids=ids))
        got = main_output(load_pretrained(prune.outputs["compressed"])(input_ids=ids))
    assert torch.allclose(got, want, atol=1e-5)
    client = _client()
    runs = client.search_runs([client.get_run(derived.run_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{derived.run_id}'")
    children = {r.info.run_name: r for r in runs}
    assert sorted(children) == sorted([*NAMES, "posterior"])
    posterior = children["posterior"].data.tags  # a cached stage: linked to the run that trained it
    assert (posterior["vtrans.stage"], posterior["vtrans.status"], posterior["vtrans.source_run_id"]) == \
        ("prune", "cached", source.run_id)
    assert children["prune"].data.tags["vtrans.posterior_run_id"] == source.run_id


def test_latency_budget_pipeline(workdir) -> None:
    """``prune.budget.latency``: the VIB trains to the table's expected latency on the worker's device, the prune
    stage records the prediction, the evaluate stage times the budget's point and reports measured against predicted
    (structure only: timing is not asserted)."""
    from pipelines.dag import run_pipeline

    cfg = load_config("tiny.yaml", ["prune.budget.latency=0.6", "ray.num_workers=1", "finetune.steps=0",
                                    "evaluate.latency_batch_sizes=[2]"])
    assert (cfg.prune.budget.batch_size, cfg.prune.budget.seq_len) == (2, 32)
    run = run_pipeline(cfg)
    assert {n: r.status for n, r in run.results.items()}["prune"] == "ran"
    report = json.loads(Path(run.results["prune"].outputs["report"]).read_text())
    assert report["budget"]["metric"] == "latency" and report["latency"]["table_key"]["batch_size"] == 2
    p = run.results["prune"].metrics
    assert p["latency_predicted_ms"] <= report["latency"]["target_ms"]
    m = run.metrics
    assert m["latency_predicted_ms"] == p["latency_predicted_ms"] <= m["latency_target_ms"]
    assert m["latency_measured_ms"] > 0 and m["latency_measured_ms"] == m["latency_ms_b2_s32"]
    print(f"\ntiny BERT latency=0.6: predicted {m['latency_predicted_ms']:.3f} ms, measured "
          f"{m['latency_measured_ms']:.3f} ms (dense {m['dense_latency_predicted_ms']:.3f} predicted, "
          f"{m['dense_latency_measured_ms']:.3f} measured)")

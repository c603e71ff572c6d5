"""The MLflow server dies mid-pipeline: the pipeline finishes with every output on disk and says how to re-log;
once the server is back, `vtrans relog` completes the MLflow side, and a second relog creates nothing.

A real `mlflow server` (SQLite store, served artifacts) on loopback, the tiny pipeline of test_pipeline.py run by
`vtrans run` in a subprocess, the server killed as soon as the calibrate stage has finished. The tracking URI carries a
password (``http://vtrans:PASSWORD@127.0.0.1:PORT``, which MLflow's client sends as basic auth and this server ignores):
it must appear in none of the run's outputs (issue 15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.ray_runtime import free_port
from tests.pipelines.test_pipeline import CONFIG, STEPS, one_worker_no_teacher

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SECRET = "s3cret-0f-the-store"


def _serve(d: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'server.db'}",
                             "--artifacts-destination", str(d / "server-artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=open(d / f"server-{time.time():.0f}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError("mlflow server did not start")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    import csv

    from transformers import BertForSequenceClassification

    from tests.tiny import tiny
    from vtrans.assets import load_rotten_tomatoes, resolve_model
    from vtrans.checkpoint import load_tokenizer

    d = tmp_path_factory.mktemp("outage")
    tiny("bert", BertForSequenceClassification, vocab_size=30522).save_pretrained(d / "tinybert")
    load_tokenizer(resolve_model("minilm")).save_pretrained(d / "tinybert")
    rows = load_rotten_tomatoes()
    picked = [r for r in rows if r["label"] == 1][:180] + [r for r in rows if r["label"] == 0][:120]
    with open(d / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "verdict"])
        w.writerows([(r["text"], "fresh" if r["label"] else "rotten") for r in picked])
    (d / "tiny.yaml").write_text(one_worker_no_teacher(CONFIG).replace("pipeline-test", "outage-test"))
    port = free_port()
    uri = f"http://vtrans:{SECRET}@127.0.0.1:{port}"
    server = _serve(d, port)
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", RAY_ADDRESS="")
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        run = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "tiny.yaml", f"tracking.uri={uri}",
                                "output=runs"], cwd=d, env=env, stdout=open(d / "run.log", "w"),
                               stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not list((d / "runs" / "stages" / "calibrate").glob("*/stage.json")):
            assert run.poll() is None and time.time() < deadline, (d / "run.log").read_text()[-3000:]
            time.sleep(0.5)
        _stop(server)  # the store dies with four stages to go
        assert run.wait(timeout=900) == 0, (d / "run.log").read_text()[-3000:]
        yield d, port, uri
    finally:
        _stop(server)


def test_the_pipeline_finishes_without_its_store_and_keeps_everything(outage) -> None:
    d, port, _ = outage
    log = (d / "run.log").read_text()
    assert "does not answer" in log and f"vtrans relog {d / 'runs' / 'tiny'}" in log
    assert f"MLflow at http://vtrans:***@127.0.0.1:{port} does not answer" in log
    summary = json.loads((d / "runs" / "tiny" / "summary.json").read_text())
    assert summary["logged"] is False and summary["metrics"]["accuracy"] > 0
    # calibrate was logging as the server died (its record was written first), the teacher (the dense model: no job)
    # may have been logged before it went; the later stages found it down
    assert {"prune", "finetune", "evaluate"} <= {n for n, s in summary["stages"].items() if not s["logged"]}
    for stage in ("prune", "finetune"):
        record = json.loads((Path(summary["stages"][stage]["dir"]) / "stage.json").read_text())
        assert record["logged"] is False and record["logging"]["artifacts"]
        assert (Path(summary["stages"][stage]["dir"]) / "train" / "output" / "history.json").is_file()


def test_relog_completes_mlflow_once_the_server_is_back(outage, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mlflow import MlflowClient

    from pipelines.cli import main

    d, port, uri = outage
    server = _serve(d, port)
    try:
        # the recorded URI lost its password: relog asks for it, then takes it from MLFLOW_TRACKING_URI
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["relog", str(d / "runs" / "tiny")]) == 2
        assert "had its credentials redacted" in capsys.readouterr().err
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert main(["relog", str(d / "runs" / "tiny")]) == 0
        summary = json.loads((d / "runs" / "tiny" / "summary.json").read_text())
        assert summary["logged"] is True
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("outage-test")
        parent = client.get_run(summary["run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["vtrans.logged"] == "complete"
        assert parent.data.metrics["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        by_stage = {c.data.tags["vtrans.stage"]: c for c in children}
        assert sorted(by_stage) == sorted(summary["stages"]) and len(children) == 5
        assert all(c.info.status == "FINISHED" for c in children)
        for stage in ("prune", "finetune"):  # the Train curves, each step once
            steps = [m.step for m in client.get_metric_history(by_stage[stage].info.run_id, "loss")]
            assert steps == list(range(STEPS)), (stage, steps)
        model_uri = by_stage["evaluate"].data.tags["vtrans.model_uri"]
        assert client.get_logged_model(model_uri[len("models:/"):]).model_id
        assert {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "evaluation")} >= \
            {"evaluation/report.md", "evaluation/report.json"}
        count = len(client.search_runs([exp.experiment_id]))
        assert main(["relog", str(d / "runs" / "tiny")]) == 0  # idempotent
        assert len(client.search_runs([exp.experiment_id])) == count
        assert SECRET not in capsys.readouterr().out
        for run in client.search_runs([exp.experiment_id]):  # issue 15: no param or tag holds the password
            for key, value in {**run.data.params, **run.data.tags}.items():
                assert SECRET not in value, (run.info.run_name, key)
        assert parent.data.params["tracking.uri"] == f"http://vtrans:***@127.0.0.1:{port}"
    finally:
        _stop(server)


def test_the_password_of_the_tracking_uri_is_in_no_output(outage) -> None:
    """After the run and the relogs: not in the run's log (stdout and stderr, Ray workers' lines included), not in any
    file under the output root or the server's artifacts (MLflow's params and tags: checked by the relog test, while
    its server is up)."""
    d, _, _ = outage
    assert SECRET not in (d / "run.log").read_text()
    files = [p for root in (d / "runs", d / "server-artifacts") for p in root.rglob("*") if p.is_file()]
    assert len(files) > 20
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []

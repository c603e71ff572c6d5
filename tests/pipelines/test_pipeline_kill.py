"""The pipeline driver is killed (SIGKILL, with its local Ray) between stages: running the same command again reuses
every stage that had finished (its stage.json, the same outputs) and computes only the rest."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.pipelines.test_pipeline import CONFIG, one_worker_no_teacher

pytestmark = pytest.mark.integration


def _run(d, name: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS="")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "tiny.yaml", f"name={name}"], cwd=d,
                            env=env, stdout=open(d / f"{name}-{time.time():.0f}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_a_killed_pipeline_resumes_from_its_finished_stages(tmp_path) -> None:
    from transformers import BertForSequenceClassification

    from tests.tiny import tiny
    from vtrans.assets import load_rotten_tomatoes, resolve_model
    from vtrans.checkpoint import load_tokenizer

    d = tmp_path
    tiny("bert", BertForSequenceClassification, vocab_size=30522, hidden_dropout_prob=0.0,
         attention_probs_dropout_prob=0.0).save_pretrained(d / "tinybert")
    load_tokenizer(resolve_model("minilm")).save_pretrained(d / "tinybert")
    rows = load_rotten_tomatoes()
    picked = [r for r in rows if r["label"] == 1][:180] + [r for r in rows if r["label"] == 0][:120]
    with open(d / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "verdict"])
        w.writerows([(r["text"], "fresh" if r["label"] else "rotten") for r in picked])
    (d / "tiny.yaml").write_text(one_worker_no_teacher(CONFIG).replace("pipeline-test", "kill-test"))

    first = _run(d, "killed")
    deadline = time.time() + 600
    while not list((d / "runs" / "stages" / "prune").glob("*/stage.json")):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its local Ray, mid-pipeline
    first.wait(timeout=60)
    records = {p.parent.parent.name: json.loads(p.read_text()) for p in (d / "runs" / "stages").glob("*/*/stage.json")}
    assert {"calibrate", "teacher", "prune"} <= set(records) and "evaluate" not in records

    again = _run(d, "killed")
    assert again.wait(timeout=900) == 0
    console = "".join(p.read_text() for p in d.glob("killed-*.log"))  # both runs' console, without --verbose
    # the progress lines reach the console (prune's own may not have: the kill follows its stage.json at once)
    assert "[teacher] done in" in console
    for chatter in ("LOAD REPORT", "core_worker.cc", "Requesting resources", "mlflow.store.db.utils"):
        assert chatter not in console, chatter  # in <output>/<name>/vtrans.log and Ray's logs only
    assert "Requesting resources" in (d / "runs" / "killed" / "vtrans.log").read_text()
    summary = json.loads((d / "runs" / "killed" / "summary.json").read_text())
    status = {n: s["status"] for n, s in summary["stages"].items()}
    assert {n: status[n] for n in ("calibrate", "teacher", "prune")} == dict.fromkeys(("calibrate", "teacher",
                                                                                       "prune"), "cached")
    assert status["evaluate"] == "ran" and summary["metrics"]["accuracy"] > 0
    for name in ("calibrate", "teacher", "prune"):  # the very outputs of the killed run, not recomputed
        assert summary["stages"][name]["finished_at"] == records[name]["finished_at"]
        assert summary["stages"][name]["key"] == records[name]["key"]

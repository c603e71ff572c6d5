"""Tracking URIs, the MLflow wrapper on a real SQLite store, and the stage record / cache key rules (no Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.dag import rerun_set
from pipelines.stages import NAMES
from pipelines.tracking import Tracker, default_artifact_location, resolve_tracking_uri, ui_hint
from pipelines.validate import plan
from vtrans.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # relative SQLite files and bare paths are made absolute (Ray workers run in another cwd)
    assert resolve_tracking_uri("sqlite:///sub/x.db", cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    assert resolve_tracking_uri("runs/m.db", cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/m.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", cwd=tmp_path) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://mlflow:5000", cwd=tmp_path) == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri(None, cwd=tmp_path) == "http://from-env:5000"
    assert resolve_tracking_uri("sqlite:///a.db", cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/a.db"
    for bad, key in (("file:///x/mlruns", "MLFLOW_TRACKING_URI"), ("ftp://x", "MLFLOW_TRACKING_URI")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", bad)
        with pytest.raises(ConfigError, match=f"{key}.*{bad}"):
            resolve_tracking_uri(None, cwd=tmp_path)
    with pytest.raises(ConfigError, match="tracking.uri.*mlruns"):
        resolve_tracking_uri("./mlruns", cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"tracking.uri must name an SQLite file, got 'sqlite:///:memory:'"):
        resolve_tracking_uri("sqlite:///:memory:", cwd=tmp_path)


def test_artifact_location_and_ui_hint(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert default_artifact_location(uri, None) == (tmp_path / "mlartifacts").as_uri()
    assert default_artifact_location("http://h:5000", None) is None
    assert default_artifact_location(uri, "s3://bucket/x") == "s3://bucket/x"
    assert ui_hint("http://h:5000/", "3", "abc") == "http://h:5000/#/experiments/3/runs/abc"
    assert ui_hint(uri, "3", "abc").startswith(f"mlflow ui --backend-store-uri {uri}")


def test_tracker_on_a_real_sqlite_store(tmp_path: Path) -> None:
    t = Tracker.connect(f"sqlite:///{tmp_path}/mlflow.db", "exp")
    assert Tracker.connect(f"sqlite:///{tmp_path}/mlflow.db", "exp").experiment_id == t.experiment_id
    parent = t.start_run("p", params={f"k{i}": i for i in range(250)})  # more than one log_batch of params
    child = t.start_run("c", parent_run_id=parent, tags={"vtrans.stage": "prune"})
    n = t.log_history(child, [{"step": s, "loss": 1.0 / (s + 1), "note": "x", "flag": True} for s in range(1200)])
    assert n == 1200  # only numbers, not strings or booleans; more than one batch of metrics
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"a": 1}))
    t.log_artifacts(child, f, "files")
    t.end_run(child)
    t.end_run(parent, "FAILED")
    c = t.client
    assert len(c.get_run(parent).data.params) == 250
    assert [m.step for m in c.get_metric_history(child, "loss")] == list(range(1200))
    assert c.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert [a.path for a in c.list_artifacts(child, "files")] == ["files/a.json"]
    assert (c.get_run(child).info.status, c.get_run(parent).info.status) == ("FINISHED", "FAILED")
    assert t.run_exists(child) and not t.run_exists("0" * 32)
    assert not t.model_exists("models:/m-" + "0" * 32) and not t.model_exists(None)


def test_unreachable_server_is_a_config_error() -> None:
    from pipelines.ray_runtime import free_port

    with pytest.raises(ConfigError, match=r"tracking.uri='http://127.0.0.1:\d+': no MLflow server answers there"):
        Tracker.connect(f"http://127.0.0.1:{free_port()}", "exp")


def test_cache_keys_follow_the_config_they_depend_on() -> None:
    cfg = lambda *o: load_config(CONFIGS / "minilm-rotten-tomatoes.yaml", list(o))  # noqa: E731
    base = plan(cfg())
    assert list(base) == list(NAMES) and len(set(base.values())) == len(NAMES)
    assert plan(cfg()) == base  # deterministic
    # names, Ray width and tracking do not change any output
    assert plan(cfg("name=other", "ray.num_workers=1", "tracking.experiment=x")) == base

    def changed(*overrides: str) -> set[str]:
        keys = plan(cfg(*overrides))
        return {n for n in NAMES if keys[n] != base[n]}

    # a stage's key changes with its own section and with every input upstream
    assert changed("prune.budget.params=0.3") == {"prune", "finetune", "evaluate"}
    assert changed("finetune.lr=1.0e-4") == {"finetune", "evaluate"}
    assert changed("evaluate.latency_repeats=5") == {"evaluate"}
    assert changed("teacher.steps=10") == {"teacher", "prune", "finetune", "evaluate"}
    assert changed("calibration.fraction=0.05") == set(NAMES)


def test_rerun_sets() -> None:
    assert rerun_set(False, None) == frozenset()
    assert rerun_set(True, None) == frozenset(NAMES)
    assert rerun_set(False, "prune") == {"prune", "finetune", "evaluate"}
    with pytest.raises(ConfigError, match=r"--from must be one of .*, got 'prunes'; did you mean 'prune'\?"):
        rerun_set(False, "prunes")


def test_what_counts_as_an_unreachable_store() -> None:
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import unreachable

    refused = ConnectionRefusedError(111, "Connection refused")
    wrapped = MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/create failed with exception "
                              "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url")
    assert unreachable(refused) and unreachable(wrapped)
    try:
        try:
            raise refused
        except OSError as e:
            raise RuntimeError("logging failed") from e
    except RuntimeError as chained:
        assert unreachable(chained)
    assert unreachable(MlflowException("API request to /runs/log-batch failed with error code 503 != 200"))
    assert not unreachable(MlflowException("Run 'abc' not found"))  # a request the store refused: a real error
    assert not unreachable(ValueError("bad metric value"))


def test_a_dead_store_is_retried_then_the_tracker_goes_offline(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import socket
    import time

    from pipelines.ray_runtime import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "0", "x", retries=3)
    assert tracker.start_run("r") is None and tracker.offline and not tracker.online
    assert sleeps == [1.0, 2.0, 4.0]  # backoff between the 4 attempts
    out = capsys.readouterr().out
    assert out.count("does not answer") == 1 and "vtrans relog" in out
    connects: list = []  # offline: every later write returns at once, without a connection attempt

    def connect(self, address):
        connects.append(address)
        raise ConnectionRefusedError(address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    tracker.log_metrics("some-run", {"a": 1.0})
    tracker.set_tags("some-run", {"t": "v"})
    tracker.end_run("some-run")
    assert connects == [] and sleeps == [1.0, 2.0, 4.0]
    assert not tracker.run_exists("some-run") and capsys.readouterr().out == ""


def test_a_refused_request_is_raised_not_swallowed(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    tracker = Tracker.connect(f"sqlite:///{tmp_path / 'm.db'}", "e")
    with pytest.raises(MlflowException):
        tracker.log_metrics("0" * 32, {"a": 1.0})  # no such run
    assert tracker.online


@pytest.mark.parametrize("before", [None, "sqlite:////elsewhere/mlflow.db"])
def test_mlflow_global_uri_is_put_back_as_it_was(before: str | None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Logging a model points MLflow's global URI (and, through mlflow.set_tracking_uri, $MLFLOW_TRACKING_URI) at the
    run's store; afterwards both are as before, so a later pipeline in this process with no tracking.uri does not
    log into that store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    from pipelines.tracking import global_tracking_uri

    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    monkeypatch.setattr(utils, "_tracking_uri", None)
    store = f"sqlite:///{tmp_path / 'run.db'}"
    with global_tracking_uri(store):
        assert mlflow.get_tracking_uri() == store and os.environ["MLFLOW_TRACKING_URI"] == store
    assert os.environ.get("MLFLOW_TRACKING_URI") == before and utils._tracking_uri is None

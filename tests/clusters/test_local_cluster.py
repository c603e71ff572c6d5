"""``ray job submit`` for real: clusters/local-cluster.sh starts a two-node Ray cluster with token auth (a 1-CPU head
that holds the job drivers, a 2-CPU worker node) and an MLflow server; a tiny sweep (1 model x 2 budgets, 2 Train
workers per job, so every Train job must use the worker node) is submitted with clusters/runtime_env.yaml and the
checkout as working_dir; its parent run, trial runs, Pareto artifacts and registered versions are read back from the
MLflow server, and each trial's ``vtrans.nodes`` tag shows where its work ran. ``down`` always runs, also on failure,
and must leave no process of the cluster behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "clusters" / "local-cluster.sh"
BIN = Path(sys.executable).parent

SWEEP = {
    "name": "cluster-sweep",
    "model": {"name": "tiny-a", "task": "seq-cls"},  # made absolute below: the job runs in an uploaded copy
    "data": {"name": "rotten_tomatoes", "test_fraction": 0.02, "max_length": 32, "max_train_samples": 64},
    "calibration": {"fraction": 0.5},
    "teacher": {"steps": 0},  # the dense model is the teacher: the prune jobs are what must span both nodes
    "prune": {"method": "faster", "budget": {"params": 0.5, "seq_len": 32, "tolerance": 0.05}, "steps": 2,
              "batch_size": 8},
    "finetune": {"steps": 0, "batch_size": 8},
    "evaluate": {"latency_batch_sizes": [2], "latency_seq_lens": [32], "latency_repeats": 2, "warmup": 1},
    "ray": {"num_workers": 2},
    "tracking": {"experiment": "cluster-sweep"},
    "sweep": {"models": {"a": {}}, "space": {"prune.budget.params": [0.6, 0.4]}},
}


def _cli(*args: str, state_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args, "--state-dir", str(state_dir)], capture_output=True, text=True,
                          timeout=timeout)


def _exports(text: str) -> dict[str, str]:
    return dict(line[len("export "):].split("=", 1) for line in text.splitlines() if line.startswith("export "))


def _marked(state_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("VTRANS_LOCAL_CLUSTER") == str(state_dir):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(state, environment of a shell that ran ``eval "$(local-cluster.sh env)"``); ``down`` whatever happens."""
    state_dir = tmp_path_factory.mktemp("cluster")
    ray_tmp = None
    try:
        up = _cli("up", state_dir=state_dir)
        assert up.returncode == 0, up.stderr[-3000:]
        state = json.loads((state_dir / "cluster.json").read_text())
        ray_tmp = state["ray_temp_dir"]  # the nodes' Ray session logs: down keeps them, the next up replaces them
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(_exports(up.stdout), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        yield state, env
    finally:
        _cli("down", state_dir=state_dir, timeout=120)
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _api(state: dict, path: str):
    token = Path(state["token_path"]).read_text().strip()
    req = urllib.request.Request(state["dashboard_url"] + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_up_starts_two_token_auth_nodes_and_an_mlflow_server(cluster) -> None:
    from ray._common.utils import get_ray_address_file

    state, env = cluster
    assert {n: (v["cpus"], v["resource"]) for n, v in state["nodes"].items()} == {
        "head": (1, "vtrans-driver"), "worker-1": (2, "vtrans-worker-1")}
    assert env["RAY_ADDRESS"] == state["gcs_address"] and env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
    assert oct(Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777) == "0o600"
    status = _cli("status", state_dir=Path(state["state_dir"]))
    assert status.returncode == 0 and status.stdout.count("ALIVE") == 2 and "healthy" in status.stdout, status.stdout
    with urllib.request.urlopen(f"{state['mlflow_uri']}/health", timeout=5) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError, match="401"):  # the job server wants the token
        urllib.request.urlopen(f"{state['dashboard_url']}/api/jobs/", timeout=5)
    # a plain ray.init() on this machine does not find this cluster
    default = Path(get_ray_address_file(None))
    assert not default.exists() or default.read_text().strip() != state["gcs_address"]


def _init_ray(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    code = ("import json, time, ray\nfrom pipelines.ray_runtime import init_ray\nt = time.monotonic()\n"
            "try:\n    init_ray()\nexcept Exception as e:\n"
            "    print(f'{time.monotonic() - t:.2f}', type(e).__name__, e)\n    raise SystemExit(1)\n"
            "print(json.dumps(ray.cluster_resources()))")
    return subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_init_ray_joins_with_the_clusters_token_and_refuses_a_wrong_one(cluster) -> None:
    state, env = cluster
    ok = _init_ray(env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    resources = json.loads(ok.stdout.strip().splitlines()[-1])
    assert resources["CPU"] == 3 and resources["vtrans-driver"] == 4 and resources["vtrans-worker-1"] == 1
    address = state["gcs_address"]
    for extra, why in (({"RAY_AUTH_TOKEN": "0" * 64}, "refused the token from RAY_AUTH_TOKEN;"),
                       ({"RAY_AUTH_MODE": "disabled"}, "requires token authentication")):
        bad = _init_ray(env, **extra)
        assert bad.returncode == 1
        seconds, kind, message = bad.stdout.strip().splitlines()[-1].split(" ", 2)
        assert kind == "ConfigError" and message.startswith(f"RAY_ADDRESS={address!r}: ") and why in message
        assert float(seconds) < 5  # ray.init alone retries ~20 s, then says "Failed to connect"


def test_a_sweep_submitted_as_a_job_runs_on_both_nodes_and_logs_to_the_server(cluster, tmp_path_factory) -> None:
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from transformers import BertForSequenceClassification

    from tests.tiny import tiny
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_tokenizer

    state, env = cluster
    d = tmp_path_factory.mktemp("job")
    tiny("bert", BertForSequenceClassification, seed=0, vocab_size=30522).save_pretrained(d / "tiny-a")
    load_tokenizer(resolve_model("minilm")).save_pretrained(d / "tiny-a")
    (d / "sweep.yaml").write_text(yaml.safe_dump({**SWEEP, "model": {**SWEEP["model"], "name": str(d / "tiny-a")}}))
    sid = f"vtrans-test-{int(time.time())}"
    t0 = time.time()
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--submission-id", sid, "--working-dir", str(REPO), "--runtime-env",
         str(REPO / "clusters" / "runtime_env.yaml"), "--entrypoint-resources", '{"vtrans-driver": 1}', "--",
         "python", "-m", "pipelines.cli", "sweep", str(d / "sweep.yaml"), f"output={d / 'runs'}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    job = _api(state, f"/api/jobs/{sid}")
    logs = submit.stdout[-6000:] + submit.stderr[-2000:]
    assert job["status"] == "SUCCEEDED", logs
    print(f"job {sid}: {time.time() - t0:.0f} s")
    head, worker = state["nodes"]["head"]["node_id"], state["nodes"]["worker-1"]["node_id"]
    assert job["driver_node_id"] == head  # pinned by the entrypoint resource

    # the runs are on the cluster's server: ${MLFLOW_TRACKING_URI} of runtime_env.yaml, expanded on the head
    client = MlflowClient(state["mlflow_uri"])
    exp = client.get_experiment_by_name("cluster-sweep")
    parents = client.search_runs([exp.experiment_id], "tags.`vtrans.sweep` = 'cluster-sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", logs
    parent = parents[0]
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")  # stored by the server, not a local path
    trials = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(t.data.params["prune.budget.params"] for t in trials) == ["0.4", "0.6"]
    assert all(t.info.status == "FINISHED" and "accuracy" in t.data.metrics for t in trials)

    names = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    stem = "pareto/a-accuracy-vs-params_blocks"
    assert {f"{stem}.json", f"{stem}.png", f"{stem}.txt", f"{stem}.table.json"} <= names, names

    versions = client.search_model_versions("name = 'a-seq-cls-vtrans'")
    on_front = {v.tags["source_run"] for v in versions}
    assert versions and on_front <= {t.info.run_id for t in trials}
    best = client.get_model_version_by_alias("a-seq-cls-vtrans", "best")
    assert best.tags["source_run"] in on_front
    # served by the server from its artifacts destination (models:/...@best would resolve against the default registry)
    uri = client.get_model_version_download_uri("a-seq-cls-vtrans", best.version)
    assert uri.startswith("mlflow-artifacts:/"), uri
    model_dir = Path(download_artifacts(artifact_uri=uri, dst_path=str(d / "dl"), tracking_uri=state["mlflow_uri"]))
    assert (model_dir / "MLmodel").is_file()

    # where the work ran: each trial's driver and the rank-0 workers of its Train jobs
    nodes = [set(t.data.tags["vtrans.nodes"].split(",")) for t in trials]
    assert set().union(*nodes) <= {head, worker}
    assert any(worker in n for n in nodes), nodes  # 2 Train workers x 1 CPU do not fit on the 1-CPU head


def test_down_stops_everything_and_is_safe_to_repeat(cluster) -> None:
    state, _ = cluster
    state_dir = Path(state["state_dir"])
    assert _marked(state_dir)
    t0 = time.time()
    down = _cli("down", state_dir=state_dir, timeout=120)
    assert down.returncode == 0 and "stopped the cluster" in down.stderr, down.stderr
    print(f"down: {time.time() - t0:.0f} s")
    assert not _marked(state_dir)
    for entry in state["processes"]:
        assert not psutil.pid_exists(entry["pid"]) or psutil.Process(entry["pid"]).create_time() != entry["created"]
    for url in (state["dashboard_url"], state["mlflow_uri"]):
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2)
    again = _cli("down", state_dir=state_dir)
    assert again.returncode == 0 and "nothing running" in again.stderr
    assert (state_dir / "mlflow.db").is_file() and not (state_dir / "auth_token").exists()

"""Joining a cluster fails before ``ray.init`` (which alone retries for ~20 s), naming what was tried: nothing at the
address, a dashboard URL instead of the GCS, a token the cluster refuses or no token at all. A fake GCS (a gRPC server
that checks the bearer token as Ray's does) stands in for a cluster; tests/clusters/test_local_cluster.py checks the
same against a real token-auth head."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest

from pipelines import ray_runtime
from pipelines.ray_runtime import GCS_PING, check_cluster, driver_runtime_env, free_port, init_ray
from vtrans.errors import ConfigError

TOKEN = "a" * 64


@pytest.fixture(autouse=True)
def no_ray_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No cluster, token or job of the caller's shell leaks in; ~/.ray/auth_token is a (missing) file of the test."""
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module", autouse=True)
def no_ray_in_this_process() -> None:
    """init_ray is idempotent: with a Ray already up in this process it joins nothing. These tests need none."""
    import ray

    assert not ray.is_initialized(), "a test before this file left Ray initialized in the process"


@pytest.fixture(scope="module")
def fake_gcs():
    """``host:port`` of a gRPC server answering Ray's GetClusterId only with ``authorization: Bearer TOKEN``."""

    def get_cluster_id(request: bytes, context) -> bytes:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing or "
                          "incorrect")
        return b"\n\x1c" + b"0" * 28

    service, method = GCS_PING.strip("/").split("/")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(get_cluster_id)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _raises(match: str, fn, *args, **kw) -> None:
    """``fn`` raises the ConfigError ``match`` before it calls ``ray.init`` (which alone retries for ~20 s)."""
    import ray

    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "init", lambda *a, **k: calls.append((a, k)))
        with pytest.raises(ConfigError, match=match):
            fn(*args, **kw)
    assert calls == []


def test_nothing_at_the_address_is_a_config_error_naming_it() -> None:
    import ray

    port = free_port()
    _raises(rf"ray.address='127.0.0.1:{port}': nothing answers at 127.0.0.1:{port} \(Connection refused\)",
            init_ray, f"127.0.0.1:{port}")
    _raises(rf"ray.address='ray://127.0.0.1:{port}': nothing answers", init_ray, f"ray://127.0.0.1:{port}")
    assert not ray.is_initialized()


def test_ray_address_in_the_environment_is_joined_not_a_new_local_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside ``ray job submit`` the supervisor sets RAY_ADDRESS; init_ray() must join it (here: fail to)."""
    import ray

    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    _raises(rf"RAY_ADDRESS='127.0.0.1:{port}': nothing answers", init_ray, num_cpus=2)
    _raises(r"ray.address='127.0.0.1:1': nothing answers", init_ray, "127.0.0.1:1")  # the config wins
    assert not ray.is_initialized()


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "no-port", "host:port", ":6379"])
def test_addresses_that_are_no_gcs_address(address: str) -> None:
    match = "is a dashboard .* RAY_API_SERVER_ADDRESS" if address.startswith("http") else "must be host:port"
    _raises(rf"ray.address={address!r} {match}", check_cluster, address)


def test_a_port_that_is_no_gcs(tmp_path) -> None:
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_port}"
        _raises(rf"ray.address='{address}': no Ray GCS answers at {address} \(UNAVAILABLE", check_cluster, address)
    finally:
        server.shutdown()


def test_the_right_token_passes(fake_gcs: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    check_cluster(fake_gcs)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    check_cluster(fake_gcs)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text(TOKEN)  # Ray's default place
    check_cluster(fake_gcs)


def test_a_wrong_token_names_where_it_came_from(fake_gcs: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "token").write_text("b" * 64)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    _raises(rf"ray.address='{fake_gcs}': the Ray cluster refused the token from RAY_AUTH_TOKEN_PATH="
            rf"{tmp_path / 'token'}; use that cluster's token", init_ray, fake_gcs)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "c" * 64)  # Ray's order: the variable before the file
    monkeypatch.setenv("RAY_ADDRESS", fake_gcs)
    _raises(rf"RAY_ADDRESS='{fake_gcs}': the Ray cluster refused the token from RAY_AUTH_TOKEN;", init_ray)


def test_no_token_for_a_token_cluster(fake_gcs: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _raises(rf"ray.address='{fake_gcs}': the Ray cluster requires token authentication; set RAY_AUTH_MODE=token "
            r"and RAY_AUTH_TOKEN_PATH \(or RAY_AUTH_TOKEN\) to its token", check_cluster, fake_gcs)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    _raises(r"RAY_AUTH_MODE=token but no token found", check_cluster, fake_gcs)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    _raises(rf"RAY_AUTH_TOKEN_PATH='{tmp_path / 'missing'}' cannot be read or is empty", check_cluster, fake_gcs)


def test_driver_runtime_env_leaves_the_jobs_own_variables_to_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray refuses a driver whose ray.init env_vars repeat a key of the submitted job's runtime_env."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert driver_runtime_env() == {"env_vars": ray_runtime.worker_env()}
    assert driver_runtime_env()["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"TOKENIZERS_PARALLELISM": "true",
                                                                               "HF_HUB_OFFLINE": "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert set(driver_runtime_env()["env_vars"]) == set(ray_runtime.WORKER_ENV) - {"TOKENIZERS_PARALLELISM"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": None}))
    assert driver_runtime_env() == {"env_vars": ray_runtime.worker_env()}


_LISTENERS = """
import json, os, psutil, ray
from pipelines.ray_runtime import init_ray
init_ray(num_cpus=1)
pid = ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process too
found = []
for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
        found += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("inet") if c.status == "LISTEN"]
    except psutil.Error:
        pass
print(json.dumps({"listeners": found, "worker": pid, "node_ip": ray.util.get_node_ip_address()}))
ray.shutdown()
"""
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.mark.integration
@pytest.mark.slow  # a real local Ray: about 15 s
def test_a_local_ray_listens_on_loopback_only(tmp_path) -> None:
    """Every socket the processes under vtrans's local Ray listen on (GCS, raylet, object manager, dashboard and its
    agents, metrics, workers) is on loopback: nothing is reachable from another machine."""
    import os
    import subprocess
    import sys
    import tempfile

    temp = tempfile.mkdtemp(prefix="vtr-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_TMPDIR=temp, HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    try:
        proc = subprocess.run([sys.executable, "-c", _LISTENERS], env=env, capture_output=True, text=True, timeout=300)
    finally:
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in seen["listeners"]}
    assert {"gcs_server", "raylet"} <= names, names  # the check saw Ray's own processes
    assert seen["node_ip"] == "127.0.0.1"
    exposed = [(name, ip, port) for name, ip, port in seen["listeners"] if ip not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"

"""A two-node Ray cluster and an MLflow server on this machine, to run vtrans through ``ray job submit`` end to end.

    bash clusters/local-cluster.sh up [--head-cpus 1] [--worker-cpus 2] [--workers 1]   # prints export lines
    eval "$(bash clusters/local-cluster.sh env)"
    ray job submit --working-dir . --runtime-env clusters/runtime_env.yaml \\
        --entrypoint-resources '{"vtrans-driver": 1}' -- python -m pipelines.cli sweep CONFIG output=$PWD/runs
    bash clusters/local-cluster.sh status
    bash clusters/local-cluster.sh down                                                   # safe to repeat

``up`` starts a Ray head (few CPUs, and the custom resource ``vtrans-driver`` that pins job drivers there as on the
KubeRay and launcher clusters), worker nodes (``vtrans-worker-<i>``: the CPUs the Train workers need) and ``mlflow
server`` (SQLite store, artifacts served from a local folder), on free ports; the dashboard / job server and MLflow
listen on loopback only (Ray binds its GCS to the machine's address whatever it is told). Token authentication is on
(``RAY_AUTH_MODE=token``) with a token generated for this cluster in ``<state-dir>/auth_token``, given to every node
and client through ``RAY_AUTH_TOKEN_PATH``; ``~/.ray/auth_token``, which local ``ray.init()`` clusters use, is left
alone. The nodes' environment also carries ``MLFLOW_TRACKING_URI`` (what ``${MLFLOW_TRACKING_URI}`` in
clusters/runtime_env.yaml expands to) and this environment's bin folder first on ``PATH`` (a job's ``python`` and
``vtrans`` are these). Each node has its own Ray temp dir, so this cluster is never "the latest cluster started by
``ray start``" that a plain ``ray.init()`` joins: that is /tmp/ray/ray_current_cluster, which is not written.

``down`` stops exactly what ``up`` started, from ``<state-dir>/cluster.json``: SIGTERM to each node's blocking
``ray start`` (which stops that node's processes), then SIGKILL to whatever of it is left, found as the descendants of
the recorded processes or by the marker ``VTRANS_LOCAL_CLUSTER=<state-dir>`` in their environment. No ``ray stop``,
which stops every Ray on the machine. The SQLite store, artifacts and logs stay in the state dir, the nodes' Ray
session logs in ``/tmp/vtrans-ray-<hash>`` until the next ``up``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

MARKER = "VTRANS_LOCAL_CLUSTER"
STATE_FILE = "cluster.json"
BIN = Path(sys.executable).parent  # ray and mlflow of the environment that runs this script
START_TIMEOUT_S = 120
#: The head's custom resource: job drivers are pinned there (``--entrypoint-resources '{"vtrans-driver": 1}'``, as on
#: the KubeRay and launcher clusters), at most this many at once.
DRIVERS = 4


def log(msg: str) -> None:
    print(f"[local-cluster] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(state_dir: Path) -> dict | None:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save(state_dir: Path, state: dict) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(state_dir / STATE_FILE)


def _ours(entry: dict) -> psutil.Process | None:
    """The recorded process, if it is still the one we started (not a recycled pid)."""
    try:
        p = psutil.Process(entry["pid"])
        return p if abs(p.create_time() - entry["created"]) < 1e-3 and p.is_running() else None
    except psutil.Error:
        return None


def _marked(state_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == str(state_dir):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _launch(state: dict, name: str, cmd: list[str], env: dict[str, str], state_dir: Path) -> dict:
    """Start ``cmd`` in a session of its own, output in ``logs/<name>.log``; recorded in the state file at once so
    that ``down`` can stop a half-started cluster."""
    out = state_dir / "logs" / f"{name}.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    entry = {"name": name, "pid": proc.pid, "created": psutil.Process(proc.pid).create_time(), "log": str(out),
             "cmd": cmd}
    state["processes"].append(entry)
    save(state_dir, state)
    return entry


def _wait(what: str, ready, entry: dict, timeout: float = START_TIMEOUT_S):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = ready()
        if value:
            return value
        if _ours(entry) is None:
            tail = Path(entry["log"]).read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{what} exited while starting; {entry['log']} ends with:\n" + "\n".join(tail))
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s; see {entry['log']}")


def _started(entry: dict) -> bool:
    return "Ray runtime started" in Path(entry["log"]).read_text(errors="replace")


def alive_nodes(state: dict) -> list[dict]:
    """The ALIVE nodes as the dashboard's state API lists them (node_id, resources_total, ...); [] if it is down."""
    token = Path(state["token_path"]).read_text().strip()
    req = urllib.request.Request(f"{state['dashboard_url']}/api/v0/nodes?limit=100",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            reply = json.loads(r.read())
    except (OSError, ValueError):
        return []
    return [n for n in reply["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _mlflow_ok(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def exports(state: dict) -> str:
    """Shell lines that point ray (job CLI, status, ray.init), vtrans and MLflow clients at this cluster."""
    env = {"RAY_ADDRESS": state["gcs_address"], "RAY_API_SERVER_ADDRESS": state["dashboard_url"],
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"],
           "MLFLOW_TRACKING_URI": state["mlflow_uri"]}
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()) + "\nunset RAY_AUTH_TOKEN\n"


def up(state_dir: Path, head_cpus: float, worker_cpus: float, workers: int, object_store_mb: int) -> dict:
    state = load(state_dir)
    if state and any(_ours(e) for e in state["processes"]):
        raise SystemExit(f"a cluster is already up from {state_dir} (bash clusters/local-cluster.sh status); "
                         f"run down first")
    if state:
        down(state_dir)
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    # Ray's unix sockets live under its temp dir and must stay under 107 bytes: a short folder per state dir; the
    # previous cluster's session logs there (kept by down) go now
    ray_tmp = Path(tempfile.gettempdir()) / f"vtrans-ray-{hashlib.sha1(str(state_dir).encode()).hexdigest()[:8]}"
    shutil.rmtree(ray_tmp, ignore_errors=True)
    token_path = state_dir / "auth_token"
    token_path.unlink(missing_ok=True)
    with os.fdopen(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:  # never readable
        f.write(secrets.token_hex(32))
    dash, mlflow_port = free_port(), free_port()
    state = {"state_dir": str(state_dir), "token_path": str(token_path), "ray_temp_dir": str(ray_tmp),
             "dashboard_url": f"http://127.0.0.1:{dash}", "mlflow_uri": f"http://127.0.0.1:{mlflow_port}",
             "gcs_address": None, "nodes": {}, "processes": []}
    save(state_dir, state)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update({MARKER: str(state_dir), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
                "RAY_API_SERVER_ADDRESS": state["dashboard_url"], "RAY_USAGE_STATS_ENABLED": "0",
                "MLFLOW_TRACKING_URI": state["mlflow_uri"],  # what ${MLFLOW_TRACKING_URI} in runtime_env.yaml gives
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # down stops a node at once (no 30 s drain)
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})  # job entrypoints find this env's vtrans/python
    try:
        art = state_dir / "mlartifacts"
        mlflow = _launch(state, "mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                                           str(mlflow_port), "--backend-store-uri", f"sqlite:///{state_dir}/mlflow.db",
                                           "--artifacts-destination", str(art), "--workers", "1"], env, state_dir)
        store = str(object_store_mb * 1024**2)
        head = _launch(state, "ray-head", [
            str(BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()), "--dashboard-host",
            "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", f"{head_cpus:g}", "--resources",
            json.dumps({"vtrans-driver": DRIVERS}), "--object-store-memory", store, "--temp-dir", str(ray_tmp / "head"),
            "--disable-usage-stats"], env, state_dir)
        _wait("the Ray head", lambda: _started(head), head)
        state["gcs_address"] = (ray_tmp / "head" / "ray_current_cluster").read_text().strip()
        save(state_dir, state)
        names = {"vtrans-driver": "head"}
        for i in range(1, workers + 1):
            names[f"vtrans-worker-{i}"] = f"worker-{i}"
            node = _launch(state, f"ray-worker-{i}", [
                str(BIN / "ray"), "start", "--address", state["gcs_address"], "--block", "--num-cpus",
                f"{worker_cpus:g}", "--resources", json.dumps({f"vtrans-worker-{i}": 1}),
                "--dashboard-agent-listen-port", str(free_port()), "--object-store-memory", store,
                "--temp-dir", str(ray_tmp / f"worker-{i}"), "--disable-usage-stats"], env, state_dir)
            _wait(f"Ray worker node {i}", lambda node=node: _started(node), node)

        def all_nodes():
            found = {names[r]: n for n in alive_nodes(state) for r in n["resources_total"] if r in names}
            return found if len(found) == len(names) else None

        found = _wait("the cluster's nodes in the state API", all_nodes, head)
        state["nodes"] = {name: {"node_id": n["node_id"], "cpus": n["resources_total"].get("CPU", 0),
                                 "resource": next(r for r in n["resources_total"] if r.startswith("vtrans-"))}
                          for name, n in sorted(found.items())}
        save(state_dir, state)
        _wait("the MLflow server", lambda: _mlflow_ok(state["mlflow_uri"]), mlflow)
    except BaseException as e:
        log(f"up failed: {e}; stopping what was started")
        down(state_dir)
        raise SystemExit(1) from None
    return state


def down(state_dir: Path, timeout: float = 20.0) -> bool:
    """Stop the cluster of ``state_dir``; False when nothing of it was running."""
    state = load(state_dir)
    if state is None:
        return False
    procs = {e["name"]: p for e in state["processes"] if (p := _ours(e))}
    victims = set(_marked(state_dir))
    for p in procs.values():
        try:
            victims |= {p, *p.children(recursive=True)}
        except psutil.Error:
            pass
    # worker nodes before the head (their raylets would otherwise wait for the lost GCS), MLflow's whole session
    order = sorted(procs, key=lambda n: (n == "ray-head", n == "mlflow"))
    for name in order:
        try:
            if name == "mlflow":
                os.killpg(procs[name].pid, signal.SIGTERM)
            else:
                procs[name].terminate()
                psutil.wait_procs([procs[name]], timeout=10)
        except (psutil.Error, ProcessLookupError):
            pass
    _, alive = psutil.wait_procs(list(victims), timeout=timeout)
    alive = set(alive) | set(_marked(state_dir))
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(alive), timeout=5)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    (state_dir / "auth_token").unlink(missing_ok=True)
    if alive:
        log(f"killed {len(alive)} process(es) that did not stop on SIGTERM")
    return bool(victims)


def status(state: dict) -> bool:
    """Print each part's health; True when all are up."""
    nodes = {n["node_id"] for n in alive_nodes(state)}
    ok = True
    for e in state["processes"]:
        running = _ours(e) is not None
        ok &= running
        print(f"{e['name']:<14} pid {e['pid']:<8} {'running' if running else 'NOT RUNNING'}  log {e['log']}")
    for name, n in state["nodes"].items():
        up_ = n["node_id"] in nodes
        ok &= up_
        print(f"node {name:<9} {n['node_id']}  {n['cpus']:g} CPU  {n['resource']}  {'ALIVE' if up_ else 'GONE'}")
    mlflow = _mlflow_ok(state["mlflow_uri"])
    ok &= mlflow
    print(f"dashboard      {state['dashboard_url']}  ({'answers' if nodes else 'NOT ANSWERING'})")
    print(f"gcs            {state['gcs_address']}")
    print(f"mlflow         {state['mlflow_uri']}  ({'healthy' if mlflow else 'NOT ANSWERING'})")
    print(f"token          {state['token_path']}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="local-cluster.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "down", "status", "env"])
    p.add_argument("--state-dir", default=os.environ.get("VTRANS_CLUSTER_DIR", ".vtrans-cluster"),
                   help="where the state file, token, logs and MLflow store live (default ./.vtrans-cluster, or "
                        "$VTRANS_CLUSTER_DIR)")
    p.add_argument("--head-cpus", type=float, default=1, help="CPUs of the head node (default 1)")
    p.add_argument("--worker-cpus", type=float, default=2, help="CPUs of each worker node (default 2)")
    p.add_argument("--workers", type=int, default=1, help="worker nodes (default 1)")
    p.add_argument("--object-store-mb", type=int, default=512, help="object store per node in MiB (default 512)")
    args = p.parse_args(argv)
    state_dir = Path(args.state_dir).expanduser().resolve()
    if args.command == "up":
        t0 = time.time()
        state = up(state_dir, args.head_cpus, args.worker_cpus, args.workers, args.object_store_mb)
        log(f"up in {time.time() - t0:.0f} s: {len(state['nodes'])} Ray nodes, dashboard {state['dashboard_url']}, "
            f"MLflow {state['mlflow_uri']}; state in {state_dir / STATE_FILE}")
        log('point this shell at it with: eval "$(bash clusters/local-cluster.sh env)"')
        print(exports(state), end="")
        return 0
    if args.command == "down":
        log(f"stopped the cluster of {state_dir}" if down(state_dir) else f"nothing running from {state_dir}")
        return 0
    state = load(state_dir)
    if state is None:
        log(f"no cluster is up from {state_dir} (bash clusters/local-cluster.sh up)")
        return 1
    if args.command == "env":
        print(exports(state), end="")
        return 0
    return 0 if status(state) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Starting or joining Ray the way this stack needs it (RAY-MLFLOW.md).

With an address (``ray.address``, else ``$RAY_ADDRESS``: ``ray job submit`` sets it for the job's driver) vtrans joins
that cluster, after checking within seconds that a Ray GCS answers there and accepts this process's token: ``ray.init``
itself retries for about 20 s and then says only "Failed to connect". Without one it starts a local Ray whose dashboard
is on a free loopback port, with ``RAY_API_SERVER_ADDRESS`` pointing at it: Ray's PlacementGroupCleaner needs the state
API to free the placement group of a Train run whose driver died (without it an early-stopped Tune trial deadlocks the
next one).

A local Ray listens on loopback only: its node address is 127.0.0.1, so the GCS, raylet, object manager, dashboard
agent, runtime-env agent, metrics port and every worker bind 127.0.0.1 (verified with psutil in
tests/pipelines/test_ray_runtime.py). ``ray.init`` would otherwise turn ``_node_ip_address="127.0.0.1"`` into the
machine's address (``services.resolve_ip_for_localhost``, "remotely reachable") and every one of those sockets would
listen on all interfaces. Ray's token authentication (on by default for local clusters since 2.59, token in
``~/.ray/auth_token``) stays on as a second fence, unless ``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from vtrans.errors import ConfigError

#: A cheap GCS call (its request message is empty) that fails fast with UNAUTHENTICATED when the token is wrong.
GCS_PING = "/ray.rpc.NodeInfoGcsService/GetClusterId"
PROBE_TIMEOUT_S = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Environment of every Ray worker of a vtrans job: no carriage-return progress bars from the Hugging Face libraries
#: or MLflow in the logs (vtrans prints its own progress lines), no tokenizer thread pools inside forked workers.
WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
              "TOKENIZERS_PARALLELISM": "false"}


#: Log levels of the driver passed on to the workers when set (the CLI's quiet console: pipelines/console.py).
PASSED_ON = ("TRANSFORMERS_VERBOSITY", "MLFLOW_LOGGING_LEVEL")


def worker_env() -> dict[str, str]:
    """:data:`WORKER_ENV`, where the driver's environment does not already choose otherwise, and :data:`PASSED_ON`."""
    return {**{k: os.environ.get(k, v) for k, v in WORKER_ENV.items()},
            **{k: os.environ[k] for k in PASSED_ON if k in os.environ}}


def driver_runtime_env() -> dict:
    """The runtime_env of this driver's ``ray.init``: :func:`worker_env`, less the variables a submitted job's own
    runtime_env sets (Ray refuses to merge a job's and a driver's runtime_env that set the same variable; the job's
    value is also in this process's environment, so the workers get it either way)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        job = set((json.loads(raw)["runtime_env"] or {}).get("env_vars") or {}) if raw else set()
    except (ValueError, KeyError, TypeError, AttributeError):
        job = set()
    return {"env_vars": {k: v for k, v in worker_env().items() if k not in job}}


def _auth_token() -> tuple[str, str]:
    """The token Ray sends under ``RAY_AUTH_MODE=token`` and where it comes from, in Ray's order: ``RAY_AUTH_TOKEN``,
    the file ``RAY_AUTH_TOKEN_PATH`` (unreadable is an error, no fallback), ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError:
            token = ""
        if not token:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path!r} cannot be read or is empty; point it at the cluster's "
                              f"token file")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    token = default.read_text().strip() if default.is_file() else ""
    if not token:
        raise ConfigError("RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the "
                          "cluster's token, or write it to ~/.ray/auth_token")
    return token, str(default)


def _split(address: str, key: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{key}={address!r} must be host:port (the cluster's GCS), ray://host:port or auto")
    return host, int(port)


def check_cluster(address: str, key: str = "ray.address", timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail within seconds, naming ``key=address``, when no Ray cluster answers at ``address`` or it refuses this
    process's token. ``auto`` is left to ``ray.init``; for ``ray://`` (Ray Client) only the port is checked."""
    if address == "auto":
        return
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"{key}={address!r} is a dashboard (job submission) address; joining needs the GCS "
                          f"address host:port (`ray status` prints it). For `ray job submit` set "
                          f"RAY_API_SERVER_ADDRESS instead")
    client = address.startswith("ray://")
    host, port = _split(address[len("ray://"):] if client else address, key)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"{key}={address!r}: nothing answers at {host}:{port} ({e.strerror or e}); start the "
                          f"cluster (bash clusters/local-cluster.sh up) or fix the address") from None
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if client or mode not in ("", "disabled", "token"):  # another auth mode (e.g. Kubernetes): left to Ray
        return
    import grpc

    token, source = _auth_token() if mode == "token" else (None, None)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            channel.unary_unary(GCS_PING)(b"", timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                fix = (f"the Ray cluster refused the token from {source}; use that cluster's token" if source else
                       "the Ray cluster requires token authentication; set RAY_AUTH_MODE=token and "
                       "RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to its token")
                raise ConfigError(f"{key}={address!r}: {fix}") from None
            detail = (e.details() or "").strip().splitlines()[:1]
            raise ConfigError(f"{key}={address!r}: no Ray GCS answers at {host}:{port} "
                              f"({': '.join([e.code().name, *detail])})") from None


def _join(address: str, key: str) -> dict:
    import ray
    from ray.exceptions import AuthenticationError

    check_cluster(address, key)
    try:
        return ray.init(address=address, log_to_driver=True, runtime_env=driver_runtime_env()).address_info
    except (AuthenticationError, ConnectionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}={address!r}: could not join the Ray cluster: {first}") from None


#: The address of every socket a local Ray opens.
LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _keep_loopback() -> Iterator[None]:
    """While Ray starts: a loopback ``_node_ip_address`` stays loopback (``ray.init`` swaps it for the machine's
    address, and Ray's processes bind all interfaces when the node address is not loopback)."""
    from ray._private import services

    original = getattr(services, "resolve_ip_for_localhost", None)
    if original is None:  # a Ray without it: nothing to undo (the listen-socket test says whether it still binds)
        yield
        return
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             resources: dict[str, float] | None = None) -> dict:
    """Join ``address``, else ``$RAY_ADDRESS`` (a :class:`ConfigError` within seconds when nothing answers there or
    the token is refused); with neither, start a local Ray (every socket on 127.0.0.1, dashboard on a free port) with
    ``num_cpus``, ``num_gpus`` and ``resources``, which describe a local Ray only. Idempotent."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().__dict__.get("_context", {}) or {}
    key, target = ("ray.address", address) if address else ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS") or None)
    if target and target != "local":
        return _join(target, key)
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Ray Train starts a preemption-watcher actor (a process of its own) with every job; the nodes of a local Ray
    # are this machine's, never drained by a cloud, so the jobs go without it (a user's own setting wins)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # "local", not None: ray.init() with no address joins the latest `ray start` cluster of this machine
    # (/tmp/ray/ray_current_cluster) when there is one, and then refuses num_cpus
    with _keep_loopback():
        info = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                        include_dashboard=True, dashboard_host=LOOPBACK, dashboard_port=port, log_to_driver=True,
                        runtime_env=driver_runtime_env(), _node_ip_address=LOOPBACK)
    return info.address_info

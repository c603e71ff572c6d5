"""Starting or joining Ray the way this stack needs it (RAY-MLFLOW.md).

A local Ray gets its dashboard on a free loopback port and ``RAY_API_SERVER_ADDRESS`` pointing at it: Ray's
PlacementGroupCleaner needs the state API to free the placement group of a Train run whose driver died (without it an
early-stopped Tune trial deadlocks the next one).
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Environment of every Ray worker of a vtrans job: no carriage-return progress bars from the Hugging Face libraries
#: or MLflow in the logs (vtrans prints its own progress lines), no tokenizer thread pools inside forked workers.
WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
              "TOKENIZERS_PARALLELISM": "false"}


def worker_env() -> dict[str, str]:
    """:data:`WORKER_ENV`, where the driver's environment does not already choose otherwise."""
    return {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             resources: dict[str, float] | None = None) -> dict:
    """Join ``address`` or start a local Ray (loopback, dashboard on a free port); idempotent."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().__dict__.get("_context", {}) or {}
    runtime_env = {"env_vars": worker_env()}
    if address:
        return ray.init(address=address, log_to_driver=True, runtime_env=runtime_env).address_info
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    info = ray.init(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, include_dashboard=True,
                    dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True, runtime_env=runtime_env)
    return info.address_info

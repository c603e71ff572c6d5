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


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             resources: dict[str, float] | None = None) -> dict:
    """Join ``address`` or start a local Ray (loopback, dashboard on a free port); idempotent."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().__dict__.get("_context", {}) or {}
    if address:
        return ray.init(address=address, log_to_driver=True).address_info
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    info = ray.init(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, include_dashboard=True,
                    dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)
    return info.address_info

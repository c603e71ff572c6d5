#!/usr/bin/env bash
# A local two-node Ray cluster (token auth) + MLflow server for `ray job submit`: up | down | status | env.
# Runs clusters/local_cluster.py with the project's environment ($VTRANS_PYTHON, default .venv/bin/python).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${VTRANS_PYTHON:-$root/.venv/bin/python}" "$root/clusters/local_cluster.py" "$@"

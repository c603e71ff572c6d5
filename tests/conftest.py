"""Shared test set-up: offline Hugging Face, test ordering, CUDA skips and a private asset cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Nothing may come from a model hub: built-in models are local folders (vtrans.assets).
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


#: The slowest test files, slowest first (the integration run on the 2-core CI machine). In a parallel run
#: (``pytest -n N --dist loadfile --no-loadscope-reorder``, what ``make test`` runs) files are handed out in collection
#: order, so starting the long ones first keeps one of them from running alone at the end. Order only; a file missing
#: here just starts later.
SLOWEST_FIRST = (
    "tests/pipelines/test_sweep_run.py",
    "tests/pipelines/test_pipeline.py",  # four pipeline runs since the LoRA and latency-budget runs joined
    "tests/pipelines/test_sweep_asha.py",
    "tests/pipelines/test_train_jobs.py",
    "tests/pipelines/test_bench.py",
    "tests/pipelines/test_sweep_resume.py",
    "tests/pipelines/test_tracking_outage.py",
    "tests/pipelines/test_train_real.py",
    "tests/pipelines/test_pipeline_kill.py",
    "tests/clusters/test_local_cluster.py",
    "tests/vtrans/test_fisher.py",  # Kwon on the real MiniLM
    "tests/vtrans/test_lm_eval.py",  # lm-eval on the real SmolLM2
    "tests/vtrans/test_real_models.py",
)


def _parallel(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) or os.environ.get("PYTEST_XDIST_WORKER") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run unit tests before integration tests (stable order otherwise) - in a parallel run, the files of
    :data:`SLOWEST_FIRST` first, then the other integration files, then the unit tests; skip ``gpu`` tests without
    CUDA."""
    if _parallel(config):
        rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}

        def key(item: pytest.Item) -> tuple[int, int]:
            path = item.nodeid.split("::", 1)[0]
            integration = item.get_closest_marker("integration") is not None
            return rank.get(path, len(rank)), 0 if integration else 1

        items.sort(key=key)
    else:
        items.sort(key=lambda item: item.get_closest_marker("integration") is not None)
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_put_back():
    """Every test ends with MLflow's process-global tracking URI and ``$MLFLOW_TRACKING_URI`` as it found them: a test
    that calls ``mlflow.set_tracking_uri`` (which also writes the variable) must not point the next test in the same
    worker process at its store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    explicit = getattr(utils, "_tracking_uri", None)
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None:
        utils._tracking_uri = explicit
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_behind(request: pytest.FixtureRequest):
    """A test file leaves this worker process without a Ray it started: a Ray left initialized makes every later
    ``init_ray`` in the process a no-op (CI once failed test_ray_runtime that way). A leak is shut down and named
    in the warnings summary, so the file that leaked is found and the files after it run as written."""
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None and ray.is_initialized():
        ray.shutdown()
        import warnings

        warnings.warn(f"{request.node.nodeid} left Ray initialized in this process (shut down now)", stacklevel=1)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh vtrans cache root for one test (``VTRANS_CACHE`` points at it)."""
    cache = tmp_path / "vtrans-cache"
    monkeypatch.setenv("VTRANS_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _one_torch_thread_for_unit_tests(request: pytest.FixtureRequest):
    """Unit tests run tiny models, where a second intra-op thread costs more than it gives (and on a busy 2-core
    machine spins against the other process); integration tests keep torch's default."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

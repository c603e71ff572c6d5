"""Shared test set-up: offline Hugging Face, test ordering, CUDA skips and a private asset cache."""

from __future__ import annotations

import os
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run unit tests before integration tests (stable order otherwise); skip ``gpu`` tests without CUDA."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
        for item in gpu_items:
            item.add_marker(skip)


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

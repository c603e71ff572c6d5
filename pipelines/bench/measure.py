"""Measuring helpers: peak RSS and the load average while a block runs, torch threads inside a block, the log line.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every ``interval`` seconds.

    ``peak_mb``: the highest RSS seen (MB); ``delta_mb``: that peak above the RSS at entry (what the stage itself
    added, in a long-lived process that already holds other models)."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.start_mb = self.peak_mb = self.delta_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self) -> PeakRSS:
        self.start_mb = self.peak_mb = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())
        self.delta_mb = self.peak_mb - self.start_mb

    def as_dict(self) -> dict[str, float]:
        return {"peak_rss_mb": self.peak_mb, "delta_mb": self.delta_mb}


@contextlib.contextmanager
def peak_rss_into(into: dict[str, dict], name: str) -> Iterator[None]:
    """:class:`PeakRSS` around the block, its figures stored as ``into[name]`` (the ``around`` of
    :func:`pipelines.dag.run_in_process`: one entry per stage)."""
    with PeakRSS() as rss:
        yield
    into[name] = rss.as_dict()


class LoadWatch:
    """The machine's 1-minute load average while the block runs, sampled every ``interval`` seconds: how much other
    work shared the CPUs with the benchmark (every timing depends on it)."""

    def __init__(self, interval: float = 15.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> LoadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def as_dict(self) -> dict[str, float]:
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples), "start": self.samples[0],
                "end": self.samples[-1], "cpus": float(os.cpu_count() or 1)}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _log(message: str) -> None:
    print(f"[bench] {message}", flush=True)

"""Failures the fault-tolerance tests inject into Ray Train jobs, through the jobs' ``before_step(step, rank)`` hook.

The production loop knows nothing of them: a hook travels to the workers by cloudpickle, by value (the workers cannot
import ``tests``)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class FailOnce:
    """Fail worker ``rank`` before step ``step``, once: it raises (or, with ``kill``, SIGKILLs its own process); the
    ``marker`` file it leaves tells the restarted worker group not to fail again."""

    step: int
    marker: str
    rank: int = 0
    kill: bool = False

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank or os.path.exists(self.marker):
            return
        Path(self.marker).touch()
        if self.kill:
            os.kill(os.getpid(), 9)
        raise RuntimeError(f"injected failure at step {step}")

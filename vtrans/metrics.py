"""The quality metrics of each task: one registry that evaluation, fine-tune validation, sweeps and reports read.

```python
TASK_METRICS["seq-cls"]             # ("accuracy",): what evaluate measures for the task, the first one by default
task_metric("causal-lm")            # "perplexity"
HIGHER_IS_BETTER["perplexity"]      # False: a sweep minimises it, a report ranks the lowest first
measure("accuracy", model, test_set, pad_token_id, batch_size=32)    # vtrans.evaluate.accuracy(...)
```

Imports no torch until :func:`measure` runs (configs and reports read the registry without it).
"""

from __future__ import annotations

from typing import Any

from vtrans.errors import ConfigError

__all__ = ["HIGHER_IS_BETTER", "TASK_METRICS", "direction", "measure", "task_metric"]

#: Quality metrics of each task (``evaluate.metrics`` chooses among them); the first is the task's default.
TASK_METRICS: dict[str, tuple[str, ...]] = {"seq-cls": ("accuracy",), "causal-lm": ("perplexity",)}
#: Whether a larger value of each metric is the better model.
HIGHER_IS_BETTER: dict[str, bool] = {"accuracy": True, "perplexity": False}


def task_metric(task: str) -> str:
    """The default quality metric of ``task`` (``seq-cls``: ``accuracy``, ``causal-lm``: ``perplexity``)."""
    if task not in TASK_METRICS:
        raise ConfigError(f"task must be one of {list(TASK_METRICS)}, got {task!r}")
    return TASK_METRICS[task][0]


def direction(metric: str) -> str:
    """``"max"`` for a metric where higher is better, else ``"min"`` (a sweep objective's direction)."""
    return "max" if HIGHER_IS_BETTER[metric] else "min"


def measure(metric: str, model: Any, dataset: Any, pad_token_id: int, batch_size: int,
            desc: str | None = None) -> float:
    """``metric`` of ``model`` on ``dataset`` (:func:`vtrans.evaluate.accuracy` or :func:`~vtrans.evaluate.perplexity`;
    ``desc``: report progress under that name)."""
    from vtrans.evaluate import accuracy, perplexity

    fns = {"accuracy": accuracy, "perplexity": perplexity}
    if metric not in fns:
        raise ConfigError(f"metric must be one of {list(fns)}, got {metric!r}")
    return fns[metric](model, dataset, pad_token_id, batch_size=batch_size, desc=desc)

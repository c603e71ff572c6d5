"""lm-evaluation-harness tasks on an in-memory model: resolve task names before any work, run them, flatten the scores.

```python
from vtrans.lm_eval import check_tasks, evaluate, metric_name
check_tasks(["lambada_local"])                       # unknown / unreachable tasks: a one-line ConfigError, first
scores = evaluate(model, tokenizer, ["lambada_local"], limit=32, batch_size=8)
scores                                               # {"lambada_local": {"acc": 0.41, "perplexity": 28.3, ...}}
metric_name("lambada_local", "acc")                  # "lm_eval_lambada_local_acc": the MLflow / objective name
```

The harness (``pip install 'vtrans[eval]'``, package ``lm_eval``) is imported only when a function here runs:
``import vtrans`` never needs it. The model is wrapped in lm-eval's ``HFLM(pretrained=<model>, tokenizer=...)``, so a
vtrans-compressed model (its own installed classes) is evaluated in-process, with no ``trust_remote_code``.

Local tasks (:data:`LOCAL_TASKS`) ship in ``vtrans/lm_eval_tasks/`` and are built from the built-in text assets; they
need no dataset hub. ``lambada_local``: LAMBADA-style last-word prediction on the built-in Lee news stories
(:func:`lambada_local_docs`): accuracy = share of passages whose last word the model predicts greedily, token by token.
Any other lm-eval task works where its data is reachable (a hub) or already in the local Hugging Face datasets cache.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vtrans.errors import ConfigError, quote

__all__ = ["LOCAL_TASKS", "TASK_DIR", "check_tasks", "evaluate", "flat_metrics", "lambada_local_docs", "metric_name"]

#: The folder of the task configs vtrans ships (a TaskManager ``include_path``).
TASK_DIR = Path(__file__).with_name("lm_eval_tasks")
#: Tasks shipped with vtrans, built from its text assets (no dataset hub): name -> their metrics.
LOCAL_TASKS: dict[str, tuple[str, ...]] = {"lambada_local": ("acc", "perplexity")}
#: Metric name prefix of every lm-eval score (``lm_eval_<task>_<metric>``; the dense model's carry ``dense_``).
PREFIX = "lm_eval_"
#: Install hint of the optional harness.
INSTALL = "pip install 'vtrans[eval]' (lm_eval==0.4.13)"

#: Words of a ``lambada_local`` passage: it grows sentence by sentence until it has at least this many.
LAMBADA_MIN_WORDS = 40
_CHECKED: set[tuple[str, ...]] = set()  # task lists found runnable in this process
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(f"evaluate.lm_eval_tasks needs lm-evaluation-harness, which is not installed ({e}); "
                          f"{INSTALL}") from None
    return lm_eval


def lambada_local_docs(min_words: int = LAMBADA_MIN_WORDS) -> list[dict[str, str]]:
    """The ``lambada_local`` examples, deterministic: per built-in Lee news story (file order), its first sentences up
    to at least ``min_words`` words, cut at a sentence end whose last word is a plain word (letters, ``'``, ``-``);
    ``context`` is the passage up to that word, ``target`` the word (no punctuation). A story with no such end, or
    whose passage came before (the corpus repeats a few stories), is left out: 290 examples. Every example is
    ``{"context", "target", "text"}`` (``text``: context + " " + target)."""
    from vtrans.assets import load_lee_news

    docs, seen = [], set()
    for story in load_lee_news():
        words: list[str] = []
        for sentence in _SENTENCE_END.split(story):
            words += sentence.split()
            if len(words) < min_words:
                continue
            last = words[-1].rstrip(".!?\"')]")
            if _WORD.match(last):
                context = " ".join(words[:-1])
                if context not in seen:  # the corpus repeats a few stories
                    seen.add(context)
                    docs.append({"context": context, "target": last, "text": f"{context} {last}"})
                break
    return docs


def _manager(names: Sequence[str]):
    """A TaskManager that knows ``names``: vtrans's folder alone when every name is local (cheap), else with lm-eval's
    own tasks too (indexing their thousands of configs takes seconds to a minute: done once per process)."""
    return _task_manager(not set(names) <= set(LOCAL_TASKS))


@functools.cache
def _task_manager(include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=include_defaults)


def check_tasks(names: object, key: str = "evaluate.lm_eval_tasks") -> list[str]:
    """Every task of ``names`` exists and its data can be loaded here (reachable, or cached when offline): else a
    one-line :class:`ConfigError` naming ``key[i]`` and the value, with the closest known task. Local tasks need no
    index of lm-eval's tasks. Returns ``names``."""
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{key} must be a non-empty list of lm-eval task names, got {quote(names)}")
    if tuple(names) in _CHECKED:  # a sweep checks every grid point's config: the same tasks each time
        return names
    _lm_eval()
    import logging

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # the manager's info lines, once per indexed folder
    manager = _manager(names)
    known = manager.all_tasks
    for i, name in enumerate(names):
        if name not in known:
            close = difflib.get_close_matches(str(name), [*LOCAL_TASKS, *known], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = "the local tasks" if set(names) <= set(LOCAL_TASKS) else "lm-eval's tasks or the local tasks"
            raise ConfigError(f"{key}[{i}]={quote(name)} is not one of {where} {list(LOCAL_TASKS)}{hint}")
    for i, name in enumerate(names):
        if name in LOCAL_TASKS:
            continue
        try:
            manager.load([name])  # loads its data: from the hub, or the local cache when offline
        except Exception as e:  # noqa: BLE001 - offline, missing config, auth: all mean the task cannot run here
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ConfigError(f"{key}[{i}]={quote(name)}: its data cannot be loaded here ({type(e).__name__}: "
                              f"{first}); run where its data set is reachable or cached, or use one of the local "
                              f"tasks {list(LOCAL_TASKS)}") from None
    _CHECKED.add(tuple(names))
    return names


def metric_name(task: str, metric: str) -> str:
    """The flat name of one lm-eval score: ``lm_eval_<task>_<metric>`` (characters MLflow or Tune would read as
    structure - ``.``, ``/``, ``,`` ... - become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{PREFIX}{task}_{metric}")


def flat_metrics(scores: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """:func:`evaluate`'s ``{task: {metric: value}}`` as flat ``prefix`` + :func:`metric_name` keys (NaN dropped)."""
    return {prefix + metric_name(task, metric): value for task, by_metric in scores.items()
            for metric, value in by_metric.items() if not math.isnan(value)}


def prefix_token_id(model: Any, tokenizer: Any) -> int:
    """The token lm-eval puts before a context it scores: the tokenizer's bos (else eos) token, else the model config's
    (a tokenizer borrowed from another family may name neither); a :class:`ConfigError` when none is known."""
    config = getattr(model, "config", None)
    for token in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                  getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(token, int):
            return token
    raise ConfigError("evaluate.lm_eval_tasks: neither the tokenizer nor the model config names a bos or eos token, "
                      "which lm-eval puts before every context; set the model config's bos_token_id")


def evaluate(model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None, batch_size: int = 8,
             max_length: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on ``model`` (a causal LM already on its device, in eval mode) with ``tokenizer``:
    ``{task: {metric: value}}`` (the filter ``none`` left out of the metric names, stderr included as
    ``<metric>_stderr``). ``limit``: the first examples of each task only. Deterministic (lm-eval's fixed seeds)."""
    _lm_eval()
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length,
              prefix_token_id=prefix_token_id(model, tokenizer))
    out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=_manager(tasks), log_samples=False,
                          bootstrap_iters=0, verbosity="WARNING")
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        scores = out["results"].get(task, {})
        results[task] = {k.partition(",")[0] if k.endswith(",none") else k.replace(",", "_"): float(v)
                         for k, v in scores.items()
                         if not isinstance(v, bool) and isinstance(v, (int, float)) and "," in k}
        results[task]["samples"] = float(out.get("n-samples", {}).get(task, {}).get("effective", math.nan))
    return results

"""What every stage shares: the stage contract, the cache key, the output folder, the stage record and its MLflow
child run.

A stage is a module of :mod:`pipelines.stages` that satisfies :class:`Stage`:

- ``NAME`` and ``NEEDS`` (the stages whose results it reads), ``VERSION`` (of its code: part of the cache key),
- ``OPTIONS``: the Ray task options of the stage (a stage that launches a TorchTrainer holds no CPU),
- ``material(cfg) -> dict``: everything of the config that its output depends on (beyond its inputs' keys),
- ``run(ctx, work, inputs, run_id) -> StageOutput``: the work itself, writing under ``work``; what it hands the next
  stages is typed in :mod:`pipelines.stages.products`.

Its output lives in ``<output>/stages/<NAME>/<key>/``, where ``key`` hashes ``material``, the keys of its inputs and
the stage's code ``VERSION``: a later pipeline (another run name, another budget in a sweep) with the same key reuses
it. ``stage.json``, written last and atomically, marks the output complete; a Ray Train job inside the folder resumes
from its own checkpoints when the stage is started again after a crash. A file lock serialises two pipelines that
reach the same key at once (the second finds the output finished).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipelines.config import PipelineConfig, config_hash, flatten
from pipelines.redact import redact_data
from pipelines.tracking import (
    TAG_KEY,
    TAG_MODEL_URI,
    TAG_SOURCE_RUN,
    TAG_STAGE,
    TAG_STATUS,
    Tracker,
    global_tracking_uri,
)

RECORD = "stage.json"
STAGES_DIR = "stages"


@dataclass
class StageOutput:
    """What a stage's ``run`` hands back."""

    outputs: dict[str, str] = field(default_factory=dict)
    """Named products: absolute paths (model directories, parquet files, reports)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Summary figures, logged as metrics of the stage's run (and shown in the summary)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything else JSON-able the next stages or the summary read."""
    history: list[dict] = field(default_factory=list)
    """A training curve not yet logged live (entries with ``step``)."""
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    """``(local path, artifact folder)`` logged to the stage's run."""
    model_dir: str | None = None
    """A compressed model directory logged as an MLflow pyfunc model of the stage's run."""
    model_metrics: dict[str, float] = field(default_factory=dict)
    """Metrics linked to the logged model."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags set on the stage's run (on the trial's run when stages share one: name them uniquely)."""
    datasets: list[tuple[str, str, str]] = field(default_factory=list)
    """``(parquet file, name, context)`` logged as dataset inputs of the stage's run and the pipeline's run."""


class Stage(Protocol):
    """The stage contract (the modules of :mod:`pipelines.stages` satisfy it; so does the benchmark's in-process
    replacement of a stage's work)."""

    NAME: str
    NEEDS: tuple[str, ...]
    VERSION: int
    OPTIONS: dict[str, Any]

    def material(self, cfg: PipelineConfig) -> dict: ...

    def run(self, ctx: StageContext, work: Path, inputs: Mapping[str, StageResult],
            run_id: str | None) -> StageOutput: ...


@dataclass
class StageResult:
    """A finished stage, as recorded in its ``stage.json`` (``status`` is how this pipeline run got it)."""

    stage: str
    key: str
    dir: str
    status: str
    """``ran`` (computed by this pipeline run) or ``cached`` (found finished)."""
    outputs: dict[str, str]
    metrics: dict[str, float]
    info: dict[str, Any]
    started_at: float
    finished_at: float
    wall_s: float
    run_id: str | None = None
    """The MLflow run that computed it."""
    model_uri: str | None = None
    """``models:/m-...`` of the logged model, if the stage logged one."""
    logged: bool = True
    """Whether everything of the stage reached MLflow (false: the store stopped answering; ``vtrans relog``)."""
    logging: dict[str, Any] = field(default_factory=dict)
    """What the stage logs (params, tags, artifacts, model), kept so that ``vtrans relog`` can log it later."""

    def record(self) -> dict:
        d = asdict(self)
        d.pop("status")
        return d


@dataclass
class StageContext:
    """Everything a stage task needs; it is pickled into the Ray task."""

    config: PipelineConfig
    root: str
    """Absolute output root."""
    keys: dict[str, str]
    """The cache key of every stage of this pipeline."""
    rerun: frozenset[str] = frozenset()
    """Stages to compute again even when finished (``--force`` / ``--from``)."""
    tracker: Tracker | None = None
    parent_run_id: str | None = None
    model_path: str | None = None
    """The dense model's resolved local directory."""
    single_run: bool = False
    """Log every stage into ``parent_run_id`` itself (metrics as ``<stage>.<key>``, artifacts under ``<stage>/``)
    instead of opening a child run per stage: a sweep trial is one MLflow run."""
    report_to_tune: bool = False
    """Hand the fine-tune job's reports (its held-out quality) to the Tune trial running this pipeline: what a
    sweep's ASHA early stopping reads."""
    in_process: bool = False
    """Train and measure in this process, without Ray (the training jobs as one worker's loop, the evaluation's
    models one after the other here): the benchmark's local executor. Same outputs, keys and cache folders."""
    log_as: str | None = None
    """The name the stage logs under (its child run's name, or its prefix in a shared run); None: the stage's name.
    A stage run on behalf of another (the posterior a prune stage re-thresholds) logs under its own role."""

    def stage_dir(self, stage: str) -> Path:
        return Path(self.root) / STAGES_DIR / stage / self.keys[stage]


def without_nulls(value: Any) -> Any:
    """``value`` with every null mapping entry left out, at any depth: what cache keys hash, so a new optional
    setting (null by default) keeps existing outputs valid."""
    if isinstance(value, Mapping):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def stage_key(stage, cfg: PipelineConfig, input_keys: Mapping[str, str]) -> str:
    """The cache key of a stage module for a config, given its inputs' keys. Null settings are left out, so a new
    optional setting (null by default) keeps existing outputs valid."""
    return config_hash({"stage": stage.NAME, "version": stage.VERSION,
                        "material": without_nulls(stage.material(cfg)), "inputs": dict(sorted(input_keys.items()))})


def read_record(work: Path) -> dict | None:
    f = work / RECORD
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn record is an unfinished stage


def _write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically; credentials in URIs redacted (a record is an output like any other)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(redact_data(data), indent=1, sort_keys=True))
    os.replace(tmp, path)


def save_record(result: StageResult) -> None:
    """Rewrite a finished stage's ``stage.json`` (after its MLflow side changed)."""
    _write_json(Path(result.dir) / RECORD, result.record())


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created) while the block runs: concurrent trials of a sweep wait here
    for one another."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", flush=True)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def execute(stage: Stage, ctx: StageContext, inputs: Mapping[str, StageResult]) -> StageResult:
    """Run one stage (or find it finished), with its MLflow child run. Called inside the stage's Ray task."""
    name, key = stage.NAME, ctx.keys[stage.NAME]
    work = ctx.stage_dir(name)
    with locked(work.with_name(f"{key}.lock")):
        record = read_record(work)
        if record is not None and name not in ctx.rerun:
            result = StageResult(status="cached", **record)
            _log(name, f"cached: {work} (finished {_stamp(result.finished_at)}, {result.wall_s:.0f}s)")
            _track_cached(stage, ctx, result)
            return result
        if name in ctx.rerun and work.exists():
            _log(name, f"re-running: removing the previous output {work}")
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        return _compute(stage, ctx, inputs, work)


def _stage_params(stage, ctx: StageContext) -> dict[str, str]:
    params = {f"material.{k}": v for k, v in flatten(stage.material(ctx.config)).items()}
    params.update({f"input.{n}": ctx.keys[n] for n in stage.NEEDS})
    params["key"] = ctx.keys[stage.NAME]
    return params


def _tags(stage, ctx: StageContext, status: str) -> dict[str, str]:
    return {TAG_STAGE: stage.NAME, TAG_STATUS: status, TAG_KEY: ctx.keys[stage.NAME]}


@dataclass
class _Run:
    """Where a stage logs: its own child run, or (``single_run``) the given run with prefixed names."""

    run_id: str | None
    prefix: str = ""
    own: bool = True

    def folder(self, artifact_path: str | None) -> str | None:
        if not self.prefix:
            return artifact_path
        return self.prefix.rstrip(".") + (f"/{artifact_path}" if artifact_path else "")

    def metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {self.prefix + k: v for k, v in metrics.items()}


def job_tracking(ctx: StageContext, run_id: str | None, stage: str) -> dict | None:
    """What a stage's Ray Train job needs to stream its curves into the stage's MLflow run (prefixed by the stage
    name when all stages share one run)."""
    if ctx.tracker is None or not run_id:
        return None
    return {"uri": ctx.tracker.uri, "run_id": run_id, "prefix": f"{ctx.log_as or stage}." if ctx.single_run else ""}


@contextlib.contextmanager
def _closing(tracker: Tracker | None, run: _Run) -> Iterator[None]:
    """End a stage's own run when the block leaves: FINISHED, or FAILED (KILLED on interrupt) on an exception."""
    try:
        yield
    except BaseException as e:
        if tracker is not None and run.own:
            with contextlib.suppress(Exception):
                tracker.end_run(run.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None and run.own:
        tracker.end_run(run.run_id)


def _open_run(stage, ctx: StageContext, status: str, source_run: str | None = None) -> _Run:
    tracker = ctx.tracker
    if tracker is None:
        return _Run(None)
    name = ctx.log_as or stage.NAME
    if ctx.single_run:
        tracker.set_tags(ctx.parent_run_id, {f"vtrans.key.{name}": ctx.keys[stage.NAME],
                                             f"vtrans.status.{name}": status})
        return _Run(ctx.parent_run_id, prefix=f"{name}.", own=False)
    tags = _tags(stage, ctx, status)
    if source_run:
        tags[TAG_SOURCE_RUN] = source_run
    return _Run(tracker.start_run(name, ctx.parent_run_id, _stage_params(stage, ctx), tags))


def _compute(stage, ctx: StageContext, inputs: Mapping[str, StageResult], work: Path) -> StageResult:
    name = stage.NAME
    tracker = ctx.tracker
    run = _open_run(stage, ctx, "ran")
    run_id = run.run_id
    _log(name, f"running into {work}")
    started = time.time()
    with _closing(tracker, run):
        try:
            out = stage.run(ctx, work, dict(inputs), run_id)
        except BaseException as e:
            if tracker is not None:  # record the failure on the run; each step on its own, none may hide the error
                with contextlib.suppress(Exception):
                    tracker.set_tags(run_id, {"vtrans.error": f"{type(e).__name__}: {e}"[:5000]})  # redacted there
                with contextlib.suppress(Exception):
                    tracker.log_text(run_id, traceback.format_exc(), "error.txt")
            raise
        finished = time.time()
        plan = {"params": _stage_params(stage, ctx), "tags": {**_tags(stage, ctx, "ran"), **out.tags},
                "artifacts": [list(a) for a in out.artifacts], "model_dir": out.model_dir,
                "model_metrics": dict(out.model_metrics), "history": out.history,
                "datasets": [list(d) for d in out.datasets]}
        result = StageResult(stage=name, key=ctx.keys[name], dir=str(work), status="ran", outputs=out.outputs,
                             metrics={k: float(v) for k, v in out.metrics.items()}, info=out.info,
                             started_at=started, finished_at=finished, wall_s=finished - started, run_id=run_id,
                             logged=tracker is None, logging=plan)
        # the output is complete and recorded before anything is logged: a tracking failure never loses it
        _write_json(work / RECORD, result.record())
        _log(name, f"done in {result.wall_s:.0f}s")
        if tracker is not None:
            tracker.log_metrics(run_id, run.metrics(dict(result.metrics, wall_s=result.wall_s)))
            if out.tags:
                tracker.set_tags(run_id, out.tags)
            if out.history:
                tracker.log_history(run_id, out.history, prefix=run.prefix)
            for path, artifact_path in out.artifacts:
                tracker.log_artifacts(run_id, path, run.folder(artifact_path))
            tracker.log_datasets({run_id, ctx.parent_run_id}, out.datasets)
            if out.model_dir is not None and run_id is not None:
                result.model_uri = log_model(tracker, run_id, out.model_dir, out.model_metrics,
                                             out.info.get("label_names"))
                if result.model_uri:
                    tracker.set_tags(run_id, {TAG_MODEL_URI: result.model_uri})
                    if ctx.parent_run_id != run_id:
                        tracker.link_model(ctx.parent_run_id, result.model_uri)
    if tracker is not None:  # after the run's end: a store lost before end_run leaves the record 'not logged'
        result.logged = tracker.online and run_id is not None
        _write_json(work / RECORD, result.record())
        if not result.logged:
            _log(name, "not (fully) logged to MLflow: its outputs and record are in this folder; "
                       "`vtrans relog` uploads them once the store answers")
    return result


def _track_cached(stage, ctx: StageContext, result: StageResult) -> None:
    """A child run for a stage found finished: its summary metrics and a link to the run that computed it. The
    model is logged again only when the store does not know the one logged then (another tracking URI)."""
    tracker = ctx.tracker
    if tracker is None:
        return
    run = _open_run(stage, ctx, "cached", result.run_id)
    run_id = run.run_id
    with _closing(tracker, run):
        tracker.log_metrics(run_id, run.metrics(dict(result.metrics, wall_s=result.wall_s)))
        tracker.log_datasets({run_id, ctx.parent_run_id},
                             [d for d in result.logging.get("datasets") or [] if Path(d[0]).is_file()])
        model_dir = result.outputs.get("logged_model_dir")
        if model_dir and run_id and tracker.online and not tracker.model_exists(result.model_uri) and \
                Path(model_dir).is_dir():
            uri = log_model(tracker, run_id, model_dir, result.info.get("model_metrics", {}),
                            result.info.get("label_names"))
            if uri:  # offline: the record keeps the model it knew
                result.model_uri = uri
                _write_json(Path(result.dir) / RECORD, result.record())
        if result.model_uri:
            tracker.set_tags(run_id, {TAG_MODEL_URI: result.model_uri})
            if ctx.parent_run_id != run_id and tracker.model_exists(result.model_uri):
                tracker.link_model(ctx.parent_run_id, result.model_uri)


#: pip requirements of the logged pyfunc (MLflow's inference would add torchvision, which has no CPU build here);
#: vtrans is one: the pyfunc loads its checkpoint with the installed vtrans (no copy of vtrans is logged with it).
def model_requirements() -> list[str]:
    import importlib.metadata as md

    reqs = []
    for pkg in ("mlflow", "torch", "transformers", "safetensors", "pandas", "tokenizers", "vtrans"):
        try:
            reqs.append(f"{pkg}=={md.version(pkg)}")
        except md.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_model(tracker: Tracker, run_id: str, model_dir: str, metrics: Mapping[str, float],
              label_names: list[str] | None = None) -> str | None:
    """Log a compressed model directory as the MLflow model of ``run_id`` (:mod:`pipelines.mlflow_model`: the
    transformers flavor, a pyfunc loaded by the installed vtrans), with the task's class names when known; returns its
    ``models:/m-...`` URI (None when the store stopped answering)."""
    return tracker.call("log model", _log_model, tracker, run_id, model_dir, metrics, label_names)


def _log_model(tracker: Tracker, run_id: str, model_dir: str, metrics: Mapping[str, float],
               label_names: list[str] | None) -> str:
    import mlflow

    from pipelines.mlflow_model import log_compressed
    from vtrans.checkpoint import infer_task, read_config

    task = "causal-lm" if infer_task(read_config(model_dir)) == "causal-lm" else "seq-cls"
    with global_tracking_uri(tracker.uri), mlflow.start_run(run_id=run_id, nested=True):
        info = log_compressed(model_dir, task, label_names, pip_requirements=model_requirements())
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
    return info.model_uri

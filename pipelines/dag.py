"""The pipeline's stage graph, calibrate -> teacher -> prune -> finetune -> evaluate, and its two drivers: Ray tasks
(:func:`launch`, what ``vtrans run`` uses) and this process (:func:`run_in_process`, what a sweep trial and the
benchmark use).

```python
from pipelines.config import load_config
from pipelines.dag import run_pipeline
run = run_pipeline(load_config("pipelines/configs/minilm-rotten-tomatoes.yaml"))
run.metrics["accuracy"], run.run_id, run.results["prune"].status       # "ran" or "cached"
```

Each stage is a plain ``@ray.remote`` task whose arguments are the ObjectRefs of the stages it needs, so Ray starts
it when they finish and hands it their :class:`~pipelines.stages.base.StageResult` (no ``ray.dag`` / Workflows: both
are gone from this Ray, RAY-MLFLOW.md). Stages that launch a TorchTrainer hold no CPU themselves. The driver owns the
MLflow parent run; every stage task opens its child run. Everything a user can get wrong is checked before Ray starts
(:func:`pipelines.validate.preflight`), and the tracking store before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines.config import PipelineConfig, config_hash, flatten, to_dict
from pipelines.redact import redact, redact_data
from pipelines.stages import BY_NAME, NAMES, STAGES
from pipelines.stages.base import StageContext, StageResult, execute
from pipelines.stages.products import Evaluation
from pipelines.tracking import TAG_LOGGED, TAG_MODEL_URI, TAG_PIPELINE, Tracker, ui_hint
from pipelines.validate import preflight, with_absolute_paths
from vtrans.errors import ConfigError


@dataclass
class PipelineRun:
    """A finished pipeline run."""

    name: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    results: dict[str, StageResult]
    metrics: dict[str, float] = field(default_factory=dict)
    """The evaluation's metrics (also on the parent run)."""
    model_uri: str | None = None
    wall_s: float = 0.0
    summary_path: str = ""

    @property
    def ui(self) -> str:
        return ui_hint(self.tracking_uri, self.experiment_id, self.run_id)


def rerun_set(force: bool, from_stage: str | None) -> frozenset[str]:
    """Stages to compute again: all (``force``), or ``from_stage`` and every stage after it."""
    if force:
        return frozenset(NAMES)
    if from_stage is None:
        return frozenset()
    if from_stage not in NAMES:
        import difflib

        close = difflib.get_close_matches(from_stage, NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"--from must be one of {list(NAMES)}, got {from_stage!r}{hint}")
    return frozenset(NAMES[NAMES.index(from_stage):])


def _stage_task(name: str, ctx: StageContext, *needed: StageResult) -> StageResult:
    stage = BY_NAME[name]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return execute(stage, ctx, dict(zip(stage.NEEDS, needed)))


def launch(ctx: StageContext, stages: tuple[str, ...] = NAMES) -> dict:
    """Submit the stages (a prefix of the pipeline) as Ray tasks chained by ObjectRefs; returns ``{stage: ref}``."""
    import ray

    refs: dict = {}
    for stage in STAGES:
        if stage.NAME not in stages:
            continue
        task = ray.remote(_stage_task).options(name=f"vtrans-{stage.NAME}", max_retries=0, **stage.OPTIONS)
        refs[stage.NAME] = task.remote(stage.NAME, ctx, *(refs[n] for n in stage.NEEDS))
    return refs


def run_in_process(ctx: StageContext, stages: tuple[str, ...] = NAMES, given: Mapping[str, StageResult] | None = None,
                   around: Callable[[str], contextlib.AbstractContextManager] | None = None) -> dict[str, StageResult]:
    """The named stages in this process, in the graph's order, each found finished or computed (:func:`execute`, as in
    a Ray task); returns ``{stage: result}`` of those stages. A sweep trial runs its pipeline so (inside its Tune
    trial, the training still Ray Train jobs); with ``ctx.in_process`` the training and the evaluation run here too,
    without Ray (the benchmark's local executor).

    ``given``: results of stages not run here that the named ones need. ``around(name)``: a context manager around
    each stage (the benchmark's peak-RSS watch).
    """
    unknown = [s for s in stages if s not in BY_NAME]
    if unknown:
        raise ConfigError(f"stages must be among {list(NAMES)}, got {unknown}")
    results = dict(given or {})
    for stage in STAGES:
        if stage.NAME not in stages:
            continue
        missing = [n for n in stage.NEEDS if n not in results]
        if missing:
            raise ConfigError(f"stage {stage.NAME!r} needs {missing}: name them in stages, or give their results")
        with around(stage.NAME) if around is not None else contextlib.nullcontext():
            results[stage.NAME] = execute(stage, ctx, {n: results[n] for n in stage.NEEDS})
    return {n: results[n] for n in NAMES if n in stages}


def _write_summary(path: Path, run: PipelineRun, cfg: PipelineConfig, logged: bool = False) -> None:
    """``config.yaml`` and ``summary.json`` of a run, credentials redacted (``vtrans relog`` asks for them again)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(redact_data(to_dict(cfg)), sort_keys=False))
    summary = {"name": run.name, "run_id": run.run_id, "experiment_id": run.experiment_id,
               "tracking_uri": redact(run.tracking_uri), "model_uri": run.model_uri, "wall_s": run.wall_s,
               "metrics": run.metrics, "logged": logged,
               "stages": {n: {"status": r.status, "key": r.key, "dir": r.dir, "wall_s": r.wall_s, "run_id": r.run_id,
                              "finished_at": r.finished_at, "metrics": r.metrics, "logged": r.logged}
                          for n, r in run.results.items()}}
    tmp = path / ".summary.json.tmp"
    tmp.write_text(json.dumps(redact_data(summary), indent=1))
    os.replace(tmp, path / "summary.json")


def run_pipeline(cfg: PipelineConfig, force: bool = False, from_stage: str | None = None) -> PipelineRun:
    """Run (or resume) the pipeline on Ray with MLflow tracking; returns the finished run.

    Finished stages with the same cache key are reused unless ``force`` (every stage) or ``from_stage`` (that stage
    and the ones after it) asks to compute them again."""
    rerun = rerun_set(force, from_stage)
    checked = preflight(cfg)  # every config problem surfaces here, before the tracking store and Ray
    tracker = Tracker.connect(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    (Path(cfg.output).expanduser().resolve() / cfg.name).mkdir(parents=True, exist_ok=True)  # the driver's log
    root = Path(cfg.output).expanduser().resolve()
    tags = {TAG_PIPELINE: cfg.name, "vtrans.config_hash": config_hash(cfg),
            **{f"vtrans.key.{n}": k for n, k in checked.keys.items()}}
    run_id = tracker.start_run(cfg.name, params=flatten(cfg), tags=tags)  # None if the store died right after connect
    print(f"[pipeline] {cfg.name}: MLflow run {run_id} in {tracker.shown} (experiment {cfg.tracking.experiment!r})",
          flush=True)
    t0 = time.time()
    status = "FAILED"
    try:
        from pipelines.ray_runtime import init_ray
        from pipelines.train_jobs import check_resources

        init_ray(cfg.ray.address)
        check_resources(cfg.ray)
        import ray

        threads = cfg.evaluate.threads or 1
        if threads > ray.cluster_resources().get("CPU", 0):
            raise ConfigError(f"evaluate.threads={threads} is more CPUs than the cluster has "
                              f"({ray.cluster_resources().get('CPU', 0):g})")
        ctx = StageContext(config=with_absolute_paths(cfg), root=str(root), keys=checked.keys, rerun=rerun,
                           tracker=tracker, parent_run_id=run_id, model_path=checked.model_path)
        refs = launch(ctx)
        results = dict(zip(refs, _get(ray, list(refs.values()))))
        evaluation = results["evaluate"]
        run = PipelineRun(name=cfg.name, run_id=run_id, experiment_id=tracker.experiment_id, tracking_uri=tracker.uri,
                          results=results, metrics=dict(evaluation.metrics), model_uri=evaluation.model_uri,
                          wall_s=time.time() - t0)
        summary_dir = root / cfg.name
        _write_summary(summary_dir, run, with_absolute_paths(cfg))
        run.summary_path = str(summary_dir / "summary.json")
        tracker.log_metrics(run_id, dict(run.metrics, wall_s=run.wall_s))
        tracker.set_tags(run_id, {**{f"vtrans.status.{n}": r.status for n, r in results.items()},
                                  **({TAG_MODEL_URI: run.model_uri} if run.model_uri else {})})
        tracker.log_artifacts(run_id, summary_dir / "config.yaml")
        tracker.log_artifacts(run_id, summary_dir / "summary.json")
        tracker.log_artifacts(run_id, Evaluation.of(evaluation).report_md, "evaluation")
        complete = tracker.online and run_id is not None and all(r.logged for r in results.values())
        if complete:
            tracker.set_tags(run_id, {TAG_LOGGED: "complete"})
        _write_summary(summary_dir, run, with_absolute_paths(cfg), logged=complete and tracker.online)
        if not (complete and tracker.online):
            print(f"[pipeline] MLflow at {tracker.shown} did not take everything; the results are complete under "
                  f"{root}. Once it answers: vtrans relog {summary_dir}", flush=True)
        status = "FINISHED"
        return run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with contextlib.suppress(Exception):
            tracker.end_run(run_id, status)


def _get(ray, refs: list):
    """``ray.get`` that raises the stage's own exception (a ConfigError stays a ConfigError, one line)."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise

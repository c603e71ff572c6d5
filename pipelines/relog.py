"""``vtrans relog RUN_DIR``: upload to MLflow what a pipeline run could not log while its tracking store was down.

A pipeline keeps everything on its output root whatever MLflow does: each stage's ``stage.json`` (metrics, outputs,
what it logs: params, tags, artifacts, the model to log) and the run's ``<output>/<name>/summary.json`` and
``config.yaml``. When the store stops answering, the tracker goes offline (:class:`pipelines.tracking.Tracker`) and
the records say ``logged: false``. Relog reads them back and completes the MLflow side:

- the parent run (the recorded one if the store has it, else a new one) gets the run's params, metrics, tags and
  artifacts, and the tag ``vtrans.logged: complete`` last;
- a stage computed by this run gets its child run (the recorded one, else a new one) with its params, tags, metrics,
  its training curves from ``history.json`` (steps already in MLflow are not logged twice), its artifacts and its
  model, then ``logged: true`` in its record;
- a stage this run found cached gets its link run, as the pipeline would have logged it.

Everything already complete is left alone, so relog is idempotent: a second call creates nothing.

Relog uploads only files of the run itself: its ``config.yaml`` and ``summary.json``, and files under its stage
directories ``<output>/stages/<stage>/<key>/`` (symlinks resolved). A record that lists anything else (a stage
directory elsewhere, an artifact path outside the stage directories) is refused, naming the path, before anything is
uploaded: a ``stage.json`` is data, and must not make relog send arbitrary files of this machine to a tracking server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.config import flatten, from_dict
from pipelines.redact import is_redacted, redact
from pipelines.stages.base import RECORD, StageResult, log_model, read_record, save_record
from pipelines.tracking import (
    TAG_KEY,
    TAG_LOGGED,
    TAG_MODEL_URI,
    TAG_PIPELINE,
    TAG_SOURCE_RUN,
    TAG_STAGE,
    TAG_STATUS,
    Tracker,
)
from vtrans.errors import ConfigError

SUMMARY = "summary.json"


def _summary(run_dir: Path) -> dict:
    path = run_dir / SUMMARY
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"RUN_DIR={str(run_dir)!r} has no {SUMMARY}: give the folder `vtrans run` printed "
                          f"(<output>/<name>)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"RUN_DIR={str(run_dir)!r}: {SUMMARY} cannot be read ({e})") from None


def _inside(path: str | os.PathLike, roots: list[Path]) -> bool:
    resolved = Path(path).expanduser().resolve()
    return any(resolved == r or resolved.is_relative_to(r) for r in roots)


def _check_files(run_dir: Path, summary: dict) -> dict[str, dict]:
    """Every stage's record, after checking that each stage directory is the run's own
    (``<output>/stages/<stage>/<key>``) and that every file its record would upload lies under the run's stage
    directories; a :class:`ConfigError` naming the first path that does not."""
    for f in ("config.yaml", SUMMARY):
        if not _inside(run_dir / f, [run_dir]):
            raise ConfigError(f"RUN_DIR={str(run_dir)!r}: {f} is a link out of the run's folder "
                              f"({(run_dir / f).resolve()}); relog uploads nothing outside the run")
    stages = run_dir.parent / "stages"
    roots, records = [], {}
    for name, entry in summary["stages"].items():
        own = (stages / str(name) / str(entry.get("key"))).resolve()
        if Path(str(entry.get("dir"))).expanduser().resolve() != own:
            raise ConfigError(f"stage {name}: dir={entry.get('dir')!r} in {SUMMARY} is not the run's stage directory "
                              f"{own}; relog uploads nothing outside the run's stage directories")
        roots.append(own)
    for name, entry in summary["stages"].items():
        record = read_record(Path(entry["dir"]))
        if record is None:
            raise ConfigError(f"stage {name}: its record {Path(entry['dir']) / RECORD} is gone; cannot relog it")
        plan = record.get("logging") or {}
        paths = [("logging.artifacts", p) for p, _ in plan.get("artifacts") or []]
        if plan.get("model_dir"):
            paths.append(("logging.model_dir", plan["model_dir"]))
        if name == "evaluate":
            paths.append(("report", str(Path(entry["dir"]) / "report.md")))
        for key, path in paths:
            if not _inside(path, roots):
                raise ConfigError(f"stage {name}: {key} path {str(path)!r} in {RECORD} is outside the run's stage "
                                  f"directories; relog uploads nothing outside them")
        records[name] = record
    return records


def _store(given: str | None, recorded: str) -> str:
    """The tracking URI relog connects to: ``--tracking-uri``, else the recorded one. A recorded URI had its
    credentials redacted; ``$MLFLOW_TRACKING_URI`` supplies them when it is that URI with its credentials."""
    if given:
        return given
    if not is_redacted(recorded):
        return recorded
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env and redact(env) == recorded:
        return env
    raise ConfigError(f"summary.json tracking_uri={recorded!r} had its credentials redacted; pass them again with "
                      f"--tracking-uri (or MLFLOW_TRACKING_URI), or give the server user and password in "
                      f"MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD and a URI without them")


def relog(run_dir: str | os.PathLike, tracking_uri: str | None = None) -> dict:
    """Complete the MLflow side of the pipeline run in ``run_dir``; returns what was done
    (``{"parent": run_id, "created": [...], "completed": [...]}``). ``tracking_uri`` overrides the recorded store."""
    from pipelines.config import PipelineConfig, read_yaml

    run_dir = Path(run_dir).expanduser().resolve()
    summary = _summary(run_dir)
    cfg = from_dict(PipelineConfig, read_yaml(run_dir / "config.yaml"))
    records = _check_files(run_dir, summary)  # before the store: a refused path uploads nothing
    tracker = Tracker.connect(_store(tracking_uri, summary["tracking_uri"]), cfg.tracking.experiment,
                              cfg.tracking.artifact_location)
    tracker.retries = 0  # the store answered just now: a failure is not worth waiting for; run relog again
    done: dict = {"parent": None, "created": [], "completed": []}
    parent = summary.get("run_id")
    if not tracker.run_exists(parent):
        parent = tracker.start_run(cfg.name, params=flatten(cfg), tags={TAG_PIPELINE: cfg.name,
                                                                          "vtrans.relogged_from": str(parent)})
        done["created"].append(f"parent {parent}")
    done["parent"] = parent
    if tracker.client.get_run(parent).data.tags.get(TAG_LOGGED) == "complete":
        return done
    children = {r.data.tags.get(TAG_STAGE): r for r in tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")}
    model_uri = summary.get("model_uri")
    for name, entry in summary["stages"].items():
        result = StageResult(status=entry["status"], **records[name])
        if entry["status"] == "ran":
            if _relog_stage(tracker, parent, name, result, children.get(name), done):
                save_record(result)
        elif name not in children:  # found cached by this run: the link run the pipeline would have opened
            tags = {TAG_STAGE: name, TAG_STATUS: "cached", TAG_KEY: result.key}
            if result.run_id:
                tags[TAG_SOURCE_RUN] = result.run_id
            if result.model_uri:
                tags[TAG_MODEL_URI] = result.model_uri
            run_id = tracker.start_run(name, parent, tags=tags)
            tracker.log_metrics(run_id, dict(result.metrics, wall_s=result.wall_s))
            tracker.end_run(run_id)
            done["created"].append(f"{name} (cached) {run_id}")
        if name == "evaluate" and result.model_uri:
            model_uri = result.model_uri
    # a stage's run logged in full, but the store died before the run was ended: records written before the record
    # waited for the run's end (stages.base._compute) say 'logged' for it
    for child in children.values():
        if child.info.status == "RUNNING":
            tracker.end_run(child.info.run_id)
            done["completed"].append(f"{child.data.tags.get(TAG_STAGE)} {child.info.run_id} (ended)")
    tracker.log_metrics(parent, dict(summary.get("metrics") or {}, wall_s=summary.get("wall_s", 0.0)))
    tags = {f"vtrans.status.{n}": e["status"] for n, e in summary["stages"].items()}
    if model_uri:
        tags[TAG_MODEL_URI] = model_uri
    tracker.set_tags(parent, tags)
    for f in ("config.yaml", SUMMARY):
        tracker.log_artifacts(parent, run_dir / f)
    report = Path(summary["stages"].get("evaluate", {}).get("dir", "")) / "report.md"
    if report.is_file():
        tracker.log_artifacts(parent, report, "evaluation")
    if tracker.offline:
        raise ConfigError(f"tracking.uri={tracker.shown!r} stopped answering during relog; run it again")
    tracker.set_tags(parent, {TAG_LOGGED: "complete"})
    tracker.end_run(parent)
    summary.update(run_id=parent, model_uri=model_uri, logged=True, tracking_uri=tracker.shown)
    for name in summary["stages"]:
        summary["stages"][name]["logged"] = True
    tmp = run_dir / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, run_dir / SUMMARY)
    done["completed"].append(f"parent {parent}")
    return done


def _relog_stage(tracker: Tracker, parent: str, name: str, result: StageResult, child, done: dict) -> bool:
    """Complete the child run of a stage this pipeline computed; returns whether its record changed."""
    if result.logged and child is not None:
        return False
    plan = result.logging or {}
    run_id = child.info.run_id if child is not None else None
    if run_id is None and tracker.run_exists(result.run_id):
        run_id = result.run_id
    if run_id is None:
        run_id = tracker.start_run(name, parent, params=plan.get("params") or {}, tags=plan.get("tags") or {})
        done["created"].append(f"{name} {run_id}")
    else:
        tracker.set_tags(run_id, plan.get("tags") or {})
    tracker.log_metrics(run_id, dict(result.metrics, wall_s=result.wall_s))
    for path, folder in plan.get("artifacts") or []:
        if Path(path).name == "history.json" and Path(path).is_file():  # a Train job's curves
            _log_missing_steps(tracker, run_id, json.loads(Path(path).read_text()))
        if Path(path).exists():
            tracker.log_artifacts(run_id, path, folder)
    if plan.get("history"):
        _log_missing_steps(tracker, run_id, plan["history"])
    tracker.log_datasets({run_id, parent}, [d for d in plan.get("datasets") or [] if Path(d[0]).is_file()])
    if plan.get("model_dir") and not tracker.model_exists(result.model_uri) and Path(plan["model_dir"]).is_dir():
        uri = log_model(tracker, run_id, plan["model_dir"], plan.get("model_metrics") or {},
                        result.info.get("label_names"))
        if uri:
            result.model_uri = uri
    if result.model_uri:
        tracker.set_tags(run_id, {TAG_MODEL_URI: result.model_uri})
        tracker.link_model(parent, result.model_uri)
    if tracker.offline:
        return False
    tracker.end_run(run_id)
    result.run_id, result.logged = run_id, True
    done["completed"].append(f"{name} {run_id}")
    return True


def _log_missing_steps(tracker: Tracker, run_id: str, history: list[dict]) -> None:
    """The curve entries whose (key, step) MLflow does not have yet (curves streamed before the outage stay single)."""
    keys = {k for entry in history for k, v in entry.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    have = {k: {m.step for m in tracker.client.get_metric_history(run_id, k)} for k in keys}
    missing = []
    for i, entry in enumerate(history):
        step = int(entry.get("step", i))
        rest = {k: v for k, v in entry.items() if k in keys and step not in have[k]}
        if rest:
            missing.append(dict(rest, step=step))
    tracker.log_history(run_id, missing)

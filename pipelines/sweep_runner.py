"""Running a :class:`~pipelines.sweep.Sweep` on Ray Tune, with its Pareto fronts and registry entries in MLflow.

Per model: its calibration set and teacher are computed first (stage cache; no MLflow run of their own), then a Tune
experiment of trials. A trial is a Tune function trainable holding no CPU (``{"CPU": 0, "memory": 256 MiB}``: the
Ray Train jobs it launches hold the CPUs; RAY-MLFLOW.md) that runs the five stages for its point - the first two are
found in the cache - logging into one MLflow run nested under the sweep's parent run. After the trials the fronts
(quality against block params, FLOPs and latency) are logged on the parent run as tables, JSON and plots, and the
models on the (quality, block params) front are registered (:mod:`pipelines.registry`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import flatten, to_dict
from pipelines.stages.base import StageContext
from pipelines.sweep import Sweep, check_sweep
from pipelines.tracking import TAG_MODEL_URI, Tracker, ui_hint
from pipelines.train_jobs import FINETUNE_STEP
from pipelines.validate import plan, with_absolute_paths
from vtrans.errors import ConfigError
from vtrans.metrics import task_metric

TAG_SWEEP = "vtrans.sweep"
TAG_SWEEP_KEY = "vtrans.sweep_key"
TAG_TRIAL = "vtrans.trial"
TAG_EARLY_STOPPED = "vtrans.early_stopped"
TAG_NODES = "vtrans.nodes"
TRIAL_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}


@dataclass
class SweepRun:
    """A finished sweep."""

    name: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    """One row per finished trial: the model label, the point, the evaluation metrics, its run id and model URI."""
    fronts: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """Model label -> size key -> indices into ``rows`` on the front."""
    registered: dict[str, list[dict]] = field(default_factory=dict)
    errors: int = 0
    stopped: int = 0
    """Trials stopped early by ASHA (their runs are KILLED, tagged ``vtrans.early_stopped``; not on any front)."""

    @property
    def ui(self) -> str:
        return ui_hint(self.tracking_uri, self.experiment_id, self.run_id)


def _shared(sweep: Sweep, label: str, tracker: Tracker, parent: str, model_path: str, root: Path) -> None:
    """The model's calibrate and teacher stages (cached; computed here once when missing)."""
    import ray

    from pipelines.dag import launch

    cfg = sweep.model_configs[label]
    ctx = StageContext(config=with_absolute_paths(cfg), root=str(root), keys=plan(cfg), tracker=None,
                       model_path=model_path)
    refs = launch(ctx, stages=("calibrate", "teacher"))
    results = dict(zip(refs, ray.get(list(refs.values()))))
    tracker.set_tags(parent, {f"vtrans.{label}.{n}": f"{r.status} {r.key}" for n, r in results.items()})


def _trial_run(tracker: Tracker, parent: str, trial_id: str, name: str, params: dict[str, str]):
    """The trial's MLflow run: the one a restored trial already has, else a new one (no duplicates on resume)."""
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent}' and "
                                                    f"tags.`{TAG_TRIAL}` = '{trial_id}'")
    if runs:
        return runs[0]
    return tracker.client.get_run(tracker.start_run(name, parent, params=params, tags={TAG_TRIAL: trial_id}))


def _early_stopped(tracker: Tracker, parent: str, last: dict) -> None:
    """End the MLflow run of a trial ASHA stopped (its process was ended mid fine-tune) as KILLED, tagged with where
    it stopped (``last``: the trial's last report). The driver's word is final: a trial whose Train job raised while
    Tune ended it may already have ended its run as FAILED."""
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent}' and "
                                                    f"tags.`{TAG_TRIAL}` = '{last.get('trial_id')}'")
    for run in runs:
        step = last.get(FINETUNE_STEP)
        tracker.set_tags(run.info.run_id, {TAG_EARLY_STOPPED: f"fine-tune step {step}" if step is not None else "yes"})
        if run.info.status != "FINISHED":
            tracker.end_run(run.info.run_id, "KILLED")


def _finished_result(run, label: str) -> dict:
    """What a trial reports, read back from its finished run (Tune saves its state every ~10 s: a trial that ended
    just before the driver died is started again on resume and must not run its stages again)."""
    tags = run.data.tags
    return {**{k: v for k, v in run.data.metrics.items() if "." not in k},  # the evaluation's (unprefixed) metrics
            "run_id": run.info.run_id, "model_uri": tags.get(TAG_MODEL_URI, ""), "model": label,
            "statuses": ",".join(f"{k[len('vtrans.status.'):]}={v}" for k, v in sorted(tags.items())
                                 if k.startswith("vtrans.status."))}


def _trial(config: dict, sweep: Sweep, tracker: Tracker, parent: str, root: str, model_paths: dict[str, str]) -> None:
    from ray import tune

    label = config["model"]
    point = {k: config[k] for k in sweep.config.space}
    cfg = sweep.point_config(label, point)
    trial_id = tune.get_context().get_trial_id()
    params = {**flatten(cfg), "sweep.model": label}
    run = _trial_run(tracker, parent, trial_id, f"{label} " + " ".join(f"{k}={v}" for k, v in point.items()), params)
    run_id = run.info.run_id
    if run.info.status == "FINISHED":
        print(f"[sweep] trial {trial_id} finished before the driver stopped (run {run_id}): not run again", flush=True)
        tune.report(_finished_result(run, label))
        return
    ctx = StageContext(config=with_absolute_paths(cfg), root=root, keys=plan(cfg), tracker=tracker,
                       parent_run_id=run_id, model_path=model_paths[label], single_run=True,
                       report_to_tune=sweep.config.early_stopping is not None)
    from pipelines.dag import run_in_process

    try:
        results = run_in_process(ctx)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    ev = results["evaluate"]
    tracker.log_metrics(run_id, ev.metrics)
    if ev.model_uri:
        tracker.set_tags(run_id, {TAG_MODEL_URI: ev.model_uri})
    # where its work ran: the trial's own node and every Train worker's of the jobs it ran (or found cached)
    import ray

    nodes = {ray.get_runtime_context().get_node_id()}
    for r in results.values():
        nodes.update(r.info.get("node_ids") or [])
    tracker.set_tags(run_id, {TAG_NODES: ",".join(sorted(nodes))})
    tracker.end_run(run_id)
    tune.report({**ev.metrics, "run_id": run_id, "model_uri": ev.model_uri or "", "model": label,
                 "statuses": ",".join(f"{n}={r.status}" for n, r in results.items())})


def _search_space(sweep: Sweep) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in sweep.config.space.items():
        if sweep.config.search == "grid":
            space[key] = tune.grid_search(spec)
        elif isinstance(spec, list):
            space[key] = tune.choice(spec)
        else:
            kind, args = next(iter(spec.items()))
            space[key] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                          "randint": lambda a: tune.randint(*a), "choice": tune.choice}[kind](args)
    return space


def _tuner(sweep: Sweep, label: str, trainable, storage: Path, concurrent: int, resume: bool):
    from ray import tune

    name = f"{sweep.name}-{label}-{sweep.key}"
    path = storage / name
    if resume and tune.Tuner.can_restore(str(path)):
        print(f"[sweep] {label}: resuming the Tune experiment {path}", flush=True)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    objectives = sweep.objectives(label)
    search_alg = None
    if sweep.config.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=[k for k, _ in objectives], mode=[g for _, g in objectives],
                                  seed=sweep.config.seed)
    scheduler = None
    if sweep.config.early_stopping == "asha" and search_alg is not None:
        # the fine-tune's reports reach Tune without the search's objectives (the trial's last report has them), and
        # Tune's check that every result carries them would fail the trial; multi-objective Optuna ignores them
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if sweep.config.early_stopping == "asha":
        from pipelines.early_stopping import BudgetASHA
        from pipelines.sweep import asha_grace_period, asha_group_keys

        cfg = sweep.model_configs[label]
        quality, goal = objectives[0]
        assert quality == task_metric(cfg.task), quality  # the sweep's checks allow the task's quality metric only
        scheduler = BudgetASHA(metric=f"val_{quality}", mode=goal, steps=cfg.finetune.steps,
                               grace_period=asha_grace_period(sweep, label),
                               reduction_factor=sweep.config.asha.reduction_factor,
                               group_keys=asha_group_keys(sweep.config))
    space = {"model": label, **_search_space(sweep)}
    return tune.Tuner(trainable, param_space=space,
                      tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler,
                                                  num_samples=sweep.config.num_samples,
                                                  max_concurrent_trials=concurrent),
                      run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))


def run_sweep(sweep: Sweep, resume: bool = False) -> SweepRun:
    """Run every model's trials, then log the fronts and register the Pareto models. ``resume`` continues the Tune
    experiments of an interrupted sweep (finished trials are not run again) and its MLflow parent run."""
    from ray import tune

    from pipelines.ray_runtime import init_ray
    from pipelines.sweep import max_concurrent
    from pipelines.train_jobs import check_resources

    checked = check_sweep(sweep)  # every model, every grid point: before the store and Ray
    base = sweep.model_configs[next(iter(sweep.models))]
    tracker = Tracker.connect(base.tracking.uri, base.tracking.experiment, base.tracking.artifact_location)
    (Path(base.output).expanduser().resolve() / sweep.name).mkdir(parents=True, exist_ok=True)  # the driver's log
    parent = _parent_run(sweep, tracker, resume)
    root = Path(base.output).expanduser().resolve()
    t0 = time.time()
    status = "FAILED"
    try:
        init_ray(base.ray.address)
        import ray

        for cfg in sweep.model_configs.values():
            check_resources(cfg.ray)
        res = ray.cluster_resources()
        concurrent = max_concurrent(sweep, res.get("CPU", 0), res.get("GPU", 0))
        rows: list[dict[str, Any]] = []
        errors = stopped = 0
        model_paths = {label: c.model_path for label, c in checked.items()}
        trainable = tune.with_resources(
            tune.with_parameters(_trial, sweep=sweep, tracker=tracker, parent=parent, root=str(root),
                                 model_paths=model_paths), TRIAL_RESOURCES)
        for label in sweep.models:
            _shared(sweep, label, tracker, parent, model_paths[label], root)
            grid = _tuner(sweep, label, trainable, root / "sweeps", concurrent, resume).fit()
            for result in grid:
                if sweep.config.early_stopping and result.error is None and "run_id" not in (result.metrics or {}):
                    _early_stopped(tracker, parent, result.metrics or {})  # by ASHA, mid fine-tune: no evaluation
                    stopped += 1
                    continue
                if result.error is not None or not result.metrics:
                    errors += 1
                    continue
                row = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
                row.update({k: result.config[k] for k in sweep.config.space})
                rows.append(row)
        run = SweepRun(name=sweep.name, run_id=parent, experiment_id=tracker.experiment_id, tracking_uri=tracker.uri,
                       rows=rows, errors=errors, stopped=stopped)
        _fronts(sweep, run, tracker, root)
        # a resumed sweep adds to the time its finished drivers logged (an interrupted driver logged none)
        before = tracker.client.get_run(parent).data.metrics.get("wall_s", 0.0) if resume else 0.0
        tracker.log_metrics(parent, {"trials": len(rows), "failed_trials": errors, "stopped_trials": stopped,
                                     "wall_s": before + time.time() - t0})
        status = "FINISHED" if not errors else "FAILED"
        return run
    finally:
        tracker.end_run(parent, status)


def _parent_run(sweep: Sweep, tracker: Tracker, resume: bool) -> str:
    if resume:
        runs = tracker.client.search_runs([tracker.experiment_id],
                                          filter_string=f"tags.`{TAG_SWEEP_KEY}` = '{sweep.key}'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            tracker.client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    params = {f"sweep.{k}": v for k, v in flatten(to_dict(sweep.config)).items()}
    params.update(flatten(sweep.base))
    return tracker.start_run(sweep.name, params=params, tags={TAG_SWEEP: sweep.name, TAG_SWEEP_KEY: sweep.key})


def _fronts(sweep: Sweep, run: SweepRun, tracker: Tracker, root: Path) -> None:
    """Per model: the fronts of quality against each size measure, logged as table + JSON + plot; registration."""
    from pipelines.pareto import Objective, pareto_front, plot_front, text_plot

    out = root / "sweeps" / f"{sweep.name}-{sweep.key}"
    out.mkdir(parents=True, exist_ok=True)
    for label in sweep.models:
        idx = [i for i, r in enumerate(run.rows) if r.get("model") == label]
        if not idx:
            continue
        rows = [run.rows[i] for i in idx]
        (quality, goal), *sizes = sweep.objectives(label)
        cfg = sweep.model_configs[label]
        e = cfg.evaluate
        latency = f"latency_ms_b{e.latency_batch_sizes[0]}_s{e.latency_seq_lens[0]}"
        axes = dict.fromkeys([k for k, _ in sizes] + ["params_blocks", "flops_total", latency])
        run.fronts[label] = {}
        for size in axes:
            if not all(size in r for r in rows):
                continue
            front = pareto_front(rows, [Objective(quality, goal), Objective(size, "min")])
            run.fronts[label][size] = [idx[i] for i in front]
            columns = ["model", *sweep.config.space, quality, size, "params_blocks_ratio", "run_id", "model_uri"]
            table = [{c: rows[i].get(c) for c in columns} for i in front]
            stem = f"{label}-{quality}-vs-{size}"
            (out / f"{stem}.json").write_text(json.dumps(table, indent=1))
            dense = {size: rows[0].get(f"dense_{size}"), quality: rows[0].get(f"dense_{quality}")}
            dense = dense if None not in dense.values() else None
            plot = plot_front(rows, front, size, quality, out / f"{stem}.png", dense=dense,
                              title=f"{sweep.name}: {label}, {quality} vs {size}")
            text = text_plot(rows, front, size, quality, dense=dense)
            (out / f"{stem}.txt").write_text(text + "\n")
            tracker.client.log_table(run.run_id, data=_frame(table), artifact_file=f"pareto/{stem}.table.json")
            for path in (out / f"{stem}.json", plot, out / f"{stem}.txt"):
                tracker.log_artifacts(run.run_id, path, "pareto")
            _print_front(label, quality, size, table, text if size == sizes[0][0] else None)
        if sweep.config.registry.register and "params_blocks" in run.fronts[label]:
            run.registered[label] = _register(sweep, label, run, quality, goal)


def _frame(table: list[dict]):
    import pandas as pd

    return pd.DataFrame(table)


def _print_front(label: str, quality: str, size: str, table: list[dict], text: str | None = None) -> None:
    print(f"\nPareto front of {label}: {quality} vs {size}", flush=True)
    if text:
        print(text, flush=True)
    for row in table:
        point = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("model", "run_id", "model_uri", quality,
                                                                            size, "params_blocks_ratio"))
        print(f"  {quality} {row[quality]:.4f}  {size} {row[size]:,.4g}  ({point})", flush=True)


def _register(sweep: Sweep, label: str, run: SweepRun, quality: str, goal: str) -> list[dict]:
    from pipelines.registry import FrontPoint, register_front, registered_name

    cfg = sweep.model_configs[label]
    name = registered_name(sweep.config.registry.name, label, cfg.task)
    points = []
    for i in run.fronts[label]["params_blocks"]:
        r = run.rows[i]
        if not r.get("model_uri"):
            raise ConfigError(f"trial {r.get('run_id')} of model {label!r} logged no model; cannot register it")
        tags = {k: str(r[k]) for k in sweep.config.space}
        tags.update({k: str(int(r[k])) for k in ("params_blocks", "params_total", "flops_total") if k in r})  # exact
        tags[quality] = f"{r[quality]:.6g}"
        speed = [k for k in r if k.startswith("speedup_b")]
        if speed:
            tags["speedup"] = f"{r[speed[0]]:.4g}"
        tags["source_run"] = r["run_id"]
        points.append(FrontPoint(model_uri=r["model_uri"], run_id=r["run_id"], quality=float(r[quality]),
                                 quality_key=quality, higher_is_better=goal == "max",
                                 params_blocks_ratio=float(r["params_blocks_ratio"]), tags=tags))
    dense = run.rows[run.fronts[label]["params_blocks"][0]].get(f"dense_{quality}")
    from mlflow import MlflowClient

    return register_front(MlflowClient(run.tracking_uri), name, points, dense,
                          description=f"VTrans-compressed {cfg.model.name} ({cfg.task}), sweep {sweep.name}")

"""The Ray overhead: a small pipeline in one plain process against the same stages through the stage DAG on a
freshly started local Ray.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from pipelines.bench import stats
from pipelines.bench.measure import _log, peak_rss_into, torch_threads
from pipelines.bench.mlflow_runs import EXPERIMENT
from pipelines.bench.profiles import OverheadProfile
from pipelines.config import PipelineConfig, from_dict


def overhead_config(ov: OverheadProfile, root: Path, tracking_uri: str, device: str) -> PipelineConfig:
    return from_dict(PipelineConfig, {
        "name": "bench-ray-overhead",
        "model": {"name": ov.model, "task": "seq-cls", "num_labels": 2},
        "data": {"name": "rotten_tomatoes", "label_column": "label", "max_length": ov.max_length,
                 "max_train_samples": ov.train_samples, "max_test_samples": ov.test_samples},
        "calibration": {"fraction": 0.25},
        "teacher": {"steps": ov.teacher_steps, "batch_size": ov.batch_size},
        "prune": {"method": ov.method, "budget": {"params": ov.budget, "tolerance": ov.tolerance},
                  "steps": ov.prune_steps, "batch_size": ov.batch_size},
        "finetune": {"steps": ov.finetune_steps, "batch_size": ov.batch_size},
        "evaluate": {"latency_batch_sizes": ov.latency.batch_sizes, "latency_seq_lens": [ov.latency.seq_len],
                     "latency_repeats": ov.latency.repeats, "warmup": ov.latency.warmup,
                     "threads": ov.latency.threads},
        "ray": {"num_workers": 1, "cpus_per_worker": 1.0, "use_gpu": device == "cuda"},
        "tracking": {"uri": tracking_uri, "experiment": EXPERIMENT},
        "output": str(root)})


def run_local_pipeline(cfg: PipelineConfig) -> dict:
    """The pipeline's stages in this process, in order, everything recomputed (on ``cfg.ray.use_gpu``'s device); wall
    time and peak RSS per stage."""
    from pipelines.dag import run_in_process
    from pipelines.stages import NAMES
    from pipelines.stages.base import StageContext
    from pipelines.validate import preflight, with_absolute_paths

    t0 = time.perf_counter()
    checked = preflight(cfg)
    ctx = StageContext(config=with_absolute_paths(cfg), root=str(Path(cfg.output).resolve()), keys=checked.keys,
                       rerun=frozenset(NAMES), model_path=checked.model_path, in_process=True)
    rss: dict[str, dict] = {}
    with torch_threads(int(cfg.ray.cpus_per_worker)):
        results = run_in_process(ctx, around=functools.partial(peak_rss_into, rss))
    out = {name: {"wall_s": r.wall_s, **rss[name]} for name, r in results.items()}
    return {"wall_s": time.perf_counter() - t0, "stages": out,
            "metrics": {k: v for k, v in results["evaluate"].metrics.items() if isinstance(v, float)}}


def _dag_peak_rss(result) -> float | None:
    """The peak RSS a DAG stage recorded: its Ray Train rank 0 worker's, or the evaluation's measuring processes'."""
    f = Path(result.dir) / "train" / "output" / "resources.json"
    if f.is_file():
        return json.loads(f.read_text()).get("peak_rss_mb")
    peaks = [result.metrics.get(k) for k in ("peak_rss_mb", "dense_peak_rss_mb")]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def ray_overhead(ov: OverheadProfile, out: Path, tracker, parent_run_id: str, device: str) -> dict:
    """The small pipeline in one plain process, then through the stage DAG on a freshly started local Ray (both from
    scratch, every stage recomputed). Ray is shut down afterwards."""
    import ray

    from pipelines.dag import run_pipeline
    from pipelines.ray_runtime import init_ray

    root = out / "overhead"
    if ray.is_initialized():  # the DAG gets a fresh Ray, as `vtrans run` does: no warm workers of the cells
        ray.shutdown()
    _log("ray overhead: the pipeline in one plain process")
    local = run_local_pipeline(overhead_config(ov, root / "local", tracker.uri, device))
    t0 = time.perf_counter()
    init_ray()
    ray_init_s = time.perf_counter() - t0
    _log(f"ray overhead: Ray started in {ray_init_s:.1f}s; the pipeline as the stage DAG")
    t0 = time.perf_counter()
    run = run_pipeline(overhead_config(ov, root / "dag", tracker.uri, device), force=True)
    dag_s = time.perf_counter() - t0
    tracker.set_tags(run.run_id, {"mlflow.parentRunId": parent_run_id, "bench.role": "ray-overhead-dag"})
    dag = {"wall_s": dag_s, "run_id": run.run_id,
           "stages": {n: {"wall_s": r.wall_s, "peak_rss_mb": _dag_peak_rss(r), "status": r.status}
                      for n, r in run.results.items()}}
    ray.shutdown()
    desc = (f"{ov.model}, {ov.train_samples} training / {ov.test_samples} test snippets, teacher {ov.teacher_steps} "
            f"steps, {ov.method} to params={ov.budget:g} in {ov.prune_steps} steps, fine-tune {ov.finetune_steps} "
            f"steps (batch {ov.batch_size}), evaluation with latency at batch {ov.latency.batch_sizes} x seq "
            f"{ov.latency.seq_len} ({ov.latency.repeats} repeats); one Ray Train worker (1 CPU) vs one thread")
    return {"description": desc, "ray_init_s": ray_init_s, "local": local, "dag": dag,
            "ratio": stats.ratio(dag_s, local["wall_s"], "Ray overhead"),
            "extra_s": dag_s - local["wall_s"], "stages": list(dag["stages"])}

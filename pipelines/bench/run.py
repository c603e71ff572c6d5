"""The run: the grid of cells through an executor (this process or Ray tasks), latency and the Ray overhead after
it, everything logged to MLflow and written to ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipelines.bench import report, stats
from pipelines.bench.cells import CellSpec, cached_rows, cell_key, run_cell
from pipelines.bench.latency import measure_latency
from pipelines.bench.measure import LoadWatch, _log, torch_threads
from pipelines.bench.mlflow_runs import EXPERIMENT, _log_latency, _log_table, log_row, summary_metrics
from pipelines.bench.overhead import ray_overhead
from pipelines.bench.profiles import DETERMINISTIC, VIB_METHODS, Profile, TaskProfile
from pipelines.bench.tasks import TaskSetup, prepare_task
from pipelines.config import flatten, to_dict
from vtrans.config import VIBConfig
from vtrans.errors import ConfigError


def machine() -> str:
    import psutil
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GB RAM, {gpu}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def what_ran(profile: Profile, setups: dict[str, TaskSetup], device: str = "cpu") -> list[str]:
    """The profile's settings in words, with the data sizes it found: what the markdown states it did."""
    if profile.executor == "ray":
        where = (f"Executor `ray`: every (task, method, seed) cell a Ray task holding {profile.cpus_per_cell:g} CPU(s)"
                 + (" and a GPU" if device == "cuda" else "") + f" (torch threads {max(1, int(profile.cpus_per_cell))}"
                 f"), as many at once as the cluster holds; the teacher is the pipeline's teacher stage, a "
                 f"{profile.teacher_workers}-worker Ray Train job.")
    else:
        where = ("Executor `local`: the cells one after the other in this process, the teacher a training loop in "
                 "it.")
    threads = f"{profile.threads} torch thread(s)" if profile.threads else "torch's default threads"
    lines = [f"Profile `{profile.name}`: {profile.description}. {where} Data, teacher and dense evaluation in the "
             f"driver with {threads}. Latency measured in the driver after each task's cells, one model at a time."]
    for kind, t in profile.tasks():
        s = setups[t.label]
        seeds = ", ".join(f"{m} {t.seeds_of(m) if m not in DETERMINISTIC else 1}" for m in t.methods)
        teacher = (f"the dense model fine-tuned for {t.teacher_steps} steps (batch {t.teacher_batch}, lr "
                   f"{t.teacher_lr:g}) on the training set" if t.teacher_steps else "the dense model itself")
        vib = ", ".join(f"{m} {t.prune_steps[m]} steps on {s.sizes['calibration' if m != 'vtrans' else 'train']:,}"
                        for m in t.methods if m in VIB_METHODS)
        lines.append(
            f"**{t.label}** ({s.model_name}, {s.data_name}, {s.metric}): {s.sizes['train']:,} training "
            f"{'texts' if kind == 'encoder' else 'chunks'} ({'max ' if kind == 'encoder' else ''}{t.seq_len} tokens), "
            f"{s.sizes['test']:,} held out; teacher: {teacher}. Budgets {', '.join(f'{b:g}' for b in t.budgets)} of "
            f"the block parameters (met within {t.tolerance:.1%} under"
            + ("; uniform widths, saved as the stock architecture" if t.uniform else "")
            + f"). Pruning seeds: {seeds}"
            + (" (magnitude is deterministic: one pruning)" if "magnitude" in t.methods else "") + ". "
            f"VIB training (batch {t.prune_batch}, lr masks {t.lr_masks:g}, lr weights {t.lr_weights:g}, KL weight "
            f"{t.kl_weight:g}, KL normalised per {t.kl_normalisation or VIBConfig().kl_normalisation}"
            + (f", KL multipliers {t.kl_multipliers}" if t.kl_multipliers else "")
            + (f", initial mask log-variance {t.logvar_init:g}" if t.logvar_init is not None else "")
            + (f", keep sharpness {t.keep_sharpness:g}" if t.keep_sharpness is not None else "")
            + f", layer distillation {t.hidden_weight:g} for vtrans/fast): {vib or 'none'}; "
            + ("one posterior per (method, seed) trained at the smallest budget and re-thresholded to the others. "
               if t.shared_posterior else "one training per budget. ")
            + (f"Kwon: Fisher on {t.kwon_samples} training samples drawn with the seed, mask search, rearrangement "
               f"and least-squares mask tuning. " if "kwon" in t.methods else "")
            + (f"Fine-tune ({_finetune_kind(t)}): {t.finetune_steps} steps (batch {t.finetune_batch}, lr "
               f"{t.finetune_lr:g}, logit "
               f"distillation from the teacher) of seeds 0..{t.finetune_seeds - 1} of every method. "
               if t.finetune_seeds else "No fine-tune. ")
            + f"Latency: batch {t.latency.batch_sizes} x seq {t.latency.seq_len}, {t.latency.repeats} repeats after "
              f"{t.latency.warmup} warm-up, {t.latency.threads} thread(s).")
    if profile.overhead is not None:
        lines.append("Ray overhead: the small pipeline of the last section, run both ways in this command.")
    return lines


def _finetune_kind(t: TaskProfile) -> str:
    """How the fine-tune recovers, as the report names it: every weight, or LoRA adapters with their shape."""
    if t.finetune_method != "lora":
        return "full, every weight"
    lora = t.lora()  # the library's defaults where the profile leaves them out
    return f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, merged before measuring"


class Executor:
    """Runs the cells: one after the other in this process, or as Ray tasks (results in completion order)."""

    def __init__(self, kind: str, device: str, cpus_per_cell: float) -> None:
        self.kind, self.device, self.cpus = kind, device, cpus_per_cell

    def run(self, specs: list[CellSpec]) -> Iterator[tuple[CellSpec, list[dict]]]:
        if self.kind == "local":
            for spec in specs:
                yield spec, run_cell(spec)
            return
        import ray

        from pipelines.ray_runtime import init_ray

        init_ray()
        opts: dict[str, Any] = {"num_cpus": self.cpus, "max_retries": 0}
        if self.device == "cuda":
            opts["num_gpus"] = 1
        task = ray.remote(run_cell).options(name="vtrans-bench-cell", **opts)
        pending = {task.remote(s): s for s in specs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done[0])
            yield spec, ray.get(done[0])


#: The order cells are started in: the cheapest methods first, so a run cut short has the most cells cached (a re-run
#: computes only the missing ones); the tables keep the profile's order.
START_ORDER = ("random", "magnitude", "kwon", "faster", "fast", "vtrans")


def _cell_specs(setup: TaskSetup, t: TaskProfile, out: Path, device: str, threads: int | None) -> list[CellSpec]:
    specs = []
    for m in sorted(t.methods, key=lambda m: START_ORDER.index(m) if m in START_ORDER else len(START_ORDER)):
        for seed in range(t.seeds_of(m)):
            ft = seed < t.finetune_seeds
            key = cell_key(setup, t, m, seed, ft, device)
            specs.append(CellSpec(setup=setup, profile=t, method=m, seed=seed, finetune=ft, device=device,
                                  threads=threads, models_dir=str(out / "models" / setup.label),
                                  cache_file=str(out / "cells" / setup.label / f"{m}-s{seed}-{key}.json")))
    return specs


def _stage_memory(rows: list[dict], setup: TaskSetup, latency: dict | None) -> dict[str, dict]:
    """Peak RSS per stage: data, teacher, compression (per method), evaluation, fine-tune, latency."""
    out = {k: {"peak_rss_mb": v["peak_rss_mb"], "delta_mb": v["delta_mb"], "runs": 1}
           for k, v in setup.stages.items()}
    for r in rows:
        for stage, v in (r.get("rss") or {}).items():
            name = f"compress ({r['method']})" if stage == "compress" else stage
            cur = out.setdefault(name, {"peak_rss_mb": 0.0, "delta_mb": 0.0, "runs": 0})
            cur["peak_rss_mb"] = max(cur["peak_rss_mb"], v["peak_rss_mb"])
            cur["delta_mb"] = max(cur["delta_mb"], v["delta_mb"])
            cur["runs"] += 1
    if latency:
        out["latency"] = {**latency["rss"], "runs": 1}
    return out


def run_grid(specs: list[CellSpec], executor: Executor, tracker, parent: str) -> list[dict]:
    """Every cell's rows: cached ones read back, the others computed by ``executor``; each row logged as a child run
    as soon as its cell is done (a crash keeps what was finished: the runs and the cell cache)."""
    rows: list[dict] = []

    def add(cell: list[dict], spec: CellSpec, cached: bool) -> None:
        for r in cell:
            r = dict(r, cached=cached)
            r["run_id"] = log_row(tracker, parent, r, spec.setup.metric, spec.setup.dense)
            rows.append(r)

    todo = []
    for spec in specs:
        found = cached_rows(spec)
        if found is None:
            todo.append(spec)
            continue
        _log(f"{spec.setup.label} {spec.method} s{spec.seed}: cached ({spec.cache_file})")
        add(found, spec, cached=True)
    for spec, cell in executor.run(todo):
        add(cell, spec, cached=False)
    return rows


def run_bench(profile: Profile, out: Path, device: str = "cpu", tracking_uri: str | None = None,
              experiment: str = EXPERIMENT, command: str = "", overrides: list[str] | None = None,
              readme: Path | None = None) -> dict:
    """Run the whole benchmark of ``profile`` into ``out``; returns the results written to ``results.json``. With
    ``readme`` its section of this profile (:func:`report.readme_markers`) is replaced by the results."""
    from pipelines.tracking import Tracker

    check_local_resources(profile)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker.connect(tracking_uri, experiment)
    started = time.time()
    load = LoadWatch().__enter__()
    tags = {"bench.profile": profile.name, "bench.device": device, "bench.executor": profile.executor,
            "bench.command": command, "bench.machine": machine()}
    parent = tracker.start_run(f"bench-{profile.name}", params=flatten(profile), tags=tags)
    _log(f"MLflow parent run {parent} in {tracker.uri} (experiment {experiment!r}); output {out}")
    status = "FAILED"
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        executor = Executor(profile.executor, device, profile.cpus_per_cell)
        results: dict[str, Any] = {
            "profile": profile.name, "settings": to_dict(profile), "overrides": list(overrides or []),
            "command": command, "date": time.strftime("%Y-%m-%d", time.localtime(started)),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), "machine": machine(),
            "device": device, "executor": profile.executor, "phases": {},
            "mlflow": {"uri": tracker.uri, "experiment": experiment, "run_id": parent},
            "tasks": {}, "notes": []}
        if profile.executor == "ray":
            from pipelines.ray_runtime import init_ray

            t0 = time.perf_counter()
            init_ray()
            results["ray_start_s"] = time.perf_counter() - t0
        setups: dict[str, TaskSetup] = {}
        with torch_threads(profile.threads):
            for kind, t in profile.tasks():
                phase = time.perf_counter()
                setup = setups[t.label] = prepare_task(kind, t, out, device, profile.executor,
                                                       profile.teacher_workers)
                results["phases"][f"{t.label} data, teacher and dense evaluation"] = time.perf_counter() - phase
                specs = _cell_specs(setup, t, out, device, profile.threads if profile.executor == "local"
                                    else max(1, int(profile.cpus_per_cell)))
                phase = time.perf_counter()
                rows = run_grid(specs, executor, tracker, parent)
                results["phases"][f"{t.label} cells ({len(specs)})"] = time.perf_counter() - phase
                rows.sort(key=lambda r: (stats.METHOD_ORDER.index(r["method"]), -r["budget"], r["seed"],
                                         r["finetuned"]))
                models = sorted({(r["method"], r["budget"], r["model_dir"]) for r in rows
                                 if r["seed"] == 0 and not r["finetuned"] and r.get("model_dir")},
                                key=lambda x: (stats.METHOD_ORDER.index(x[0]), -x[1]))
                phase = time.perf_counter()
                latency = measure_latency(setup, t.latency, models, device) if models else None
                results["phases"][f"{t.label} latency"] = time.perf_counter() - phase
                _log_latency(tracker, rows, latency)
                results["tasks"][t.label] = {
                    "label": t.label, "kind": kind, "model": t.model, "model_name": setup.model_name,
                    "data_name": setup.data_name, "second_name": setup.second_name, "task": setup.task,
                    "metric": setup.metric, "sizes": setup.sizes,
                    "dense": setup.dense, "tolerance": t.tolerance, "teacher_dir": setup.teacher_dir,
                    "setup": setup.stages, "rows": rows, "latency": latency,
                    "stages": _stage_memory(rows, setup, latency)}
        phase = time.perf_counter()
        results["overhead"] = (ray_overhead(profile.overhead, out, tracker, parent, device)
                               if profile.overhead is not None else None)
        if profile.overhead is not None:
            results["phases"]["Ray overhead (both ways)"] = time.perf_counter() - phase
        results["what_ran"] = what_ran(profile, setups, device)
        load.__exit__(None, None, None)
        results["load_average"] = la = load.as_dict()
        results["notes"].append(f"1-minute load average during the run: mean {la['mean']:.1f}, max {la['max']:.1f} "
                                f"(start {la['start']:.1f}, end {la['end']:.1f}) on {la['cpus']:.0f} CPUs; other work "
                                f"on the machine slows every timing, latency included.")
        results["wall_s"] = time.time() - started
        write_outputs(results, out)
        tracker.log_metrics(parent, summary_metrics(results))
        for name in ("results.json", "results.md", *[f"pareto-{label}.png" for label in results["tasks"]]):
            tracker.log_artifacts(parent, out / name)
        _log_table(tracker, parent, results)
        if readme is not None:
            report.update_readme(readme, results)
            _log(f"updated the {profile.name!r} results section of {readme}")
        status = "FINISHED"
        _log(f"done in {results['wall_s']:.0f}s: {out / 'results.md'}")
        return results
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        load.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            tracker.end_run(parent, status)
        if not ray_was_up and "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # the local Ray this run started (a caller's own Ray stays up)


def write_outputs(results: dict, out: Path) -> None:
    """``results.json``, ``results.md`` and a Pareto plot per task."""
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    for label, task in results["tasks"].items():
        report.plot_pareto(task, out / f"pareto-{label}.png")
    (out / "results.md").write_text(report.render_markdown(results))


def check_local_resources(profile: Profile, cpus: int | None = None) -> None:
    """With ``executor=ray`` and no cluster to join (no ``$RAY_ADDRESS``), the local Ray has this machine's CPUs: a
    cell asking for more would wait forever, so that is a :class:`ConfigError` before any work. A cluster joined
    through ``$RAY_ADDRESS`` is not checked (it may autoscale)."""
    if profile.executor != "ray" or os.environ.get("RAY_ADDRESS", "local") not in ("", "local"):
        return
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    if profile.cpus_per_cell > cpus:
        raise ConfigError(f"cpus_per_cell={profile.cpus_per_cell:g} is more than the {cpus} CPUs of the local Ray "
                          f"this run would start (no $RAY_ADDRESS): no cell could ever start; set cpus_per_cell={cpus} "
                          f"or lower, or join a cluster")

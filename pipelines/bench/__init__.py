"""The benchmark harness (issue 7): VTrans against the baselines on real models, and the system's own speed.

    python -m pipelines.bench --profile quick|full|smoke [--out runs/bench] [--device auto|cpu|cuda] [key=value ...]

One command measures, for all-MiniLM-L6-v2 on Rotten Tomatoes (accuracy; the teacher is MiniLM fine-tuned on the
task first) and SmolLM2-135M on Wikipedia text (perplexity), and for every method (``random``, ``magnitude``,
``kwon`` = Kwon et al. 2022 Fisher pruning, ``vtrans``, ``fast``, ``faster``), block-parameter budget and seed:

- quality without and with the post-pruning fine-tune (the same fine-tune for every method), mean ± std over seeds;
- achieved parameters and FLOPs in both scopes against the target (exact counts);
- latency and throughput of each compressed model against the dense one (fixed threads, batch sizes x seq len,
  warm-up, median of repeats) and measured speedup ÷ FLOPs reduction;
- compression wall time per method and the Faster-VTrans ÷ VTrans ratio;
- peak RSS per stage (sampled while the stage runs);
- Ray overhead: a small pipeline through the stage DAG on local Ray against the same stages in one plain process.

Everything goes to the MLflow experiment ``benchmarks`` (a parent run per invocation, a child run per result row)
and to ``--out``: ``results.json``, ``results.md`` and ``pareto-<task>.png``.

Where the work runs. Data and teacher: the pipeline's own ``calibrate`` and ``teacher`` stages (the teacher a Ray
Train job with ``executor=ray``, an in-process loop with ``local``) under ``<out>/stages/``, keyed as the pipeline
keys them: computed once per output folder, reused on a re-run (and by ``vtrans run`` on the same folder). The grid:
one *cell* per (task, method, seed) that compresses to every budget, evaluates, fine-tunes and evaluates again, its
rows cached as ``<out>/cells/<task>/<method>-s<seed>-<key>.json``. Inside a cell training is a plain loop in one
process: a Ray Train job's fixed cost (~15-20 s here) would dominate hundreds of short jobs. With ``executor=ray``
(every profile) each cell is a Ray task holding ``cpus_per_cell`` CPUs (and a GPU with ``--device cuda``), so two run
side by side on this 2-core machine and a cluster runs as many as it holds; ``executor=local`` runs them one after the
other in this process. Latency is measured afterwards in the driver, model after model, never beside other work.
On a cluster ``--out`` must be on storage every node sees, and with ``--device cuda`` the driver needs a GPU too (the
dense evaluation, the latency and the plain-process half of the overhead run there): ``ray job submit
--entrypoint-num-gpus 1``.

The package, one concept a module: :mod:`~pipelines.bench.profiles` (what a run measures: profiles, overrides),
:mod:`~pipelines.bench.tasks` (a task's data, teacher and dense reference), :mod:`~pipelines.bench.cells` (one cell),
:mod:`~pipelines.bench.in_process` (training and the stages without Ray), :mod:`~pipelines.bench.latency`,
:mod:`~pipelines.bench.overhead` (Ray against a plain process), :mod:`~pipelines.bench.measure` (peak RSS, load
average, threads), :mod:`~pipelines.bench.mlflow_runs`, :mod:`~pipelines.bench.run` (:func:`run_bench` and the
executor), :mod:`~pipelines.bench.cli`; the report: :mod:`~pipelines.bench.stats` (seed statistics, ratios) and
:mod:`~pipelines.bench.report` (markdown, plots, the ``pipelines/BENCHMARKS.md`` sections).
"""

from pipelines.bench.cells import (
    CELL_VERSION,
    OPTIONAL_SETTINGS,
    CellSpec,
    cached_rows,
    cell_key,
    load_split_ds,
    run_cell,
)
from pipelines.bench.cli import BENCHMARKS_REPORT, main, render_only, resolve_device, resolve_readme
from pipelines.bench.in_process import load_model, train_in_process
from pipelines.bench.latency import measure_latency
from pipelines.bench.measure import LoadWatch, PeakRSS, torch_threads
from pipelines.bench.mlflow_runs import EXPERIMENT, ROW_METRICS, log_row, summary_metrics
from pipelines.bench.overhead import overhead_config, ray_overhead, run_local_pipeline
from pipelines.bench.profiles import (
    DETERMINISTIC,
    METHODS,
    PROFILES,
    PRUNE_SETTINGS,
    TRAINING_FREE,
    VIB_METHODS,
    VIB_SETTINGS,
    LatencyProfile,
    OverheadProfile,
    Profile,
    TaskProfile,
    load_profile,
)
from pipelines.bench.run import Executor, check_local_resources, machine, run_bench, run_grid, what_ran, write_outputs
from pipelines.bench.tasks import KINDS, TaskSetup, prepare_task, task_config

__all__ = [
    "BENCHMARKS_REPORT", "CELL_VERSION", "DETERMINISTIC", "EXPERIMENT", "KINDS", "METHODS", "OPTIONAL_SETTINGS",
    "PROFILES", "PRUNE_SETTINGS", "ROW_METRICS", "TRAINING_FREE", "VIB_METHODS", "VIB_SETTINGS", "CellSpec",
    "Executor", "LatencyProfile", "LoadWatch", "OverheadProfile", "PeakRSS", "Profile", "TaskProfile",
    "TaskSetup", "cached_rows", "cell_key", "check_local_resources", "load_model", "load_profile", "load_split_ds",
    "log_row", "machine", "main", "measure_latency", "overhead_config", "prepare_task", "ray_overhead",
    "render_only", "resolve_device", "resolve_readme", "run_bench", "run_cell", "run_grid", "run_local_pipeline",
    "summary_metrics", "task_config", "torch_threads", "train_in_process", "what_ran", "write_outputs",
]

"""Stage 5, evaluate: the compressed model against the dense teacher, on the same device.

For each model, in a fresh Ray worker process of its own (so its peak memory is its own): the quality metric on the
test split (accuracy or perplexity), parameters and FLOPs in both scopes at every configured sequence length, and the
median forward latency and throughput at every (batch size, sequence length) of the ``evaluate`` grid. Then per grid
point: speedup = dense latency / compressed latency, FLOPs reduction = dense / compressed total FLOPs, and their ratio
(1.0: the wall clock gains all that the FLOPs promise). Peak memory: the measuring process's peak RSS on CPU, the
peak CUDA allocation on GPU.

The dense model is measured once per (teacher, test split, evaluate settings, device model, threads): the trials of
a sweep compare against one dense measurement, kept under ``stages/evaluate/dense/<key>/dense.json`` (``--force``
or ``--from evaluate`` measures it again). The device model is part of the key, so a trial scheduled on another
kind of GPU or CPU measures its own dense baseline.

Outputs: ``report.json`` and ``report.md``; the compressed model is logged to the stage's MLflow run as a pyfunc
(:mod:`pipelines.mlflow_model`), its quality and size linked to the logged model.
"""

from __future__ import annotations

import json
import platform
import resource
from pathlib import Path

from pipelines.config import PipelineConfig, config_hash, to_dict
from pipelines.stages.base import (
    STAGES_DIR,
    StageContext,
    StageOutput,
    StageResult,
    _write_json,
    locked,
    without_nulls,
)
from pipelines.stages.products import Data, Evaluation, Trained

NAME = "evaluate"
NEEDS = ("calibrate", "teacher", "finetune")
VERSION = 2
OPTIONS = {"num_cpus": 0}  # the measuring tasks reserve their own CPUs / GPU


def material(cfg: PipelineConfig) -> dict:
    m = {"evaluate": to_dict(cfg.evaluate), "flops_seq_len": cfg.prune.budget.seq_len,
         "device": "cuda" if cfg.ray.use_gpu else "cpu"}
    if cfg.prune.budget.metric == "latency":  # its point is timed too (other budgets keep their keys)
        m["latency_point"] = latency_point(cfg)
    return m


def latency_point(cfg: PipelineConfig) -> tuple[int, int] | None:
    """(batch, seq) of a latency budget (what its table predicted), None for other budgets."""
    b = cfg.prune.budget
    return (b.batch_size, b.seq_len) if b.metric == "latency" else None


def grid(cfg: PipelineConfig) -> list[tuple[int, int]]:
    """The timed (batch, seq) points: every pair of the latency grid, and a latency budget's own point."""
    e = cfg.evaluate
    points = [(b, s) for s in e.latency_seq_lens for b in e.latency_batch_sizes]
    extra = latency_point(cfg)
    return points + ([extra] if extra is not None and extra not in points else [])


def point(batch: int, seq: int) -> str:
    return f"b{batch}_s{seq}"


def measure(model_dir: str, task: str, test_path: str, cfg: PipelineConfig, pad_token_id: int, label: str,
            tokenizer_dir: str | None = None) -> dict:
    """Quality, counts, latency and memory of one model (runs in its own process); the lm-eval tasks' scores under
    ``lm_eval`` (``{task: {metric: value}}``) when ``evaluate.lm_eval_tasks`` is set (the tokenizer of
    ``tokenizer_dir``, the data's, else the model's own)."""
    import torch

    import vtrans
    from pipelines.stages.calibrate import TokenizedDataset
    from vtrans.checkpoint import load_pretrained
    from vtrans.latency import measure_peak_memory, model_bytes, time_forward
    from vtrans.metrics import measure

    e = cfg.evaluate
    torch.set_num_threads(e.threads or 1)
    device = "cuda" if cfg.ray.use_gpu else "cpu"
    baseline_mb = _peak_rss_mb()  # the interpreter, torch and transformers, before the model
    model = load_pretrained(model_dir, task=task, dtype=torch.float32).to(device).eval()
    data = TokenizedDataset(test_path, task)
    out: dict = {"model_dir": model_dir, "device": device, "device_name": device_name(device),
                 "threads": torch.get_num_threads(), "model_mb": model_bytes(model) / 2**20}
    for metric in e.metrics:
        out[metric] = measure(metric, model, data, pad_token_id, e.batch_size, desc=f"{label} {metric}")
    if e.lm_eval_tasks:
        out["lm_eval"] = _lm_eval(model, tokenizer_dir or model_dir, cfg, label)
    seqs = sorted({cfg.prune.budget.seq_len, *e.latency_seq_lens})
    out["counts"] = {str(s): vtrans.count(model, seq_len=s).as_dict() for s in seqs}
    timings = {}
    for b, s in grid(cfg):
        t, peak = measure_peak_memory(lambda b=b, s=s: time_forward(model, b, s, repeats=e.latency_repeats,
                                                                   warmup=e.warmup), device)
        timings[point(b, s)] = {"median_ms": t.median_ms, "p90_ms": t.p90_ms, "throughput": t.throughput,
                                "tokens_per_s": t.tokens_per_s, "peak_gpu_mb": None if peak is None else peak / 2**20}
        print(f"[{NAME}] {label} batch {b} seq {s}: {t.median_ms:.2f} ms, {t.throughput:.1f} seq/s", flush=True)
    out["latency"] = timings
    out["peak_rss_mb"] = _peak_rss_mb()
    out["peak_rss_over_baseline_mb"] = out["peak_rss_mb"] - baseline_mb
    return out


def _lm_eval(model, tokenizer_dir: str, cfg: PipelineConfig, label: str) -> dict[str, dict[str, float]]:
    """The lm-eval tasks' scores of ``model`` (:func:`vtrans.lm_eval.evaluate`)."""
    import time

    from vtrans.checkpoint import load_tokenizer
    from vtrans.errors import ConfigError
    from vtrans.lm_eval import evaluate

    e = cfg.evaluate
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is None:
        raise ConfigError(f"evaluate.lm_eval_tasks needs a tokenizer, and {tokenizer_dir!r} has none")
    t0 = time.time()
    scores = evaluate(model, tokenizer, list(e.lm_eval_tasks), limit=e.lm_eval_limit, batch_size=e.batch_size)
    for task, by_metric in scores.items():
        figures = ", ".join(f"{k} {v:.4f}" for k, v in by_metric.items() if k != "samples")
        print(f"[{NAME}] {label} lm-eval {task}: {figures} ({by_metric.get('samples', 0):.0f} examples, "
              f"{time.time() - t0:.0f} s)", flush=True)
    return scores


def device_name(device: str) -> str:
    """The hardware model the measurements ran on: the GPU's name, or the CPU's model name."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measurer(ctx: StageContext):
    """What measures one model: :func:`measure` in a fresh Ray worker process per model, or in this process
    (``ctx.in_process``)."""
    if ctx.in_process:
        def here(*args) -> dict:
            import torch

            threads = torch.get_num_threads()  # measure sets evaluate.threads: this process's own come back after
            try:
                return measure(*args)
            finally:
                torch.set_num_threads(threads)

        return here
    import ray

    remote = _measure_remote(ctx.config)
    return lambda *args: ray.get(remote.remote(*args))


def _measure_remote(cfg: PipelineConfig):
    import ray

    # max_calls=1: a fresh process each time; DEFAULT scheduling: not inside the placement group of a Tune trial
    # that calls this stage (it reserves no CPU for its own tasks)
    resources = {"num_cpus": cfg.evaluate.threads or 1, "max_calls": 1, "scheduling_strategy": "DEFAULT"}
    if cfg.ray.use_gpu:
        resources["num_gpus"] = 1
    return ray.remote(**resources)(measure)


def compare(cfg: PipelineConfig, dense: dict, comp: dict) -> dict[str, float]:
    """The flat metrics of the evaluation: the compressed model's figures, the dense ones as ``dense_*``, ratios."""
    m: dict[str, float] = {}
    for metric in cfg.evaluate.metrics:
        m[metric], m[f"dense_{metric}"] = comp[metric], dense[metric]
    m.update(lm_eval_metrics(cfg, comp.get("lm_eval") or {}))
    m.update(lm_eval_metrics(cfg, dense.get("lm_eval") or {}, prefix="dense_"))
    s0 = str(cfg.prune.budget.seq_len)
    for k in ("params_blocks", "params_total", "flops_blocks", "flops_total"):
        m[k], m[f"dense_{k}"] = comp["counts"][s0][k], dense["counts"][s0][k]
        m[f"{k}_ratio"] = comp["counts"][s0][k] / dense["counts"][s0][k]
    for b, s in grid(cfg):
        p = point(b, s)
        c, d = comp["latency"][p], dense["latency"][p]
        m[f"latency_ms_{p}"], m[f"dense_latency_ms_{p}"] = c["median_ms"], d["median_ms"]
        m[f"throughput_{p}"], m[f"dense_throughput_{p}"] = c["throughput"], d["throughput"]
        speedup = d["median_ms"] / c["median_ms"]
        reduction = dense["counts"][str(s)]["flops_total"] / comp["counts"][str(s)]["flops_total"]
        m[f"speedup_{p}"] = speedup
        m[f"flops_reduction_s{s}"] = reduction
        m[f"speedup_per_flops_reduction_{p}"] = speedup / reduction
        if c["peak_gpu_mb"] is not None:
            m[f"peak_gpu_mb_{p}"], m[f"dense_peak_gpu_mb_{p}"] = c["peak_gpu_mb"], d["peak_gpu_mb"]
    m["peak_rss_mb"], m["dense_peak_rss_mb"] = comp["peak_rss_mb"], dense["peak_rss_mb"]
    m["peak_rss_over_baseline_mb"] = comp["peak_rss_over_baseline_mb"]
    m["dense_peak_rss_over_baseline_mb"] = dense["peak_rss_over_baseline_mb"]
    m["model_mb"], m["dense_model_mb"] = comp["model_mb"], dense["model_mb"]
    record = comp.get("latency_record")
    if record and latency_point(cfg) is not None:  # a latency budget: the table's prediction against this timing
        p = point(*latency_point(cfg))
        m["latency_predicted_ms"] = record["predicted_ms"]
        m["latency_target_ms"] = record["target_ms"]
        m["dense_latency_predicted_ms"] = record["dense_predicted_ms"]
        m["latency_measured_ms"] = comp["latency"][p]["median_ms"]
        m["dense_latency_measured_ms"] = dense["latency"][p]["median_ms"]
        m["latency_measured_over_predicted"] = m["latency_measured_ms"] / record["predicted_ms"]
        m["latency_measured_fraction"] = m["latency_measured_ms"] / m["dense_latency_measured_ms"]
    return m


def lm_eval_metrics(cfg: PipelineConfig, scores: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """The flat ``lm_eval_<task>_<metric>`` figures of one model's lm-eval scores (only the configured tasks: a dense
    measurement is keyed on them, so it has the same)."""
    from vtrans.lm_eval import flat_metrics

    tasks = cfg.evaluate.lm_eval_tasks or []
    return flat_metrics({t: s for t, s in scores.items() if t in tasks}, prefix)


def markdown(cfg: PipelineConfig, m: dict[str, float], device: str) -> str:
    rows = ["| | dense | compressed | compressed / dense |", "|---|---|---|---|"]
    for metric in cfg.evaluate.metrics:
        rows.append(f"| {metric} | {m[f'dense_{metric}']:.4f} | {m[metric]:.4f} | |")
    for key in sorted(k for k in m if k.startswith("lm_eval_")):
        dense = m.get(f"dense_{key}")
        ratio = f"{m[key] / dense:.4f}" if dense and not key.endswith("_samples") else ""
        rows.append(f"| {key} | {'' if dense is None else f'{dense:.4f}'} | {m[key]:.4f} | {ratio} |")
    s0 = cfg.prune.budget.seq_len
    for k in ("params_blocks", "params_total", "flops_blocks", "flops_total"):
        label = k.replace("_", " ") + (f" @{s0}" if k.startswith("flops") else "")
        rows.append(f"| {label} | {int(m[f'dense_{k}']):,} | {int(m[k]):,} | {m[f'{k}_ratio']:.4f} |")
    for b, s in grid(cfg):
        p = point(b, s)
        rows.append(f"| latency ms, batch {b} x seq {s} | {m[f'dense_latency_ms_{p}']:.2f} | "
                    f"{m[f'latency_ms_{p}']:.2f} | speedup {m[f'speedup_{p}']:.2f}x, "
                    f"÷ FLOPs reduction {m[f'flops_reduction_s{s}']:.2f}x = "
                    f"{m[f'speedup_per_flops_reduction_{p}']:.2f} |")
    if "latency_predicted_ms" in m:
        b, s = latency_point(cfg)
        rows.append(f"| latency budget {cfg.prune.budget.value}, batch {b} x seq {s}: predicted / measured ms | "
                    f"{m['dense_latency_predicted_ms']:.2f} / {m['dense_latency_measured_ms']:.2f} | "
                    f"{m['latency_predicted_ms']:.2f} / {m['latency_measured_ms']:.2f} (target "
                    f"{m['latency_target_ms']:.2f}) | measured {m['latency_measured_fraction']:.4f} of dense, "
                    f"{m['latency_measured_over_predicted']:.2f}x the prediction |")
    rows.append(f"| model MB | {m['dense_model_mb']:.1f} | {m['model_mb']:.1f} | "
                f"{m['model_mb'] / m['dense_model_mb']:.4f} |")
    rows.append(f"| peak RSS MB of the measuring process (above its baseline before loading) | "
                f"{m['dense_peak_rss_mb']:.0f} ({m['dense_peak_rss_over_baseline_mb']:.0f}) | "
                f"{m['peak_rss_mb']:.0f} ({m['peak_rss_over_baseline_mb']:.0f}) | |")
    return f"Evaluation of `{cfg.name}` on {device}:\n\n" + "\n".join(rows) + "\n"


def _latency_record(model_dir: str) -> dict | None:
    """The ``latency`` record of a compressed checkpoint's compression.json (a latency budget's prediction)."""
    try:
        return json.loads((Path(model_dir) / "compression.json").read_text()).get("latency")
    except (OSError, ValueError, AttributeError):
        return None


def _dense_file(ctx: StageContext, comp: dict) -> Path:
    """Where the dense measurement for this teacher, test split, evaluate material and hardware is kept (null settings
    left out, as in every stage key: a new optional evaluate setting keeps the measurement)."""
    key = config_hash({"version": VERSION, "teacher": ctx.keys["teacher"], "calibrate": ctx.keys["calibrate"],
                       "material": without_nulls(material(ctx.config)), "device_name": comp["device_name"],
                       "threads": comp["threads"]})
    return Path(ctx.root) / STAGES_DIR / NAME / "dense" / key / "dense.json"


def run(ctx: StageContext, work: Path, inputs: dict[str, StageResult], run_id: str | None) -> StageOutput:
    cfg = ctx.config
    data = Data.of(inputs["calibrate"])
    test, pad = data.splits["test"], data.pad_token_id
    compressed, dense_dir = Trained.of(inputs["finetune"]).model, Trained.of(inputs["teacher"]).model
    measure_one = _measurer(ctx)
    # one after the other: timings taken side by side on shared cores would disturb each other
    tokenizer = str(ctx.model_path) if ctx.model_path else None  # the data's tokenizer (the calibrate stage's)
    comp = measure_one(compressed, cfg.task, test, cfg, pad, "compressed", tokenizer)
    comp["latency_record"] = _latency_record(compressed)
    dense_file = _dense_file(ctx, comp)
    # concurrent trials of one model wait for the first one's measurement (one dense measurement per sweep, and
    # none taken side by side with another)
    with locked(dense_file.with_name("dense.lock")):
        if dense_file.is_file() and NAME not in ctx.rerun:
            dense = json.loads(dense_file.read_text())
            print(f"[{NAME}] dense: measured before on the same {comp['device_name']} ({dense_file})", flush=True)
        else:
            dense = measure_one(dense_dir, cfg.task, test, cfg, pad, "dense", tokenizer)
            _write_json(dense_file, dense)  # atomic: a reader never sees a part
    metrics = compare(cfg, dense, comp)
    report = {"metrics": metrics, "compressed": comp, "dense": dense, "device": comp["device"],
              "threads": comp["threads"], "grid": grid(cfg)}
    (work / "report.json").write_text(json.dumps(report, indent=1))
    md = markdown(cfg, metrics, f"{comp['device']} ({comp['threads']} threads)")
    (work / "report.md").write_text(md)
    q = ", ".join(f"{k} {metrics[k]:.4f} (dense {metrics['dense_' + k]:.4f})" for k in cfg.evaluate.metrics)
    print(f"[{NAME}] {q}; report {work / 'report.md'}", flush=True)
    if "latency_predicted_ms" in metrics:
        print(f"[{NAME}] latency budget: predicted {metrics['latency_predicted_ms']:.2f} ms (target "
              f"{metrics['latency_target_ms']:.2f}), measured {metrics['latency_measured_ms']:.2f} ms", flush=True)
    model_metrics = {k: metrics[k] for k in (*cfg.evaluate.metrics, "params_blocks_ratio", "params_total_ratio",
                                             "flops_total_ratio", *lm_eval_metrics(cfg, comp.get("lm_eval") or {}))}
    return StageOutput(outputs=Evaluation(report_md=str(work / "report.md"), report=str(work / "report.json"),
                                          logged_model_dir=compressed).outputs(),
                       metrics=metrics, info={"model_metrics": model_metrics, "label_names": data.label_names},
                       artifacts=[(str(work / "report.json"), "evaluation"), (str(work / "report.md"), "evaluation")],
                       model_dir=compressed, model_metrics=model_metrics)

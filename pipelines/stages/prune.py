"""Stage 3, prune: the VIB pruning job (:func:`pipelines.train_jobs.run_prune_job`) on the teacher.

``vtrans`` trains on the whole training split, ``fast`` and ``faster`` on the calibration subset. Outputs
(``train/output/``): ``compressed/`` (the physically compressed model with ``compression.json``),
``masks.safetensors`` (the trained posterior: every mask's mu and log-variance, and the budget's selection),
``posterior/`` (the trained weights and masks before compression, :mod:`vtrans.posterior`), ``history.json``; plus
``layers.png``, the kept heads and neurons per layer.

With ``posterior_budget`` set (and not equal to ``prune.budget``) the stage trains nothing itself: it takes the
prune stage of the same pipeline at ``prune.budget = posterior_budget`` (from the cache, or computing it under that
key), re-thresholds that posterior to ``prune.budget`` and compresses it, in seconds.

The masks, the per-layer record and the plot are logged to the stage's MLflow run; the curves (loss, KL, expected
size, lambdas, learning rates) stream in as the job runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from pipelines.config import PipelineConfig, to_dict
from pipelines.plots import plot_layers
from pipelines.stages.base import (
    StageContext,
    StageOutput,
    StageResult,
    execute,
    job_tracking,
    stage_key,
)
from pipelines.stages.products import Data, Pruned, Trained
from pipelines.train_jobs import JobSpec, run_prune_job
from vtrans.checkpoint import geometry_of
from vtrans.errors import ConfigError
from vtrans.train import final_prune_metrics

NAME = "prune"
NEEDS = ("calibrate", "teacher")
VERSION = 2
OPTIONS = {"num_cpus": 0}


def _budget(d: dict) -> dict:
    """A budget's material: without the latency keys when it is no latency budget (the keys of the stages cached
    before latency budgets existed stay what they were)."""
    if d.get("latency") is None:
        return {k: v for k, v in d.items() if k not in ("latency", "batch_size")}
    return d


def material(cfg: PipelineConfig) -> dict:
    prune = to_dict(cfg.prune)
    prune["budget"] = _budget(prune["budget"])
    if not cfg.prune.lora_between_rounds:  # no LoRA fine-tune between rounds: the keys change nothing it computes
        del prune["finetune_method"], prune["lora"]  # (and the stages cached before they existed keep their keys)
    if cfg.posterior is None:
        return {"prune": prune}
    return {"prune": prune, "posterior_budget": _budget(to_dict(cfg.posterior_budget))}


def run(ctx: StageContext, work: Path, inputs: dict[str, StageResult], run_id: str | None) -> StageOutput:
    cfg = ctx.config
    if cfg.posterior is not None:
        return _derive(ctx, work, inputs)
    data, teacher = Data.of(inputs["calibrate"]), Trained.of(inputs["teacher"]).model
    split = "calibration" if cfg.calibrates else "train"
    dataset = data.split(split, cfg.task)
    spec = JobSpec(model_dir=teacher, task=cfg.task, dataset=dataset, pad_token_id=data.pad_token_id,
                   num_labels=data.num_labels, teacher_dir=teacher, tokenizer_dir=teacher)
    total = cfg.prune.total_steps
    print(f"[{NAME}] {cfg.prune.method} to {cfg.prune.budget.describe()} on {len(dataset)} {split} samples, "
          f"{total} steps", flush=True)
    job = run_prune_job(spec, cfg.prune, cfg.ray, "train", work, checkpoint_every=max(1, total // 4),
                        tracking=job_tracking(ctx, run_id, NAME), in_process=ctx.in_process)
    out = Path(job.output)
    metrics = {**final_prune_metrics(job.history or []), "job_wall_s": job.wall_time_s}
    output = _summarise(cfg, work, out, inputs, metrics, {"split": split, "samples": len(dataset),
                                                                   "node_ids": job.node_ids})
    output.tags.update(stall_tags(job.history))
    output.outputs = dataclasses.replace(Pruned.of(output), posterior=str(out / "posterior")).outputs()
    output.artifacts.append((str(out / "history.json"), "train"))
    return output


def stall_tags(history: list[dict]) -> dict[str, str]:
    """``{"vtrans.stalled": message}`` (and the message printed) when the pruning job's expected size had not moved by
    the end of the warm-up (:func:`vtrans.train.stall_message`); ``{}`` otherwise."""
    from vtrans.train import stall_message

    stalled = next((h for h in history if h.get("stalled")), None)
    if stalled is None:
        return {}
    message = stall_message(stalled)
    print(f"[{NAME}] warning: {message}", flush=True)
    return {"vtrans.stalled": message[:250]}


def _summarise(cfg: PipelineConfig, work: Path, out: Path, inputs: dict[str, StageResult], metrics: dict,
               info: dict) -> StageOutput:
    """The stage's output for ``out`` (``compressed/`` and ``masks.safetensors``): kept sizes, the layer plot."""
    num_labels, teacher = Data.of(inputs["calibrate"]).num_labels, Trained.of(inputs["teacher"]).model
    report = json.loads((out / "compressed" / "compression.json").read_text())
    g = geometry_of(teacher, cfg.task, num_labels)
    plot = plot_layers(report, g.heads_per_layer, g.ffn, work / "layers.png",
                       title=f"{cfg.name}: {cfg.prune.method}, {cfg.prune.budget.describe()}")
    dense, kept = report["dense"], report["compressed"]
    metrics = dict(metrics)
    metrics.update({f"{k}_ratio": kept[k] / dense[k] for k in ("params_blocks", "params_total", "flops_blocks",
                                                                 "flops_total")})
    metrics.update({k: float(v) for k, v in kept.items() if k != "seq_len"})
    metrics["hidden_kept"] = report["hidden_size"]["kept"]
    metrics["heads_kept"] = sum(layer["heads"] for layer in report["layers"])
    metrics["ffn_neurons_kept"] = sum(layer["ffn_neurons"] for layer in report["layers"])
    metrics["attention_blocks_kept"] = sum(layer["attention"] for layer in report["layers"])
    metrics["ffn_blocks_kept"] = sum(layer["ffn"] for layer in report["layers"])
    if report.get("latency"):  # a latency budget: the table's prediction (the evaluate stage measures it)
        metrics["latency_predicted_ms"] = report["latency"]["predicted_ms"]
        metrics["latency_predicted_fraction"] = report["latency"]["predicted_ms"] / report["latency"][
            "dense_predicted_ms"]
    return StageOutput(
        outputs=Pruned(compressed=str(out / "compressed"), masks=str(out / "masks.safetensors"),
                       report=str(out / "compressed" / "compression.json"), plot=str(plot)).outputs(),
        metrics=metrics, info={**info, "report": report},
        artifacts=[(str(out / "masks.safetensors"), "masks"), (str(out / "compressed" / "compression.json"), "layers"),
                   (str(plot), "layers")])


def _derive(ctx: StageContext, work: Path, inputs: dict[str, StageResult]) -> StageOutput:
    """``prune.budget`` from the posterior trained at ``posterior_budget``: that pipeline's prune stage (found in the
    cache, or computed here under its own key and lock), re-thresholded and compressed here."""
    from pipelines.stages import BY_NAME
    from vtrans import compress
    from vtrans.checkpoint import load_tokenizer, write_atomically
    from vtrans.posterior import load_posterior, save_masks

    cfg, source_cfg = ctx.config, ctx.config.posterior
    keys = dict(ctx.keys, **{NAME: stage_key(BY_NAME[NAME], source_cfg, {n: ctx.keys[n] for n in NEEDS})})
    # logged as "posterior": a child run of its own beside this stage's (trained here, or cached with a link to the
    # run that trained it), or the "posterior." metrics of a sweep trial's run
    source_ctx = dataclasses.replace(ctx, config=source_cfg, keys=keys, log_as="posterior")
    print(f"[{NAME}] {cfg.prune.budget.describe()} from the posterior trained at "
          f"{source_cfg.prune.budget.describe()} ({source_ctx.stage_dir(NAME)})", flush=True)
    source = execute(BY_NAME[NAME], source_ctx, inputs)
    posterior = Pruned.of(source).posterior
    if not posterior or not Path(posterior).is_dir():
        raise ConfigError(f"posterior_budget: the prune output {source.dir} has no posterior/ to re-threshold")
    t0 = time.perf_counter()
    vib = load_posterior(posterior)
    vib.apply_budget(cfg.prune.budget, method=cfg.prune.method)
    if cfg.prune.reconstruct:
        from pipelines.train_jobs import prune_calibration
        from vtrans.fisher import tune_masks

        data = Data.of(inputs["calibrate"])
        dataset = data.split("calibration" if cfg.calibrates else "train", cfg.task)
        tune_masks(vib, prune_calibration(dataset, cfg.prune, data.pad_token_id))
    tokenizer = load_tokenizer(posterior)
    out = work / "output"
    out.mkdir(parents=True, exist_ok=True)
    save_masks(vib, out / "masks.safetensors")

    def write(directory: Path) -> None:
        compress(vib).save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    write_atomically(out / "compressed", write, overwrite=True)
    # not the posterior's final_expected_size / final_kl: they describe its training at posterior_budget (its own
    # run, or the trial's "posterior." metrics), and read as a missed target under this stage's budget
    metrics = {"derive_wall_s": time.perf_counter() - t0}
    info = {"posterior": {"key": source.key, "dir": source.dir, "run_id": source.run_id,
                          "budget": source_cfg.prune.budget.describe()}}
    output = _summarise(cfg, work, out, inputs, metrics, dict(source.info, **info))
    output.outputs = dataclasses.replace(Pruned.of(output), posterior=posterior).outputs()
    if source.run_id:
        output.tags["vtrans.posterior_run_id"] = source.run_id
    return output

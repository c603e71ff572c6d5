"""Stage 3, prune: the VIB pruning job (:func:`pipelines.train_jobs.run_prune_job`) on the teacher.

``vtrans`` trains on the whole training split, ``fast`` and ``faster`` on the calibration subset. Outputs
(``train/output/``): ``compressed/`` (the physically compressed model with ``compression.json``),
``masks.safetensors`` (the trained posterior: every mask's mu and log-variance, and the budget's selection),
``history.json``; plus ``layers.png``, the kept heads and neurons per layer. The masks, the per-layer record and the
plot are logged to the stage's MLflow run; the curves (loss, KL, expected size, lambdas, learning rates) stream in
as the job runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.config import PipelineConfig, to_dict
from pipelines.plots import plot_layers
from pipelines.stages.base import StageContext, StageOutput, StageResult, job_tracking
from pipelines.stages.calibrate import load_split
from pipelines.train_jobs import JobSpec, geometry_of, run_prune_job

NAME = "prune"
NEEDS = ("calibrate", "teacher")
VERSION = 1
OPTIONS = {"num_cpus": 0}


def material(cfg: PipelineConfig) -> dict:
    return {"prune": to_dict(cfg.prune)}


def run(ctx: StageContext, work: Path, inputs: dict[str, StageResult], run_id: str | None) -> StageOutput:
    cfg = ctx.config
    data, teacher = inputs["calibrate"], inputs["teacher"].outputs["model"]
    split = "calibration" if cfg.calibrates else "train"
    dataset = load_split(data, split, cfg.task)
    spec = JobSpec(model_dir=teacher, task=cfg.task, dataset=dataset, pad_token_id=data.info["pad_token_id"],
                   num_labels=data.info.get("num_labels"), teacher_dir=teacher, tokenizer_dir=teacher)
    total = cfg.prune.total_steps
    print(f"[{NAME}] {cfg.prune.method} to {cfg.prune.budget.describe()} on {len(dataset)} {split} samples, "
          f"{total} steps", flush=True)
    job = run_prune_job(spec, cfg.prune, cfg.ray, "train", work, checkpoint_every=max(1, total // 4),
                        tracking=job_tracking(ctx, run_id, NAME))
    out = Path(job.output)
    report = json.loads((out / "compressed" / "compression.json").read_text())
    g = geometry_of(teacher, cfg.task, data.info.get("num_labels"))
    plot = plot_layers(report, g.heads_per_layer, g.ffn, work / "layers.png",
                       title=f"{cfg.name}: {cfg.prune.method}, {cfg.prune.budget.describe()}")
    dense, kept = report["dense"], report["compressed"]
    metrics = {f"{k}_ratio": kept[k] / dense[k] for k in ("params_blocks", "params_total", "flops_blocks",
                                                            "flops_total")}
    metrics.update({k: float(v) for k, v in kept.items() if k != "seq_len"})
    metrics["hidden_kept"] = report["hidden_size"]["kept"]
    metrics["heads_kept"] = sum(layer["heads"] for layer in report["layers"])
    metrics["ffn_neurons_kept"] = sum(layer["ffn_neurons"] for layer in report["layers"])
    metrics["attention_blocks_kept"] = sum(layer["attention"] for layer in report["layers"])
    metrics["ffn_blocks_kept"] = sum(layer["ffn"] for layer in report["layers"])
    if job.history:
        last = [h for h in job.history if "expected_size" in h]
        if last:
            metrics["final_expected_size"] = last[-1]["expected_size"]
            metrics["final_kl"] = last[-1]["kl"]
    metrics["job_wall_s"] = job.wall_time_s
    return StageOutput(
        outputs={"compressed": str(out / "compressed"), "masks": str(out / "masks.safetensors"),
                 "report": str(out / "compressed" / "compression.json"), "plot": str(plot)},
        metrics=metrics, info={"split": split, "samples": len(dataset), "report": report},
        artifacts=[(str(out / "masks.safetensors"), "masks"), (str(out / "compressed" / "compression.json"), "layers"),
                   (str(plot), "layers"), (str(out / "history.json"), "train")])

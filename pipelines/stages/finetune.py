"""Stage 4, finetune: a data-parallel Ray Train fine-tune of the compressed model on the training split, with logit
distillation from the teacher (``finetune`` section). ``finetune.steps: 0`` passes the pruned model through.

Output: ``train/output/model/`` (the fine-tuned compressed model, loadable with ``trust_remote_code=True``).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.config import PipelineConfig, to_dict
from pipelines.stages.base import StageContext, StageOutput, StageResult, job_tracking
from pipelines.stages.calibrate import load_split
from pipelines.train_jobs import JobSpec, run_finetune_job

NAME = "finetune"
NEEDS = ("calibrate", "teacher", "prune")
VERSION = 1
OPTIONS = {"num_cpus": 0}


def material(cfg: PipelineConfig) -> dict:
    return {"finetune": to_dict(cfg.finetune)}


def run(ctx: StageContext, work: Path, inputs: dict[str, StageResult], run_id: str | None) -> StageOutput:
    cfg = ctx.config
    pruned = inputs["prune"].outputs["compressed"]
    if cfg.finetune.steps == 0:
        return StageOutput(outputs={"model": pruned}, info={"fine_tuned": False})
    data = inputs["calibrate"]
    teacher = inputs["teacher"].outputs["model"]
    spec = JobSpec(model_dir=pruned, task=cfg.task, dataset=load_split(data, "train", cfg.task),
                   pad_token_id=data.info["pad_token_id"], teacher_dir=teacher, tokenizer_dir=pruned)
    job = run_finetune_job(spec, cfg.finetune, cfg.ray, "train", work,
                           checkpoint_every=max(1, cfg.finetune.steps // 4), tracking=job_tracking(ctx, run_id, NAME))
    metrics = {"final_loss": job.history[-1]["loss"], "job_wall_s": job.wall_time_s} if job.history else {}
    return StageOutput(outputs={"model": str(Path(job.output) / "model")}, metrics=metrics,
                       info={"fine_tuned": True, "steps": cfg.finetune.steps},
                       artifacts=[(str(Path(job.output) / "history.json"), "train")])

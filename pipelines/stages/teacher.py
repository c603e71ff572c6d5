"""Stage 2, teacher: the dense model the pruning distils from and the evaluation compares against.

- ``model.teacher`` given: that directory, as it is.
- ``teacher.steps: 0``: the dense model as it is (a pretrained LM is its own teacher).
- otherwise: a data-parallel Ray Train fine-tune of the dense model on the training split (``teacher`` section);
  output ``train/output/model/`` (safetensors + tokenizer).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.config import PipelineConfig, to_dict
from pipelines.stages.base import StageContext, StageOutput, StageResult, job_tracking
from pipelines.stages.fingerprint import model_identity
from pipelines.stages.products import Data, Trained
from pipelines.train_jobs import JobSpec, run_finetune_job
from vtrans.distill import DistillConfig
from vtrans.finetune import FinetuneConfig

NAME = "teacher"
NEEDS = ("calibrate",)
VERSION = 1
OPTIONS = {"num_cpus": 0}  # the Ray Train workers hold the CPUs


def material(cfg: PipelineConfig) -> dict:
    if cfg.model.teacher is not None:
        return {"given": model_identity(cfg.model.teacher)}
    if cfg.teacher.steps == 0:
        return {"dense": model_identity(cfg.model.name)}
    return {"dense": model_identity(cfg.model.name), "teacher": to_dict(cfg.teacher), "task": cfg.task}


def run(ctx: StageContext, work: Path, inputs: dict[str, StageResult], run_id: str | None) -> StageOutput:
    cfg = ctx.config
    if cfg.model.teacher is not None:
        path = cfg.model.teacher  # made absolute by the driver (pipelines.validate.with_absolute_paths)
        return StageOutput(outputs=Trained(path).outputs(), info={"source": "given"})
    if cfg.teacher.steps == 0:
        return StageOutput(outputs=Trained(str(ctx.model_path)).outputs(), info={"source": "dense"})
    data = Data.of(inputs["calibrate"])
    t = cfg.teacher
    finetune = FinetuneConfig(steps=t.steps, lr=t.lr, batch_size=t.batch_size, task=cfg.task, seed=t.seed,
                              distill=DistillConfig(logit_weight=0.0))
    spec = JobSpec(model_dir=str(ctx.model_path), task=cfg.task, dataset=data.split("train", cfg.task),
                   pad_token_id=data.pad_token_id, num_labels=data.num_labels,
                   tokenizer_dir=str(ctx.model_path))
    job = run_finetune_job(spec, finetune, cfg.ray, "train", work, checkpoint_every=max(1, t.steps // 4),
                           tracking=job_tracking(ctx, run_id, NAME), label="teacher", in_process=ctx.in_process)
    history = job.history
    metrics = {"final_loss": history[-1]["loss"], "job_wall_s": job.wall_time_s} if history else {}
    return StageOutput(outputs=Trained(str(Path(job.output) / "model")).outputs(), metrics=metrics,
                       info={"source": "fine-tuned", "steps": t.steps},
                       artifacts=[(str(Path(job.output) / "history.json"), "train")])

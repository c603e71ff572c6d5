"""Stage 4, finetune: a data-parallel Ray Train fine-tune of the compressed model on the training split, with logit
distillation from the teacher (``finetune`` section). ``finetune.steps: 0`` passes the pruned model through.
With ``finetune.eval_every``, ``finetune.eval_samples`` training samples (stratified for seq-cls) are held out of
fine-tuning and the job measures its quality on them as it goes (``val_accuracy`` / ``val_perplexity``: the curve a
sweep's ASHA early stopping compares). The prune stage saw those samples; the fine-tune does not.

``finetune.method: lora`` trains LoRA adapters (``finetune.lora``) on the blocks' Linear layers instead of every
weight, and the job merges them into the weights before saving: the output is the same kind of checkpoint.

Output: ``train/output/model/`` (the fine-tuned compressed model, loaded by vtrans with its installed classes).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Subset

from pipelines.config import PipelineConfig, to_dict
from pipelines.stages.base import StageContext, StageOutput, StageResult, job_tracking
from pipelines.stages.calibrate import TokenizedDataset
from pipelines.stages.products import Data, Pruned, Trained
from pipelines.train_jobs import JobSpec, run_finetune_job
from vtrans.data import train_test_split
from vtrans.errors import ConfigError

NAME = "finetune"
NEEDS = ("calibrate", "teacher", "prune")
VERSION = 1
OPTIONS = {"num_cpus": 0}


def material(cfg: PipelineConfig) -> dict:
    ft = to_dict(cfg.finetune)
    if not ft["eval_every"]:  # nothing held out: the output does not depend on them (and keys stay as they were)
        del ft["eval_every"], ft["eval_samples"]
    if ft["method"] == "full":  # the adapters' settings do not touch a full fine-tune (keys stay as they were)
        del ft["method"], ft["lora"]
    return {"finetune": ft}


def run(ctx: StageContext, work: Path, inputs: dict[str, StageResult], run_id: str | None) -> StageOutput:
    cfg = ctx.config
    pruned = Pruned.of(inputs["prune"]).compressed
    if cfg.finetune.steps == 0:
        return StageOutput(outputs=Trained(pruned).outputs(), info={"fine_tuned": False})
    data = Data.of(inputs["calibrate"])
    teacher = Trained.of(inputs["teacher"]).model
    train, held_out = data.split("train", cfg.task), None
    if cfg.finetune.eval_every:
        train, held_out = hold_out(train, cfg)
    spec = JobSpec(model_dir=pruned, task=cfg.task, dataset=train, pad_token_id=data.pad_token_id,
                   teacher_dir=teacher, tokenizer_dir=pruned, eval_dataset=held_out)
    job = run_finetune_job(spec, cfg.finetune, cfg.ray, "train", work,
                           checkpoint_every=max(1, cfg.finetune.steps // 4), tracking=job_tracking(ctx, run_id, NAME),
                           report_to_tune=ctx.report_to_tune, in_process=ctx.in_process)
    metrics = {"final_loss": job.history[-1]["loss"], "job_wall_s": job.wall_time_s} if job.history else {}
    val = [k for k in (job.history[-1] if job.history else {}) if k.startswith("val_")]
    metrics.update({f"final_{k}": job.history[-1][k] for k in val})
    return StageOutput(outputs=Trained(str(Path(job.output) / "model")).outputs(), metrics=metrics,
                       info={"fine_tuned": True, "steps": cfg.finetune.steps, "node_ids": job.node_ids,
                             "train_samples": len(train), "held_out_samples": len(held_out or ())},
                       artifacts=[(str(Path(job.output) / "history.json"), "train")])


def hold_out(train: TokenizedDataset, cfg: PipelineConfig) -> tuple[Subset, Subset]:
    """``(fine-tuning samples, held-out samples)`` of the training split: ``finetune.eval_samples`` drawn with
    ``finetune.seed``, stratified by label for seq-cls."""
    ft, n = cfg.finetune, len(train)
    if n - ft.eval_samples < ft.batch_size:
        raise ConfigError(f"finetune.eval_samples={ft.eval_samples} leaves {n - ft.eval_samples} of the {n} training "
                          f"samples to fine-tune on, fewer than finetune.batch_size={ft.batch_size}")
    labels = train.labels.tolist() if train.labels is not None else None
    keep, held = train_test_split(n, ft.eval_samples / n, seed=ft.seed, labels=labels)
    return Subset(train, keep), Subset(train, held)

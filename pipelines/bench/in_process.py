"""Training and the pipeline's stages in this process, without Ray: a Ray Train job's loop with one worker, and
every stage as a :class:`LocalStage` (the real stage's name, inputs, key material and code version).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch


def load_model(path: str, task: str, num_labels: int | None, device: str):
    from vtrans.checkpoint import load_pretrained

    kwargs = {"num_labels": num_labels} if num_labels is not None and task == "seq-cls" else {}
    return load_pretrained(path, task=task, dtype=torch.float32, **kwargs).to(device)


def train_in_process(module, dataset, pad_token_id: int, device: str, desc: str) -> list[dict]:
    """The Ray Train job's loop with one worker, in this process: the same global batches (``worker_batch`` with
    world size 1) and per-step seeds, so the result is the 1-worker job's."""
    from pipelines.train_jobs import worker_batch
    from vtrans.progress import Progress
    from vtrans.train import fit

    cfg = module.config

    def batches(step: int) -> dict[str, torch.Tensor]:
        b = worker_batch(dataset, cfg.batch_size, cfg.seed, step, 0, 1, pad_token_id)
        return {k: v.to(device) for k, v in b.items()}

    bar = Progress(total=cfg.total_steps, desc=desc, unit="step")
    try:
        return fit(module, batches, on_step=lambda step, m: bar.update(1, loss=m["loss"]))
    finally:
        bar.close()


def _save(model, directory: Path, tokenizer=None) -> Path:
    from vtrans.checkpoint import write_atomically

    def write(d: Path) -> None:
        model.save_pretrained(d)
        if tokenizer is not None:
            tokenizer.save_pretrained(d)

    directory.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(directory, write, overwrite=True)


class LocalStage:
    """A pipeline stage run in this process: the real stage's name, inputs, key material and code version (so its
    cache key and output folder are the pipeline's), with ``run`` doing the work without Ray."""

    def __init__(self, stage, run: Callable) -> None:
        self.NAME, self.NEEDS, self.VERSION, self.OPTIONS = stage.NAME, stage.NEEDS, stage.VERSION, stage.OPTIONS
        self.material = stage.material
        self.run = run


def _local_teacher(ctx, work: Path, inputs: dict, run_id: str | None, device: str = "cpu"):
    """The teacher stage in this process (:mod:`pipelines.stages.teacher` with its Ray Train job as a loop)."""
    from pipelines.stages.base import StageOutput
    from pipelines.stages.products import Data, Trained
    from vtrans.checkpoint import load_tokenizer
    from vtrans.train import DistillConfig, FinetuneConfig, Finetuner

    cfg = ctx.config
    if cfg.model.teacher is not None:
        return StageOutput(outputs=Trained(cfg.model.teacher).outputs(), info={"source": "given"})
    if cfg.teacher.steps == 0:
        return StageOutput(outputs=Trained(str(ctx.model_path)).outputs(), info={"source": "dense"})
    data, t = Data.of(inputs["calibrate"]), cfg.teacher
    ft = FinetuneConfig(steps=t.steps, lr=t.lr, batch_size=t.batch_size, task=cfg.task, seed=t.seed,
                        distill=DistillConfig(logit_weight=0.0))
    torch.manual_seed(t.seed)  # the new classification head
    model = load_model(str(ctx.model_path), cfg.task, data.num_labels, device)
    history = train_in_process(Finetuner(model, ft), data.split("train", cfg.task), data.pad_token_id, device,
                               "teacher")
    model.eval()
    out = _save(model, work / "model", load_tokenizer(ctx.model_path))
    return StageOutput(outputs=Trained(str(out)).outputs(), metrics={"final_loss": history[-1]["loss"]},
                       info={"source": "fine-tuned", "steps": t.steps, "in_process": True})


def _local_prune(ctx, work: Path, inputs: dict, run_id: str | None, device: str = "cpu"):
    """The prune stage in this process (no posterior reuse)."""
    from pipelines.stages.base import StageOutput
    from pipelines.stages.products import Data, Pruned, Trained
    from vtrans import compress
    from vtrans.checkpoint import load_tokenizer
    from vtrans.train import Pruner

    cfg = ctx.config
    data, teacher_dir = Data.of(inputs["calibrate"]), Trained.of(inputs["teacher"]).model
    split = "calibration" if cfg.calibrates else "train"
    num_labels = data.num_labels
    model = load_model(teacher_dir, cfg.task, num_labels, device)
    teacher = load_model(teacher_dir, cfg.task, num_labels, device) if cfg.prune.method != "faster" else None
    from pipelines.train_jobs import prune_calibration

    pruner = Pruner(model, cfg.prune, teacher)
    dataset = data.split(split, cfg.task)
    train_in_process(pruner, dataset, data.pad_token_id, device, "prune")  # warm start included
    pruner.finish()
    if cfg.prune.reconstruct:
        pruner.reconstruct(prune_calibration(dataset, cfg.prune, data.pad_token_id, device))
    out = _save(compress(pruner.vib).eval(), work / "compressed", load_tokenizer(teacher_dir))
    return StageOutput(outputs=Pruned(str(out)).outputs(), info={"split": split})


def _local_finetune(ctx, work: Path, inputs: dict, run_id: str | None, device: str = "cpu"):
    """The finetune stage in this process."""
    from pipelines.stages.base import StageOutput
    from pipelines.stages.products import Data, Pruned, Trained
    from vtrans.checkpoint import load_tokenizer
    from vtrans.train import Finetuner

    cfg = ctx.config
    pruned = Pruned.of(inputs["prune"]).compressed
    if cfg.finetune.steps == 0:
        return StageOutput(outputs=Trained(pruned).outputs(), info={"fine_tuned": False})
    data, teacher_dir = Data.of(inputs["calibrate"]), Trained.of(inputs["teacher"]).model
    model = load_model(pruned, cfg.task, None, device)
    teacher = load_model(teacher_dir, cfg.task, data.num_labels, device)
    finetuner = Finetuner(model, cfg.finetune, teacher)
    train_in_process(finetuner, data.split("train", cfg.task), data.pad_token_id, device, "finetune")
    out = _save(finetuner.finish(), work / "model", load_tokenizer(pruned))  # lora: the adapters merged
    return StageOutput(outputs=Trained(str(out)).outputs(), info={"fine_tuned": True})


def _local_evaluate(ctx, work: Path, inputs: dict, run_id: str | None, device: str = "cpu"):
    """The evaluate stage in this process: both models measured here, one after the other."""
    from pipelines.stages import evaluate
    from pipelines.stages.base import StageOutput
    from pipelines.stages.products import Data, Evaluation, Trained

    cfg = ctx.config
    data = Data.of(inputs["calibrate"])
    test, pad = data.splits["test"], data.pad_token_id
    comp = evaluate.measure(Trained.of(inputs["finetune"]).model, cfg.task, test, cfg, pad, "compressed")
    dense = evaluate.measure(Trained.of(inputs["teacher"]).model, cfg.task, test, cfg, pad, "dense")
    metrics = evaluate.compare(cfg, dense, comp)
    (work / "report.md").write_text(evaluate.markdown(cfg, metrics, f"{comp['device']} ({comp['threads']} threads)"))
    return StageOutput(outputs=Evaluation(report_md=str(work / "report.md")).outputs(), metrics=metrics)


def local_stages(device: str) -> dict[str, LocalStage]:
    """The work of every pipeline stage that uses Ray, as a :class:`LocalStage` (calibrate needs no Ray: it is the
    stage itself)."""
    from pipelines.stages import evaluate, finetune, prune, teacher

    return {"teacher": LocalStage(teacher, functools.partial(_local_teacher, device=device)),
            "prune": LocalStage(prune, functools.partial(_local_prune, device=device)),
            "finetune": LocalStage(finetune, functools.partial(_local_finetune, device=device)),
            "evaluate": LocalStage(evaluate, functools.partial(_local_evaluate, device=device))}

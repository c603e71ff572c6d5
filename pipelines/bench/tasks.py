"""Per task: data and teacher (the pipeline's own cached ``calibrate`` and ``teacher`` stages) and the dense
reference every cell of the task reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.bench.in_process import LocalStage, _local_teacher, load_model
from pipelines.bench.measure import PeakRSS, _log
from pipelines.bench.profiles import TaskProfile
from pipelines.config import PipelineConfig, from_dict
from vtrans.metrics import measure, task_metric

#: Task, data set and quality metric of each kind of benchmark task.
KINDS = {kind: (task, data, task_metric(task))
         for kind, task, data in (("encoder", "seq-cls", "rotten_tomatoes"), ("decoder", "causal-lm", "wikipedia"))}


#: Headings of the built-in data sets.
DATA_NAMES = {"rotten_tomatoes": "Rotten Tomatoes", "wikipedia": "Wikipedia text", "lee_news": "Lee news stories"}


def task_config(kind: str, t: TaskProfile, out: Path, teacher_workers: int = 1, device: str = "cpu",
                data_name: str | None = None) -> PipelineConfig:
    """The pipeline config whose ``calibrate`` and ``teacher`` stages give this task's data and teacher
    (``data_name``: another built-in data set of the task, e.g. its second text)."""
    task, default_data, _ = KINDS[kind]
    data_name = data_name or default_data
    calibration = ({"fraction": t.calibration_fraction} if t.calibration_fraction is not None
                   else {"count": t.calibration_count})
    data: dict[str, Any] = {"name": data_name, "max_train_samples": t.train_samples,
                            "max_test_samples": t.test_samples, "seed": 0}
    if task == "seq-cls":
        data.update(label_column="label", max_length=t.seq_len, test_fraction=0.1)
    else:
        data.update(seq_len=t.seq_len, test_fraction=0.15)
    model: dict[str, Any] = {"name": t.model, "task": task}
    if task == "seq-cls":
        model["num_labels"] = 2
    return from_dict(PipelineConfig, {
        "name": f"bench-{t.label}", "model": model, "data": data, "calibration": calibration,
        "teacher": {"steps": t.teacher_steps, "lr": t.teacher_lr, "batch_size": t.teacher_batch},
        "ray": {"num_workers": teacher_workers, "use_gpu": device == "cuda"}, "output": str(out)})


@dataclass
class TaskSetup:
    """A task's data, teacher and dense figures: what every cell of the task reads."""

    kind: str
    label: str
    task: str
    metric: str
    splits: dict[str, str]
    sizes: dict[str, int]
    pad_token_id: int
    num_labels: int | None
    teacher_dir: str
    keys: dict[str, str]
    dense: dict[str, Any]
    stages: dict[str, dict] = field(default_factory=dict)
    model_name: str = ""
    data_name: str = ""
    second_name: str = ""
    """The heading of the second text (``TaskProfile.second_text``; its test split is ``splits["second"]``)."""


def prepare_task(kind: str, t: TaskProfile, out: Path, device: str, executor: str = "local",
                 teacher_workers: int = 1) -> TaskSetup:
    """Data (the pipeline's calibrate stage) and teacher (the pipeline's teacher stage: a Ray Train job with
    ``executor=ray``, a loop in this process with ``local``), each found in ``<out>/stages`` when already computed
    (by either); then the dense teacher's quality and exact counts."""
    import vtrans
    from pipelines.stages import calibrate
    from pipelines.stages import teacher as teacher_stage
    from pipelines.stages.base import StageContext, execute, stage_key
    from pipelines.stages.calibrate import load_split
    from pipelines.validate import resolve_model_path, with_absolute_paths

    cfg = with_absolute_paths(task_config(kind, t, out, teacher_workers, device))
    keys = {"calibrate": stage_key(calibrate, cfg, {})}
    keys["teacher"] = stage_key(teacher_stage, cfg, {"calibrate": keys["calibrate"]})
    ctx = StageContext(config=cfg, root=str(out), keys=keys, model_path=str(resolve_model_path(t.model).resolve()))
    stages = {}
    with PeakRSS() as rss:
        data = execute(calibrate, ctx, {})
    stages["data"] = {**rss.as_dict(), "status": data.status, "wall_s": data.wall_s}
    stage = (teacher_stage if executor == "ray"
             else LocalStage(teacher_stage, functools.partial(_local_teacher, device=device)))
    with PeakRSS() as rss:
        teacher = execute(stage, ctx, {"calibrate": data})
    stages["teacher"] = {**rss.as_dict(), "status": teacher.status, "wall_s": teacher.wall_s}
    task, data_name, metric = KINDS[kind]
    num_labels = data.info.get("num_labels")
    model = load_model(teacher.outputs["model"], task, num_labels, device).eval()
    test = load_split(data, "test", task)
    quality = measure(metric, model, test, data.info["pad_token_id"], t.eval_batch)
    dense = {"quality": quality, **vtrans.count(model, seq_len=t.latency.seq_len).as_dict()}
    splits = dict(data.outputs)
    if t.second_text is not None:  # its test chunks only: nothing is trained or calibrated on it
        cfg2 = with_absolute_paths(task_config(kind, t, out, teacher_workers, device, data_name=t.second_text))
        keys["second"] = stage_key(calibrate, cfg2, {})
        second = execute(calibrate, StageContext(config=cfg2, root=str(out), keys={"calibrate": keys["second"]},
                                                 model_path=ctx.model_path), {})
        splits["second"] = second.outputs["test"]
        dense["quality_second"] = measure(metric, model, load_split(second, "test", task), data.info["pad_token_id"],
                                          t.eval_batch)
        _log(f"{t.label}: second text {t.second_text}: dense {metric} {dense['quality_second']:.4f} on "
             f"{int(second.metrics['test_samples'])} chunks")
    sizes = {s: int(data.metrics[f"{s}_samples"]) for s in ("train", "test", "calibration")}
    _log(f"{t.label}: data {data.status}, teacher {teacher.status}; dense {metric} {quality:.4f}, "
         f"params blocks {dense['params_blocks']:,}; " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return TaskSetup(kind=kind, label=t.label, task=task, metric=metric, splits=splits, sizes=sizes,
                     pad_token_id=data.info["pad_token_id"], num_labels=num_labels,
                     teacher_dir=teacher.outputs["model"], keys=keys, dense=dense, stages=stages,
                     model_name=t.model if t.model not in ("minilm", "smollm2") else
                     {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}[t.model],
                     data_name=DATA_NAMES[data_name],
                     second_name=DATA_NAMES[t.second_text] if t.second_text is not None else "")

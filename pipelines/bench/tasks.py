"""Per task: data and teacher (the pipeline's own cached ``calibrate`` and ``teacher`` stages) and the dense
reference every cell of the task reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.bench.in_process import load_model
from pipelines.bench.measure import _log, peak_rss_into
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
    teacher_digest: str = ""
    """sha256 of the teacher's weights (:func:`weights_digest`). The teacher stage's key does not see how it was
    trained (one process or Ray Train workers, whose dropout is drawn per rank: two draws of the teacher), so a cell
    records the digest it was computed against and is not reused against another teacher."""


def weights_digest(directory: str | Path) -> str:
    """sha256 over the contents of a model directory's weight files (``*.safetensors``, ``*.bin``), in name order."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in Path(directory).iterdir() if p.suffix in (".safetensors", ".bin")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def prepare_task(kind: str, t: TaskProfile, out: Path, device: str, executor: str = "local",
                 teacher_workers: int = 1) -> TaskSetup:
    """Data (the pipeline's calibrate stage) and teacher (the pipeline's teacher stage: a Ray Train job with
    ``executor=ray``, its one worker's loop in this process with ``local``), each found in ``<out>/stages`` when
    already computed (by either); then the dense teacher's quality and exact counts."""
    import vtrans
    from pipelines.dag import run_in_process
    from pipelines.stages import calibrate
    from pipelines.stages import teacher as teacher_stage
    from pipelines.stages.base import StageContext, stage_key
    from pipelines.stages.products import Data, Trained
    from pipelines.validate import resolve_model_path, with_absolute_paths

    cfg = with_absolute_paths(task_config(kind, t, out, teacher_workers, device))
    keys = {"calibrate": stage_key(calibrate, cfg, {})}
    keys["teacher"] = stage_key(teacher_stage, cfg, {"calibrate": keys["calibrate"]})
    ctx = StageContext(config=cfg, root=str(out), keys=keys, model_path=str(resolve_model_path(t.model).resolve()),
                       in_process=executor != "ray")
    rss: dict[str, dict] = {}
    results = run_in_process(ctx, ("calibrate", "teacher"), around=functools.partial(peak_rss_into, rss))
    stages = {("data" if name == "calibrate" else name): {**rss[name], "status": r.status, "wall_s": r.wall_s}
              for name, r in results.items()}
    data, teacher_dir = Data.of(results["calibrate"]), Trained.of(results["teacher"]).model
    task, data_name, metric = KINDS[kind]
    model = load_model(teacher_dir, task, data.num_labels, device).eval()
    quality = measure(metric, model, data.split("test", task), data.pad_token_id, t.eval_batch)
    dense = {"quality": quality, **vtrans.count(model, seq_len=t.latency.seq_len).as_dict()}
    splits = dict(data.splits)
    if t.second_text is not None:  # its test chunks only: nothing is trained or calibrated on it
        cfg2 = with_absolute_paths(task_config(kind, t, out, teacher_workers, device, data_name=t.second_text))
        keys["second"] = stage_key(calibrate, cfg2, {})
        second = run_in_process(StageContext(config=cfg2, root=str(out), keys={"calibrate": keys["second"]},
                                             model_path=ctx.model_path), ("calibrate",))["calibrate"]
        splits["second"] = Data.of(second).splits["test"]
        dense["quality_second"] = measure(metric, model, Data.of(second).split("test", task), data.pad_token_id,
                                          t.eval_batch)
        _log(f"{t.label}: second text {t.second_text}: dense {metric} {dense['quality_second']:.4f} on "
             f"{int(second.metrics['test_samples'])} chunks")
    if t.lm_eval_tasks:
        from pipelines.bench.cells import lm_eval_scores
        from vtrans.checkpoint import load_tokenizer

        dense.update(lm_eval_scores(t, model, load_tokenizer(teacher_dir)))
        _log(f"{t.label}: dense lm-eval " + ", ".join(f"{k} {v:.4f}" for k, v in dense.items()
                                                      if k.startswith("lm_eval_")))
    calibrated = results["calibrate"]
    sizes = {s: int(calibrated.metrics[f"{s}_samples"]) for s in ("train", "test", "calibration")}
    _log(f"{t.label}: data {calibrated.status}, teacher {results['teacher'].status}; dense {metric} {quality:.4f}, "
         f"params blocks {dense['params_blocks']:,}; " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return TaskSetup(kind=kind, label=t.label, task=task, metric=metric, splits=splits, sizes=sizes,
                     pad_token_id=data.pad_token_id, num_labels=data.num_labels,
                     teacher_dir=teacher_dir, keys=keys, dense=dense, stages=stages,
                     teacher_digest=weights_digest(teacher_dir),
                     model_name=t.model if t.model not in ("minilm", "smollm2") else
                     {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}[t.model],
                     data_name=DATA_NAMES[data_name],
                     second_name=DATA_NAMES[t.second_text] if t.second_text is not None else "")

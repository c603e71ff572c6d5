"""The benchmark's cells in this process: loading a model, a training loop on the Ray Train job's global batches, and
saving. (The pipeline's own stages run in process through :func:`pipelines.dag.run_in_process` with
``StageContext.in_process``.)
"""

from __future__ import annotations

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

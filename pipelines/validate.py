"""Everything about a pipeline config that can be checked without Ray: the model resolves and is supported, the
budget is reachable for its architecture, the latency grid fits its positions. ``vtrans run`` calls it before Ray
starts; ``vtrans validate`` prints what it found and which stages are already finished.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import PipelineConfig
from pipelines.stages import NAMES, STAGES
from pipelines.stages.base import StageContext, read_record, stage_key
from vtrans.errors import ConfigError, VtransError


@dataclass
class Preflight:
    """What the checks resolved."""

    model_path: str
    """The dense model's local directory (a built-in converted or found, a local directory, a downloaded hub id)."""
    keys: dict[str, str]
    """Cache key of every stage."""


def resolve_model_path(name: str) -> Path:
    """A built-in name or local directory (:func:`vtrans.assets.resolve_model`), else a hub id when a hub is
    reachable (downloaded into the Hugging Face cache)."""
    from vtrans.assets import MODELS, resolve_model

    path = Path(name).expanduser()
    if name in MODELS or path.is_dir():
        try:
            return resolve_model(name)
        except VtransError as e:
            raise ConfigError(f"model.name={name!r}: {e}") from None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all mean the name cannot be used
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.name={name!r} is neither a built-in model nor a local directory, and the hub "
                          f"cannot provide it: {first}") from None


def with_absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """A copy of ``cfg`` whose local paths (data files, teacher, output) are absolute: stage tasks run in Ray workers
    whose working directory is not the driver's."""
    import copy

    from pipelines.config import is_uri

    out = copy.deepcopy(cfg)
    if out.data.files is not None:
        out.data.files = [f if is_uri(f) else str(Path(f).expanduser().resolve()) for f in out.data.files]
    if out.model.teacher is not None:
        out.model.teacher = str(Path(out.model.teacher).expanduser().resolve())
    out.output = str(Path(out.output).expanduser().resolve())
    return out


def plan(cfg: PipelineConfig) -> dict[str, str]:
    """The cache key of every stage, in order."""
    keys: dict[str, str] = {}
    for stage in STAGES:
        keys[stage.NAME] = stage_key(stage, cfg, {n: keys[n] for n in stage.NEEDS})
    return keys


def finished(cfg: PipelineConfig, keys: dict[str, str]) -> dict[str, bool]:
    """Which stages already have a finished output under ``cfg.output``."""
    ctx = StageContext(config=cfg, root=str(Path(cfg.output).resolve()), keys=keys)
    return {name: read_record(ctx.stage_dir(name)) is not None for name in NAMES}


def preflight(cfg: PipelineConfig) -> Preflight:
    """Check everything that needs no cluster; raise a one-line :class:`ConfigError` (or ``BudgetError``)."""
    import vtrans
    from pipelines.train_jobs import check_budget_reachable
    from vtrans.checkpoint import read_config

    model_path = resolve_model_path(cfg.model.name)
    try:
        config = read_config(model_path)
        vtrans.arch.for_config(config)
    except VtransError as e:
        raise ConfigError(f"model.name={cfg.model.name!r}: {e}") from None
    teacher_path = Path(cfg.model.teacher).expanduser().resolve() if cfg.model.teacher else model_path
    if cfg.model.teacher is not None:
        try:
            vtrans.arch.for_config(read_config(teacher_path))
        except VtransError as e:
            raise ConfigError(f"model.teacher={cfg.model.teacher!r}: {e}") from None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int):
        for key, values in (("evaluate.latency_seq_lens", cfg.evaluate.latency_seq_lens),
                            ("prune.budget.seq_len", [cfg.prune.budget.seq_len]),
                            ("data.max_length" if cfg.task == "seq-cls" else "data.seq_len",
                             [cfg.data.max_length if cfg.task == "seq-cls" else cfg.data.seq_len])):
            for v in values:
                if v > limit:
                    raise ConfigError(f"{key} has {v}, more than the model's {limit} positions")
    if cfg.ray.address is None:  # a local Ray gets this machine's CPUs: check the widths before starting it
        cpus = os.cpu_count() or 1
        need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
        if not cfg.ray.use_gpu and need > cpus:
            raise ConfigError(f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker="
                              f"{cfg.ray.cpus_per_worker:g} needs {need:g} CPUs, this machine has {cpus}")
        if (cfg.evaluate.threads or 1) > cpus:
            raise ConfigError(f"evaluate.threads={cfg.evaluate.threads} is more than this machine's {cpus} CPUs")
    check_budget_reachable(str(teacher_path), cfg.task, cfg.prune.budget, cfg.model.num_labels)
    if cfg.posterior is not None:
        try:
            check_budget_reachable(str(teacher_path), cfg.task, cfg.posterior_budget, cfg.model.num_labels)
        except VtransError as e:
            raise type(e)(f"posterior_budget: {e}") from None
    return Preflight(model_path=str(Path(model_path).resolve()), keys=plan(cfg))

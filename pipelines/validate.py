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
from vtrans.errors import ConfigError, VtransError, quote


@dataclass
class Preflight:
    """What the checks resolved."""

    model_path: str
    """The dense model's local directory (a built-in converted or found, a local directory, a downloaded hub id)."""
    keys: dict[str, str]
    """Cache key of every stage."""


def resolve_model_path(name: str, key: str = "model.name") -> Path:
    """A built-in name or local directory (:func:`vtrans.assets.resolve_model`), else a hub id (``org/name``) from the
    local Hugging Face cache or, when a hub is reachable and ``HF_HUB_OFFLINE`` is not set, downloaded into it.
    ``key`` is the argument errors name (``model.name``, ``--model``)."""
    from vtrans.assets import MODELS, resolve_model

    path = Path(name).expanduser()
    if name in MODELS or path.is_dir():
        try:
            return resolve_model(name)
        except VtransError as e:
            raise ConfigError(f"{key}={name!r}: {e}") from None
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                                      local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all mean the name cannot be used
        if offline:
            raise ConfigError(f"{key}={name!r} is neither a built-in model nor a local directory, nor in the local "
                              f"Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids "
                              f"downloading it; download it where the hub is reachable (hf download {name}) or pass "
                              f"a local directory") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}={name!r} is neither a built-in model nor a local directory, and the hub "
                          f"cannot provide it: {first}") from None


def with_absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """A copy of ``cfg`` whose local paths (a model directory, data files, teacher, output) are absolute: stage tasks
    run in Ray workers whose working directory is not the driver's, and a run's recorded config must load anywhere."""
    import copy

    from pipelines.config import is_uri
    from vtrans.assets import MODELS

    out = copy.deepcopy(cfg)
    if out.model.name not in MODELS and Path(out.model.name).expanduser().is_dir():
        out.model.name = str(Path(out.model.name).expanduser().resolve())
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


def _check_tokenizer(name: str) -> None:
    """The dense model's tokenizer (the calibrate stage's) yields only ids its embeddings have: a tokenizer of another
    model fails deep inside a training job otherwise. A model that does not resolve is left to ``preflight``."""
    import vtrans
    from vtrans.assets import MODELS, resolve_model
    from vtrans.checkpoint import load_tokenizer, read_config

    if name not in MODELS and not Path(name).expanduser().is_dir():
        return  # a hub id: resolved (downloaded) by preflight
    try:
        path = resolve_model(name)
        config = read_config(path)
        vtrans.arch.for_config(config)
        tokenizer = load_tokenizer(path)
    except vtrans.VtransError:
        return  # preflight reports it, naming model.name
    vocab = getattr(config, "vocab_size", None)
    if tokenizer is not None and isinstance(vocab, int) and len(tokenizer) > vocab:
        raise vtrans.ConfigError(f"model.name={name!r}: its tokenizer has {len(tokenizer)} tokens, more than the "
                                 f"model's vocab_size={vocab} embeddings; save the model's own tokenizer with it")


def check_before_start(cfg: PipelineConfig) -> None:
    """What a run must refuse before it touches MLflow or starts Ray, beyond the config's own checks: the contents
    of local data files, a tokenizer that fits the model, GPUs for a local Ray, a Ray cluster that answers at the
    address (``ray.address``, else ``$RAY_ADDRESS``, as ``init_ray`` chooses)."""
    import vtrans
    from pipelines.ray_runtime import check_cluster
    from pipelines.sources import check_data

    check_data(cfg)
    _check_tokenizer(cfg.model.name)
    if cfg.evaluate.lm_eval_tasks:  # unknown tasks, or data not reachable offline: refused before any work
        from vtrans.lm_eval import check_tasks

        check_tasks(cfg.evaluate.lm_eval_tasks)
    r = cfg.ray
    key, address = ("ray.address", r.address) if r.address else ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS") or None)
    if address and address != "local":
        check_cluster(address, key)
    elif r.use_gpu and _cuda_devices() < r.num_workers:
        raise vtrans.ConfigError(f"ray.use_gpu=true needs {r.num_workers} GPU(s) for ray.num_workers={r.num_workers} "
                                 f"on a local Ray, but this machine has {_cuda_devices()}; set "
                                 f"ray.use_gpu=false, or ray.address to a cluster with GPUs")


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


#: Copies of the dense model's weights a pipeline writes at most (teacher, posterior, compressed and fine-tuned
#: models, two Train checkpoints per job with optimizer states, logged models), plus room for data and logs.
WEIGHT_COPIES = 10
SPARE_BYTES = 200 * 2**20


def check_output_root(output: str, model_path: str | os.PathLike) -> None:
    """The output root is no protected folder (the current directory or an ancestor, ``$HOME``, the model's directory
    or an ancestor: :func:`vtrans.checkpoint.protected_dir`), can be created and written, and its disk has room for a
    pipeline of this model: a :class:`ConfigError` naming ``output`` before any compute, rather than a full disk
    mid-training."""
    import shutil
    import tempfile

    from vtrans.checkpoint import protected_dir

    root = protected_dir(output, "output", [model_path])  # an OutputError naming output=
    existing = next(p for p in (root, *root.parents) if p.exists())  # checked where it will be created, not made
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".vtrans-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"output={output!r} cannot be written ({type(e).__name__}: {e.strerror or e})") from None
    weights = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
    need = WEIGHT_COPIES * weights + SPARE_BYTES
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(f"output={output!r} has {free / 2**20:,.0f} MiB free; a pipeline of this model needs about "
                          f"{need / 2**20:,.0f} MiB ({WEIGHT_COPIES} copies of its {weights / 2**20:,.0f} MiB of "
                          f"weights and room for data); free space or choose another output")


def check_dense_model(path: str | os.PathLike, config) -> None:
    """A model a pipeline can prune: a supported architecture, weights that match its config.json
    (:func:`vtrans.checkpoint.check_weights_match_config`), and dense - a pipeline's prune stage attaches VIB masks,
    which a vtrans-compressed checkpoint cannot take (:func:`vtrans.vib.attach`): prune its dense source again to
    another budget instead. The caller names the key."""
    import vtrans
    from vtrans.checkpoint import check_weights_match_config

    adapter = vtrans.arch.for_config(config)
    check_weights_match_config(path)
    if adapter.is_compressed(config):
        source = _compressed_from(path)
        raise ConfigError(f"this model is already compressed by vtrans (model_type={config.model_type!r}) and a "
                          f"pipeline prunes its model, which vtrans does not do twice; use the dense model it came from"
                          f"{f' ({quote(source)})' if source else ''} with the new budget")


def _compressed_from(path: str | os.PathLike) -> str | None:
    """The dense model a vtrans checkpoint was compressed from, as compression.json records it."""
    import json

    from vtrans.modeling_vtrans import COMPRESSION_FILE

    try:
        source = json.loads((Path(path) / COMPRESSION_FILE).read_text()).get("source_model")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) else None


def preflight(cfg: PipelineConfig) -> Preflight:
    """Check everything that needs no cluster; raise a one-line :class:`ConfigError` (or ``BudgetError``)."""
    from vtrans.checkpoint import check_reachable_at, read_config

    check_before_start(cfg)
    model_path = resolve_model_path(cfg.model.name)
    try:
        config = read_config(model_path)
        check_dense_model(model_path, config)
    except VtransError as e:  # its own type (CheckpointError, UnsupportedModelError), naming the key
        raise type(e)(f"model.name={quote(cfg.model.name)}: {e}") from None
    teacher_path = Path(cfg.model.teacher).expanduser().resolve() if cfg.model.teacher else model_path
    if cfg.model.teacher is not None:
        try:
            check_dense_model(teacher_path, read_config(teacher_path))
        except VtransError as e:
            raise type(e)(f"model.teacher={quote(cfg.model.teacher)}: {e}") from None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int):
        for key, values in (("evaluate.latency_seq_lens", cfg.evaluate.latency_seq_lens),
                            ("prune.budget.seq_len", [cfg.prune.budget.seq_len]),
                            ("data.max_length" if cfg.task == "seq-cls" else "data.seq_len",
                             [cfg.data.max_length if cfg.task == "seq-cls" else cfg.data.seq_len])):
            for v in values:
                if v > limit:
                    raise ConfigError(f"{key} has {v}, more than the model's {limit} positions")
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):  # a local Ray gets this machine's CPUs
        cpus = os.cpu_count() or 1
        need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
        if not cfg.ray.use_gpu and need > cpus:
            raise ConfigError(f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker="
                              f"{cfg.ray.cpus_per_worker:g} needs {need:g} CPUs, this machine has {cpus}")
        if (cfg.evaluate.threads or 1) > cpus:
            raise ConfigError(f"evaluate.threads={cfg.evaluate.threads} is more than this machine's {cpus} CPUs")
    check_output_root(cfg.output, model_path)
    check_reachable_at(teacher_path, cfg.task, cfg.prune.budget, cfg.model.num_labels)
    # the compressed model keeps the dense one's module names; the fine-tunes between rounds adapt the dense model
    if cfg.finetune.method == "lora" and (cfg.finetune.steps > 0 or cfg.prune.lora_between_rounds):
        from vtrans.lora import check_targets_at

        check_targets_at(teacher_path, cfg.task, cfg.finetune.lora, cfg.model.num_labels)
    if cfg.posterior is not None:
        try:
            check_reachable_at(teacher_path, cfg.task, cfg.posterior_budget, cfg.model.num_labels)
        except VtransError as e:
            raise type(e)(f"posterior_budget: {e}") from None
    return Preflight(model_path=str(Path(model_path).resolve()), keys=plan(cfg))

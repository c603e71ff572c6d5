"""Registering the Pareto-optimal compressed models of a budget sweep in the MLflow model registry.

```python
points = [FrontPoint(model_uri=row["model_uri"], run_id=row["run_id"], quality=row["accuracy"],
                     quality_key="accuracy", higher_is_better=True, params_blocks_ratio=row["ratio"],
                     tags={"budget": "0.5", "method": "vib"}) for row in front_rows]
name = registered_name("{model}-{task}-vtrans", "minilm", "seq-cls")          # "minilm-seq-cls-vtrans"
register_front(tracker.client, name, points, dense_quality=0.912)
mlflow.pyfunc.load_model(f"models:/{name}@smallest-within-1pt")
```

Each front point becomes one model version whose source is the point's logged model (``models:/m-...``); the
aliases chosen by :func:`choose_aliases` (``best``, ``smallest-within-1pt``, ``p<NN>``) name the versions of the
latest registered front. Registering the same front again creates no new versions (idempotent re-runs).

``mlflow.pyfunc.load_model`` loads a version with the installed vtrans (:mod:`pipelines.mlflow_model`); the checkpoint
alone: ``model, tokenizer = load_checkpoint(f"models:/{name}@best", dir)``; the transformers pipeline, checked first:
``load_transformers(f"models:/{name}@best", dir)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import re
import string
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import yaml

from pipelines.tracking import global_tracking_uri
from vtrans.errors import CheckpointError, ConfigError, VtransError

if TYPE_CHECKING:
    import mlflow

#: Aliases this module owns on a registered model; others (``production``, ...) are never touched.
ALIAS_BEST = "best"
ALIAS_SMALLEST = "smallest-within-1pt"
_MANAGED_ALIAS = re.compile(r"best|smallest-within-1pt|p\d+")

#: Version tags set from a :class:`FrontPoint`'s fields; ``FrontPoint.tags`` may not use these keys.
RESERVED_TAGS = ("quality", "quality_key", "params_blocks_ratio")

_PLACEHOLDERS = ("model", "task")
_EPS = 1e-9  # float slack for "within 1 point": 0.91 - 0.01 must admit a quality of 0.90
_MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # what mlflow.register_model sets on the logged model (UI link)


class RegistryError(VtransError, RuntimeError):
    """The model registry did not accept or finish a registration."""


#: Where MLmodel names the Hugging Face checkpoint: the ``transformers`` flavor's folder (pipelines.mlflow_model),
#: or, in models logged before it, the pyfunc artifact ``checkpoint`` (``artifacts/checkpoint``).
CHECKPOINT_ARTIFACT = "checkpoint"


def _checkpoint_folder(mlmodel: dict) -> str:
    flavors = mlmodel["flavors"]
    if "transformers" in flavors:
        return str(flavors["transformers"]["model_binary"])
    return str(flavors["python_function"]["artifacts"][CHECKPOINT_ARTIFACT]["path"])


def _safe_folder(model_uri: str, sub: str) -> None:
    parts = PurePosixPath(sub).parts
    flavor = len(parts) == 1 and parts[0] not in ("..", ".")
    legacy = len(parts) == 2 and parts[0] == "artifacts" and parts[1] not in ("..", ".")
    if not (flavor or legacy):
        raise CheckpointError(f"model {model_uri!r}: MLmodel's checkpoint folder={sub!r} is neither one folder nor "
                              f"artifacts/<name>; refusing to download it")


def _check_models_uri(model_uri: str) -> None:
    if not isinstance(model_uri, str) or not model_uri.startswith("models:/"):
        raise ConfigError(f"model_uri must be a models:/ URI (models:/name@alias, models:/name/3, models:/m-...), "
                          f"got {model_uri!r}")


def _store(tracking_uri: str | None):
    """MLflow's global URI pointed at ``tracking_uri`` for the block (None: left as it is): ModelsArtifactRepository
    resolves a registry alias through the global registry URI whatever URI it is given (MLflow 3.17)."""
    return global_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext()


def _repo(model_uri: str, tracking_uri: str | None):
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    return ModelsArtifactRepository(model_uri, tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def download_checkpoint(model_uri: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """Download only the Hugging Face checkpoint of a logged or registered model (``models:/name@alias``,
    ``models:/name/3``, ``models:/m-...``) into ``dst``, no Python code, and check that it loads safely
    (:func:`vtrans.checkpoint.read_config`: no stored code is run or asked for, complete safetensors)."""
    from mlflow.exceptions import MlflowException

    from vtrans.checkpoint import read_config

    _check_models_uri(model_uri)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with _store(tracking_uri):
        try:
            repo = _repo(model_uri, tracking_uri)
            with tempfile.TemporaryDirectory() as tmp:  # MLmodel names the checkpoint's folder; safe_load: data only
                mlmodel = yaml.safe_load(Path(repo.download_artifacts("MLmodel", dst_path=tmp)).read_text())
            sub = _checkpoint_folder(mlmodel)
        except (MlflowException, OSError, yaml.YAMLError, KeyError, TypeError) as e:
            raise RegistryError(f"model {model_uri!r} has no readable checkpoint folder ({_first_line(e)})") from None
        _safe_folder(model_uri, sub)
        try:
            local = repo.download_artifacts(sub, dst_path=str(dst))
        except (MlflowException, OSError) as e:
            raise RegistryError(f"model {model_uri!r}: {sub!r} cannot be downloaded ({_first_line(e)})") from None
    read_config(local)
    return Path(local)


def load_checkpoint(model_uri: str, dst: str | Path, task: str = "auto", tracking_uri: str | None = None, **kwargs):
    """``(model, tokenizer or None)`` of a logged or registered model, loaded by the installed vtrans from its
    checkpoint alone (:func:`download_checkpoint`); ``kwargs`` go to :func:`vtrans.checkpoint.load_pretrained`
    (e.g. ``dtype=torch.float32``)."""
    from vtrans.checkpoint import load_pretrained, load_tokenizer

    path = download_checkpoint(model_uri, dst, tracking_uri)
    return load_pretrained(path, task=task, **kwargs), load_tokenizer(path)


def load_transformers(model_uri: str, dst: str | Path, tracking_uri: str | None = None, **kwargs):
    """The transformers pipeline of a logged or registered model (``mlflow.transformers.load_model``), after the
    downloaded model was checked: no Python file anywhere in it, and a checkpoint and tokenizer that load without
    stored code (:func:`vtrans.checkpoint.read_config`). MLflow's own loader passes ``trust_remote_code=True`` for a
    class transformers does not ship (every heterogeneous vtrans checkpoint), so it must never see a model that was
    not checked; vtrans's classes come from the installed vtrans (imported here). ``kwargs`` go to
    ``mlflow.transformers.load_model``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    import vtrans  # noqa: F401  (registers vtrans's architectures with the Auto classes)
    from vtrans.checkpoint import check_no_remote_code, read_config

    _check_models_uri(model_uri)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with _store(tracking_uri):
            local = Path(_repo(model_uri, tracking_uri).download_artifacts("", dst_path=str(dst)))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        sub = str(mlmodel["flavors"]["transformers"]["model_binary"])
    except (MlflowException, OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise RegistryError(f"model {model_uri!r} is not a transformers-flavor model ({_first_line(e)})") from None
    _safe_folder(model_uri, sub)
    code = sorted(str(p.relative_to(local)) for p in local.rglob("*.py"))
    if code:
        raise CheckpointError(f"model {model_uri!r} carries Python code {code[0]!r}, which MLflow's transformers "
                              f"loader could run; vtrans never runs code stored with a model")
    for folder in [local / sub, *sorted((local / "components").glob("*"))]:
        check_no_remote_code(folder)
        config = folder / "config.json"
        if config.is_file() and "auto_map" in json.loads(config.read_text()):  # MLflow would follow even vtrans's own
            raise CheckpointError(f"model {model_uri!r}: {str(config)!r} has an auto_map, which MLflow's transformers "
                                  f"loader follows with trust_remote_code=True; vtrans logs none")
    read_config(local / sub)
    return mlflow.transformers.load_model(str(local), **kwargs)


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


@dataclass
class FrontPoint:
    """One Pareto-optimal compressed model of a sweep."""

    model_uri: str
    """``models:/m-...`` URI of the logged pyfunc (:func:`pipelines.stages.base.log_model`)."""
    run_id: str
    """The trial's MLflow run, recorded on the model version."""
    quality: float
    """The quality metric's value, e.g. 0.905 accuracy or 12.3 perplexity."""
    quality_key: str
    """Name of the quality metric, e.g. ``"accuracy"`` or ``"perplexity"``."""
    higher_is_better: bool
    """True for accuracy-like metrics, False for perplexity-like ones."""
    params_blocks_ratio: float
    """Kept fraction of the transformer blocks' parameters, in [0, 1]."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra version tags (budget, method, kl_weight, params, flops, speedup, ...); values are stringified."""

    def __post_init__(self) -> None:
        if not isinstance(self.model_uri, str) or not re.fullmatch(r"models:/m-[\w-]+", self.model_uri):
            raise ConfigError(f"FrontPoint.model_uri must look like 'models:/m-...', got {self.model_uri!r}")
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ConfigError(f"FrontPoint.run_id must be a non-empty run id, got {self.run_id!r}")
        if not _finite(self.quality):
            raise ConfigError(f"FrontPoint.quality must be a finite number, got {self.quality!r}")
        if not isinstance(self.quality_key, str) or not self.quality_key:
            raise ConfigError(f"FrontPoint.quality_key must be a non-empty string, got {self.quality_key!r}")
        r = self.params_blocks_ratio
        if not _finite(r) or not 0.0 <= r <= 1.0:
            raise ConfigError(f"FrontPoint.params_blocks_ratio must be a number in [0, 1], got {r!r}")
        clash = sorted(set(self.tags) & set(RESERVED_TAGS))
        if clash:
            raise ConfigError(f"FrontPoint.tags may not set {clash} (they come from the point's fields), "
                              f"got tags={self.tags!r}")
        self.quality = float(self.quality)
        self.params_blocks_ratio = float(self.params_blocks_ratio)

    def version_tags(self) -> dict[str, str]:
        """``tags`` plus the quality and size fields, all as strings (MLflow tag values)."""
        return {**{str(k): str(v) for k, v in self.tags.items()}, "quality": repr(self.quality),
                "quality_key": self.quality_key, "params_blocks_ratio": repr(self.params_blocks_ratio)}


def registered_name(template: str, model: str, task: str) -> str:
    """The registered model name from a template with ``{model}`` and ``{task}`` placeholders, sanitised for MLflow:
    every run of characters other than letters, digits, ``.``, ``_`` and ``-`` becomes one ``-`` (so a Hugging Face
    id ``org/name`` gives ``org-name``; MLflow refuses ``/`` and ``:`` and URIs break on ``@``), and leading or
    trailing ``-._`` are stripped. Case is kept.

    >>> registered_name("{model}-{task}-vtrans", "minilm", "seq-cls")
    'minilm-seq-cls-vtrans'
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"registry name template {template!r} is not a valid format string ({e})") from None
    for f in fields:
        if f not in _PLACEHOLDERS:
            raise ConfigError(f"registry name template {template!r} has unknown placeholder {{{f}}}; "
                              f"use {', '.join('{' + p + '}' for p in _PLACEHOLDERS)}")
    try:
        raw = template.format(model=model, task=task)
    except (ValueError, TypeError) as e:  # a format spec or conversion the values cannot take
        raise ConfigError(f"registry name template {template!r} cannot be filled ({e})") from None
    name = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", raw)).strip("-._")
    if not name:
        raise ConfigError(f"registry name template {template!r} gives an empty name for model={model!r}, "
                          f"task={task!r}")
    return name


def _check_points(points: list[FrontPoint]) -> None:
    for key in ("higher_is_better", "quality_key"):
        values = {getattr(p, key) for p in points}
        if len(values) > 1:
            raise ConfigError(f"front points disagree on {key}: {sorted(values, key=str)}; one front has one metric")


def _pct(ratio: float) -> int:
    """Whole percent, halves rounded up (Python's ``round`` would send 0.125 to 12 and 0.135 to 14)."""
    return math.floor(ratio * 100.0 + 0.5 + _EPS)


def choose_aliases(points: list[FrontPoint], dense_quality: float | None, within: float = 0.01) -> dict[str, int]:
    """Alias -> index into ``points``. "Better" quality means higher, or lower when ``higher_is_better`` is False.

    Rules:
      - ``best``: the best quality; ties -> smaller ``params_blocks_ratio``, then the lower index.
      - ``smallest-within-1pt``: the smallest ``params_blocks_ratio`` whose quality is within ``within`` of the
        dense model's ``dense_quality``; ties -> better quality, then the lower index. For higher-is-better
        metrics ``within`` is absolute (0.01 = one accuracy point): ``quality >= dense - within``. For
        lower-is-better metrics (perplexity, whose scale varies by model) it is relative:
        ``quality <= dense + within * |dense|`` (0.01 = 1 % of the dense perplexity). Absent when
        ``dense_quality`` is None or no point qualifies. Comparisons have a 1e-9 slack for float rounding.
      - ``p<NN>``: NN = the point's ``params_blocks_ratio`` in whole percent (halves round up), so every point
        gets one; when several points share an NN, the one nearest NN % wins (ties -> better quality, then the
        lower index) and the others get no ``p`` alias.
      - No points -> ``{}``. All points must share ``quality_key`` and ``higher_is_better``.
    """
    if not _finite(within) or within < 0:
        raise ConfigError(f"within must be a number >= 0, got {within!r}")
    if not points:
        return {}
    _check_points(points)
    sign = 1.0 if points[0].higher_is_better else -1.0
    n = range(len(points))

    def better_first(i: int) -> float:  # sort key: smaller is better quality
        return -sign * points[i].quality

    aliases = {ALIAS_BEST: min(n, key=lambda i: (better_first(i), points[i].params_blocks_ratio, i))}
    if dense_quality is not None:
        if not _finite(dense_quality):
            raise ConfigError(f"dense_quality must be a finite number or None, got {dense_quality!r}")
        if sign > 0:
            ok = [i for i in n if points[i].quality >= dense_quality - within - _EPS]
        else:
            ok = [i for i in n if points[i].quality <= dense_quality + within * abs(dense_quality) + _EPS]
        if ok:
            aliases[ALIAS_SMALLEST] = min(ok, key=lambda i: (points[i].params_blocks_ratio, better_first(i), i))
    by_pct: dict[int, list[int]] = {}
    for i in n:
        by_pct.setdefault(_pct(points[i].params_blocks_ratio), []).append(i)
    for pct in sorted(by_pct):
        aliases[f"p{pct}"] = min(
            by_pct[pct], key=lambda i: (abs(points[i].params_blocks_ratio - pct / 100.0), better_first(i), i)
        )
    return aliases


def _is_not_found(e: Exception) -> bool:
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _ensure_registered_model(client: mlflow.MlflowClient, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if not _is_not_found(e):
            raise
        try:
            client.create_registered_model(name, description=description or None)
            return
        except MlflowException as e2:  # created meanwhile by a concurrent registration
            if getattr(e2, "error_code", None) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
            model = client.get_registered_model(name)
    if description and model.description != description:
        client.update_registered_model(name, description=description)


def _versions_by_source(client: mlflow.MlflowClient, name: str) -> dict[str, int]:
    """Source URI -> lowest live version number of ``name`` (failed registrations are left out)."""
    if "'" in name and '"' in name:
        raise ConfigError(f"registered model name {name!r} may not contain both ' and \" (registry search quoting)")
    quoted = f'"{name}"' if "'" in name else f"'{name}'"
    out: dict[str, int] = {}
    token = None
    while True:
        page = client.search_model_versions(f"name = {quoted}", page_token=token)
        for mv in page:
            if mv.name == name and mv.status != "FAILED_REGISTRATION" and mv.source:
                out[mv.source] = min(int(mv.version), out.get(mv.source, int(mv.version)))
        token = page.token
        if not token:
            return out


def _wait_ready(client: mlflow.MlflowClient, name: str, version: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        mv = client.get_model_version(name, str(version))
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION":
            raise RegistryError(f"model version {name} v{version} failed to register: {mv.status_message!r}")
        if time.monotonic() > deadline:
            raise RegistryError(f"model version {name} v{version} is still {mv.status} after {timeout_s:.0f}s")
        time.sleep(0.5)


def _link_logged_model(client: mlflow.MlflowClient, model_id: str, name: str, version: int) -> None:
    """Record the version on the logged model, as ``mlflow.register_model`` does (the UI links them by it)."""
    with contextlib.suppress(Exception):  # a cosmetic link: never fail a registration over it
        existing = client.get_logged_model(model_id).tags.get(_MODEL_VERSIONS_TAG)
        links = json.loads(existing) if existing else []
        entry = {"name": name, "version": str(version)}
        if entry not in links:
            client.set_logged_model_tags(model_id, {_MODEL_VERSIONS_TAG: json.dumps([*links, entry])})


def register_front(
    client: mlflow.MlflowClient,
    name: str,
    points: list[FrontPoint],
    dense_quality: float | None,
    description: str = "",
    timeout_s: float = 300.0,
) -> list[dict]:
    """Register each front point as a version of ``name`` and point the aliases of :func:`choose_aliases` at them.

    - Creates the registered model if missing (``description`` is set when given).
    - One version per point: ``source`` = the point's ``models:/m-...`` URI (``model_id`` and ``run_id`` passed
      too), exactly what ``mlflow.register_model(model_uri, name)`` records; waits until READY. A point whose
      ``model_uri`` is already the source of a version of ``name`` reuses it (re-runs create nothing new).
    - Version tags: ``point.tags`` plus ``quality``, ``quality_key`` and ``params_blocks_ratio`` (also refreshed
      on reused versions).
    - Aliases describe the front registered last: ``best``, ``smallest-within-1pt`` and ``p<NN>`` are moved to
      this front's versions, and any such alias this front does not produce (a ``smallest-within-1pt`` when no
      point is within reach of the dense model now, a ``p30`` of an earlier sweep) is deleted. Other aliases are
      left alone.

    Returns one ``{"version": int, "aliases": [str, ...], "model_uri": str}`` per point, in ``points`` order.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"registered model name must be a non-empty string, got {name!r}")
    aliases = choose_aliases(points, dense_quality)  # validates before anything is written
    _ensure_registered_model(client, name, description)
    existing = _versions_by_source(client, name)

    versions: list[int] = []
    for point in points:
        tags = point.version_tags()
        version = existing.get(point.model_uri)
        if version is None:
            model_id = point.model_uri[len("models:/"):]
            # MLflow 3.17's SQL registry store resolves a ``models:/m-...`` source through a default
            # ``MlflowClient()`` (a TODO in ``SqlAlchemyStore.create_model_version``): the process-global URI
            with global_tracking_uri(client.tracking_uri):
                mv = client.create_model_version(name, source=point.model_uri, run_id=point.run_id, tags=tags,
                                                 await_creation_for=0, model_id=model_id)
            version = int(mv.version)
            existing[point.model_uri] = version
            _wait_ready(client, name, version, timeout_s)
            _link_logged_model(client, model_id, name, version)
        else:
            _wait_ready(client, name, version, timeout_s)
            current = client.get_model_version(name, str(version)).tags
            for key, value in tags.items():
                if current.get(key) != value:
                    client.set_model_version_tag(name, str(version), key, value)
        versions.append(version)

    wanted = {alias: versions[i] for alias, i in aliases.items()}
    current_aliases = {a: int(v) for a, v in client.get_registered_model(name).aliases.items()}
    for alias in sorted(current_aliases):
        if _MANAGED_ALIAS.fullmatch(alias) and alias not in wanted:
            client.delete_registered_model_alias(name, alias)
    for alias, version in wanted.items():
        if current_aliases.get(alias) != version:
            client.set_registered_model_alias(name, alias, str(version))

    return [{"version": v, "aliases": [a for a, i in aliases.items() if i == k], "model_uri": p.model_uri}
            for k, (p, v) in enumerate(zip(points, versions, strict=True))]


__all__ = ["FrontPoint", "RegistryError", "choose_aliases", "register_front", "registered_name"]

"""Pipeline configuration: one YAML file per pipeline, loaded into typed dataclasses, with ``key=value`` overrides.

```python
from pipelines.config import load_config, flatten, config_hash
cfg = load_config("pipelines/configs/minilm-rotten-tomatoes.yaml", ["prune.budget.params=0.3", "ray.num_workers=1"])
cfg.prune.budget            # Budget(params=0.3, scope='blocks', ...)
flatten(cfg)                # {"prune.budget.params": "0.3", ...}: MLflow params; each item is a valid override
config_hash(cfg.prune)      # 16 hex digits of the section's canonical JSON: a stage cache key
```

Rules (torchtune / litgpt style):

- Sections are dataclasses whose fields carry docstrings; ``prune``, ``finetune`` and ``ray`` are the library's
  :class:`vtrans.train.PruneConfig`, :class:`~vtrans.train.FinetuneConfig` and
  :class:`pipelines.train_jobs.RayConfig`. A nested mapping is built from the nested class's own defaults.
- :func:`from_dict` checks every key and type against the dataclass annotations: an unknown key is an error that names
  the full dotted key and suggests the closest valid one; ``int`` takes integers only (not ``true``), ``float`` takes
  integers too, ``bool`` only ``true`` / ``false``. Every message names the full key and the value.
- YAML is read with YAML 1.2 scalars: ``1e-4`` is a float (PyYAML's YAML 1.1 reads it as a string), and only
  ``true`` / ``false`` are booleans (``yes`` / ``no`` / ``on`` / ``off`` stay strings). A key repeated in one
  mapping is an error.
- Overrides (``prune.budget.params=0.3``, ``data.files=[a.csv,b.csv]``, ``tracking.uri=`` for null) are parsed as
  YAML and merged into the file's mapping before anything is built; the last override of a key wins. Keys that
  exclude each other - ``params`` / ``flops`` of a budget, ``fraction`` / ``count`` of the calibration, ``name`` /
  ``files`` of the data - replace each other: ``prune.budget.flops=0.4`` on a file with ``params: 0.5`` drops
  ``params``. Giving both in the overrides themselves is the usual "exactly one" error.
- The task has one owner, ``model.task`` (``auto``: from the data). ``prune.task`` and ``finetune.task`` follow it, as
  does ``prune.calibration_fraction`` the ``calibration`` section: left out, they are set from their owner; written
  out, they must agree with it. After loading, ``model.task``, ``calibration.stratified`` and ``evaluate.metrics``
  are always concrete.
- Everything is checked in :func:`load_config`, before any Ray or MLflow work; this module imports neither.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from pipelines.train_jobs import RayConfig
from vtrans.assets import DATASETS, MODELS
from vtrans.checkpoint import TOKENIZER_FILES, has_tokenizer
from vtrans.config import Budget
from vtrans.errors import KIND_WORDS, ConfigError, path_kind, quote
from vtrans.train import MAX_STEPS, TASKS, FinetuneConfig, PruneConfig

__all__ = [
    "CalibrationConfig",
    "DataConfig",
    "EvaluateConfig",
    "ModelConfig",
    "PipelineConfig",
    "TeacherConfig",
    "TrackingConfig",
    "config_hash",
    "flatten",
    "from_dict",
    "load_config",
    "merge_overrides",
    "parse_overrides",
    "read_yaml",
    "to_dict",
]

T = TypeVar("T")

#: Most classes of a classification head (``model.num_labels``, or the largest class id + 1 in the data).
MAX_NUM_LABELS = 10_000
#: Most timed forward passes per latency cell (``evaluate.latency_repeats``) and untimed ones (``evaluate.warmup``).
MAX_LATENCY_REPEATS = 10_000
#: Largest batch at which latency is timed (``evaluate.latency_batch_sizes``) or quality evaluated
#: (``evaluate.batch_size``).
MAX_EVAL_BATCH = 4096

#: Quality metrics of each task (``evaluate.metrics``).
METRICS: dict[str, tuple[str, ...]] = {"seq-cls": ("accuracy",), "causal-lm": ("perplexity",)}
#: Task of each built-in data set.
DATASET_TASKS: dict[str, str] = {"rotten_tomatoes": "seq-cls", "wikipedia": "causal-lm"}
#: Columns of each built-in data set (text, label).
DATASET_COLUMNS: dict[str, tuple[str, str | None]] = {"rotten_tomatoes": ("text", "label"), "wikipedia": ("text", None)}
#: Local data file formats by suffix (``.jsonl`` is read as JSON lines).
FILE_FORMATS: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_uri(path: str) -> bool:
    """``scheme://...`` (a remote file for Ray Data), not a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


# ---------------------------------------------------------------------------------------------------------------------
# value checks shared by the sections (they run on direct construction too, not only when loading YAML)
# ---------------------------------------------------------------------------------------------------------------------


def _int(key: str, value: object, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an int, got {quote(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be an int >= {minimum}, got {quote(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be at most {maximum:,}, got {quote(value)}")


def _number(key: str, value: object, low: float, high: float, low_open: bool = True, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {quote(value)}")
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be in {interval}, got {quote(value)}")


def _text(key: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string, got {quote(value)}")


def _choice(key: str, value: object, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} must be one of {choices}, got {quote(value)}{hint}")


def _int_list(key: str, values: object, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{key} must be a non-empty list of ints, got {quote(values)}")
    for i, v in enumerate(values):
        _int(f"{key}[{i}]", v, minimum, maximum)
    if len(set(values)) != len(values):
        raise ConfigError(f"{key} lists a value twice: {values!r}")


# ---------------------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The dense model to compress."""

    name: str
    """A built-in model (``minilm``: all-MiniLM-L6-v2, ``smollm2``: SmolLM2-135M-Instruct), a local Hugging Face
    directory, or a hub id ``org/name`` (resolved at run time; nothing is downloaded here)."""
    task: Literal["seq-cls", "causal-lm", "auto"] = "auto"
    """``seq-cls`` (sequence classification head), ``causal-lm`` or ``auto`` (from the data: labels -> seq-cls).
    Owns the task of every stage: ``prune.task`` and ``finetune.task`` follow it."""
    num_labels: int | None = None
    """Classes of the classification head (>= 2, at most :data:`MAX_NUM_LABELS` = 10,000); None: from the data (its
    largest class id + 1, the same maximum). Must be None for causal-lm."""
    teacher: str | None = None
    """Local directory of an already fine-tuned dense teacher; None: the ``teacher`` section fine-tunes one."""

    def __post_init__(self) -> None:
        _text("model.name", self.name)
        path = Path(self.name).expanduser()
        kind = None if self.name in MODELS else path_kind("model.name", self.name)
        if self.name not in MODELS and kind != "dir":
            # org/name is a hub id unless it names a file or "org" is a local directory (then it is a wrong path)
            if not _HUB_ID.match(self.name) or kind or path_kind("model.name", str(path.parent)) == "dir":
                close = difflib.get_close_matches(self.name, list(MODELS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"model.name must be a built-in model {sorted(MODELS)}, a local Hugging Face "
                                  f"directory or a hub id org/name, got {quote(self.name)} "
                                  f"({'no such directory' if kind is None else KIND_WORDS[kind]}){hint}")
        elif self.name not in MODELS and (path / "config.json").is_file() and not has_tokenizer(path):
            # the calibrate stage tokenizes with the dense model's tokenizer: refuse before anything starts
            raise ConfigError(f"model.name={self.name!r} has no tokenizer (none of {list(TOKENIZER_FILES)}); save "
                              f"one into it with tokenizer.save_pretrained({self.name!r})")
        _choice("model.task", self.task, (*TASKS, "auto"))
        if self.num_labels is not None:
            _int("model.num_labels", self.num_labels, 2, MAX_NUM_LABELS)
        if self.teacher is not None:
            _text("model.teacher", self.teacher)
            kind = path_kind("model.teacher", self.teacher)
            if kind != "dir":
                raise ConfigError(f"model.teacher must be a local directory holding a fine-tuned teacher, got "
                                  f"{quote(self.teacher)} "
                                  f"({'no such directory' if kind is None else KIND_WORDS[kind]})")


@dataclass
class DataConfig:
    """The training and test data: a built-in data set or local files, split into train and test."""

    name: Literal["rotten_tomatoes", "wikipedia"] | None = None
    """Built-in data set: ``rotten_tomatoes`` (12,752 labelled snippets, seq-cls) or ``wikipedia`` (106 articles,
    causal-lm). Exactly one of ``name`` and ``files``."""
    files: list[str] | None = None
    """Data files, all of one format: ``.csv``, ``.json``, ``.jsonl`` or ``.parquet``; local paths (relative to the
    working directory) or URIs Ray Data reads (``s3://``, ``gs://``, ``abfs://``, ...). Exactly one of ``name`` and
    ``files``."""
    reader: Literal["auto", "pyarrow", "ray"] = "auto"
    """How ``files`` are read: ``pyarrow`` in the calibrate task, or ``ray`` (Ray Data, reading in parallel across
    the cluster); ``auto``: Ray Data for URIs or more than 1 GiB of local files, else pyarrow (much faster for a few
    MB)."""
    text_column: str = "text"
    """Column holding the text (the built-in sets use ``text``)."""
    label_column: str | None = None
    """Column of integer class labels: required for seq-cls on ``files``, null for causal-lm (``rotten_tomatoes``:
    ``label`` or null)."""
    test_fraction: float = 0.1
    """Share of the samples (documents for causal-lm) held out for evaluation, stratified by label for seq-cls."""
    max_length: int = 128
    """seq-cls: texts are truncated to this many tokens."""
    seq_len: int = 128
    """causal-lm: the token stream is cut into chunks of this many tokens."""
    max_train_samples: int | None = None
    """Use at most this many training samples (texts or chunks; a stratified subset for seq-cls); None: all."""
    max_test_samples: int | None = None
    """Evaluate on at most this many test samples (a seeded, stratified for seq-cls, subset of the test split)."""
    seed: int = 0
    """Seed of the train/test split and of the training subset."""

    def __post_init__(self) -> None:
        if (self.name is None) == (self.files is None):
            raise ConfigError(f"data needs exactly one of data.name or data.files, got data.name={self.name!r}, "
                              f"data.files={self.files!r}")
        if self.name is not None:
            _choice("data.name", self.name, DATASETS)
        if self.files is not None:
            if not isinstance(self.files, list) or not self.files:
                raise ConfigError(f"data.files must be a non-empty list of paths, got {quote(self.files)}")
            formats = set()
            for i, f in enumerate(self.files):
                _text(f"data.files[{i}]", f)
                path = Path(f).expanduser()
                suffix = path.suffix.lower()
                if suffix not in FILE_FORMATS:
                    raise ConfigError(f"data.files[{i}] must end in one of {sorted(FILE_FORMATS)}, got {quote(f)}")
                if is_uri(f):
                    if self.reader == "pyarrow":
                        raise ConfigError(f"data.files[{i}]={f!r} is a URI, which data.reader='pyarrow' cannot read; "
                                          f"use data.reader=ray (or auto)")
                elif (kind := path_kind(f"data.files[{i}]", f)) is None:
                    raise ConfigError(f"data.files[{i}] does not exist: {quote(f)} (relative to {Path.cwd()})")
                elif kind != "file":
                    raise ConfigError(f"data.files[{i}]={quote(f)} is {KIND_WORDS[kind]}, not a data file; give "
                                      f"the files themselves (a FIFO or device cannot be read twice)")
                formats.add(FILE_FORMATS[suffix])
            if len(formats) > 1:
                raise ConfigError(f"data.files must all have one format, got {sorted(formats)} in {self.files!r}")
        _choice("data.reader", self.reader, ("auto", "pyarrow", "ray"))
        _text("data.text_column", self.text_column)
        if self.label_column is not None:
            _text("data.label_column", self.label_column)
            if self.label_column == self.text_column:
                raise ConfigError(f"data.label_column must differ from data.text_column, got "
                                  f"{quote(self.label_column)}")
        _number("data.test_fraction", self.test_fraction, 0.0, 1.0, high_open=True)
        _int("data.max_length", self.max_length, 1)
        _int("data.seq_len", self.seq_len, 2)
        if self.max_train_samples is not None:
            _int("data.max_train_samples", self.max_train_samples, 1)
        if self.max_test_samples is not None:
            _int("data.max_test_samples", self.max_test_samples, 1)
        _int("data.seed", self.seed)


@dataclass
class CalibrationConfig:
    """The calibration subset of the training data on which ``fast`` and ``faster`` prune (``vtrans`` uses it all)."""

    fraction: float | None = None
    """Share of the training samples, in (0, 1]. Exactly one of ``fraction`` and ``count``; neither: 0.03 (3%)."""
    count: int | None = None
    """Number of training samples (>= 1). Exactly one of ``fraction`` and ``count``."""
    stratified: bool | None = None
    """Keep each class's share (seq-cls only); None: true for seq-cls, false for causal-lm."""
    seed: int = 0
    """Seed of the subset draw."""

    def __post_init__(self) -> None:
        if self.fraction is None and self.count is None:
            self.fraction = 0.03
        if self.fraction is not None and self.count is not None:
            raise ConfigError(f"calibration needs exactly one of calibration.fraction or calibration.count, got "
                              f"calibration.fraction={self.fraction!r}, calibration.count={self.count!r}")
        if self.fraction is not None:
            _number("calibration.fraction", self.fraction, 0.0, 1.0)
        if self.count is not None:
            _int("calibration.count", self.count, 1)
        if self.stratified is not None and not isinstance(self.stratified, bool):
            raise ConfigError(f"calibration.stratified must be true, false or null, got {quote(self.stratified)}")
        _int("calibration.seed", self.seed)


@dataclass
class TeacherConfig:
    """Fine-tuning of the dense model into the distillation teacher (only when ``model.teacher`` is not given)."""

    steps: int = 0
    """Fine-tuning steps (at most ``vtrans.train.MAX_STEPS`` = 1,000,000); 0: the dense model is the teacher as it is
    (e.g. a pretrained LM)."""
    lr: float = 1e-4
    """Learning rate."""
    batch_size: int = 32
    """Batch size over all workers (a multiple of ``ray.num_workers``)."""
    seed: int = 0
    """Seed of the data order and of the new classification head."""

    def __post_init__(self) -> None:
        _int("teacher.steps", self.steps, 0, MAX_STEPS)
        _number("teacher.lr", self.lr, 0.0, math.inf, high_open=True)
        _int("teacher.batch_size", self.batch_size, 1)
        _int("teacher.seed", self.seed)


@dataclass
class EvaluateConfig:
    """Quality and latency of the dense and the compressed model."""

    metrics: list[str] | None = None
    """Quality metrics: ``accuracy`` for seq-cls, ``perplexity`` for causal-lm; None: the task's."""
    batch_size: int = 32
    """Batch size of the quality evaluation (at most :data:`MAX_EVAL_BATCH` = 4096)."""
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    """Batch sizes at which forward latency is timed (each at most :data:`MAX_EVAL_BATCH` = 4096)."""
    latency_seq_lens: list[int] = field(default_factory=lambda: [128])
    """Sequence lengths at which forward latency is timed (every pair with ``latency_batch_sizes``; at most the
    model's positions)."""
    latency_repeats: int = 20
    """Timed forward passes per (batch size, sequence length), at most :data:`MAX_LATENCY_REPEATS` = 10,000; the
    median is reported."""
    warmup: int = 3
    """Untimed forward passes before timing (at most :data:`MAX_LATENCY_REPEATS`)."""
    threads: int | None = None
    """CPU threads for timing (``torch.set_num_threads``); None: torch's default."""

    def __post_init__(self) -> None:
        if self.metrics is not None:
            if not isinstance(self.metrics, list) or not self.metrics:
                raise ConfigError(f"evaluate.metrics must be a non-empty list, got {quote(self.metrics)}")
            known = sorted({m for ms in METRICS.values() for m in ms})
            for i, m in enumerate(self.metrics):
                _choice(f"evaluate.metrics[{i}]", m, known)
            if len(set(self.metrics)) != len(self.metrics):
                raise ConfigError(f"evaluate.metrics lists a metric twice: {self.metrics!r}")
        _int("evaluate.batch_size", self.batch_size, 1, MAX_EVAL_BATCH)
        _int_list("evaluate.latency_batch_sizes", self.latency_batch_sizes, 1, MAX_EVAL_BATCH)
        _int_list("evaluate.latency_seq_lens", self.latency_seq_lens, 1)
        _int("evaluate.latency_repeats", self.latency_repeats, 1, MAX_LATENCY_REPEATS)
        _int("evaluate.warmup", self.warmup, 0, MAX_LATENCY_REPEATS)
        if self.threads is not None:
            _int("evaluate.threads", self.threads, 1)


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    uri: str | None = None
    """Tracking URI (``http://host:5000``, ``sqlite:///...``; a relative SQLite path is taken from the working
    directory); None: ``$MLFLOW_TRACKING_URI``, else an embedded ``sqlite:///<cwd>/mlflow.db``."""
    experiment: str = "vtrans"
    """Experiment name."""
    artifact_location: str | None = None
    """Artifact root of a newly created experiment; None: ``mlartifacts/`` next to a local SQLite file, else the
    server's default."""

    def __post_init__(self) -> None:
        if self.uri is not None:
            _text("tracking.uri", self.uri)
            self.resolved_uri()  # the form is checked here; whether the store answers, before a run starts
        _text("tracking.experiment", self.experiment)
        if self.artifact_location is not None:
            _text("tracking.artifact_location", self.artifact_location)

    def resolved_uri(self) -> str:
        """The absolute tracking URI (:func:`pipelines.tracking.resolve_tracking_uri`): ``uri``, else
        ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store in the current working directory."""
        from pipelines.tracking import resolve_tracking_uri

        return resolve_tracking_uri(self.uri)


@dataclass
class PipelineConfig:
    """One compression pipeline: teacher -> calibrate -> prune -> fine-tune -> evaluate, tracked in MLflow.

    Construction resolves and cross-checks the sections (and updates them in place): ``model.task`` from the data when
    ``auto``; ``prune.task`` / ``finetune.task`` from ``model.task`` and ``prune.calibration_fraction`` from
    ``calibration`` (a value left at its dataclass default is set, any other must agree); ``calibration.stratified``
    and ``evaluate.metrics`` from the task; the data, metrics and labels must fit the task, and the batch sizes of
    the Ray jobs must divide among ``ray.num_workers``.
    """

    model: ModelConfig
    """The dense model."""
    data: DataConfig
    """Training and test data."""
    name: str = "vtrans"
    """Run name (letters, digits, ``.``, ``_``, ``-``): the MLflow parent run and ``<output>/<name>/``.
    :func:`load_config` defaults it to the file's stem."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """Calibration subset for ``fast`` / ``faster``."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Teacher fine-tune (when ``model.teacher`` is not given)."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """VIB pruning: method, budget, VIB (KL weight and multipliers), distillation, rounds, steps, learning rates."""
    posterior_budget: Budget | None = None
    """Train the masks at this budget instead and apply ``prune.budget`` to the trained posterior by re-thresholding
    it (METHOD.md): every pipeline with the same posterior shares one mask training, each derives its own budget in
    seconds (``sweep.reuse_posterior`` sets it to the smallest budget swept). None: train at ``prune.budget``."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tune of the compressed model (``steps: 0`` skips it)."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Quality metrics and latency grid."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray address and job width."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow URI and experiment."""
    output: str = "runs"
    """Root directory of every stage's outputs."""

    def __post_init__(self) -> None:
        for key, cls in (("model", ModelConfig), ("data", DataConfig), ("calibration", CalibrationConfig),
                         ("teacher", TeacherConfig), ("prune", PruneConfig), ("finetune", FinetuneConfig),
                         ("evaluate", EvaluateConfig), ("ray", RayConfig), ("tracking", TrackingConfig)):
            if not isinstance(getattr(self, key), cls):
                raise ConfigError(f"{key} must be a {cls.__name__}, got {quote(getattr(self, key))}")
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"name must be letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                              f"got {quote(self.name)}")
        _text("output", self.output)
        task = self._resolve_task()
        self._check_data(task)
        self._resolve_derived()
        self._check_sections(task)

    @property
    def task(self) -> str:
        """``seq-cls`` or ``causal-lm``."""
        return self.model.task

    @property
    def posterior(self) -> PipelineConfig | None:
        """The pipeline whose prune stage trains this one's posterior (``prune.budget`` = ``posterior_budget``), or
        None when this pipeline trains its masks at its own budget."""
        if self.posterior_budget is None or self.posterior_budget == self.prune.budget:
            return None
        return dataclasses.replace(self, prune=dataclasses.replace(self.prune, budget=self.posterior_budget),
                                   posterior_budget=None)

    @property
    def calibrates(self) -> bool:
        """Whether pruning runs on the calibration subset (``fast`` and ``faster``) rather than all training data."""
        return self.prune.method in ("fast", "faster")

    def _resolve_task(self) -> str:
        m, d = self.model, self.data
        implied = DATASET_TASKS[d.name] if d.name is not None else ("seq-cls" if d.label_column else "causal-lm")
        if m.task == "auto":
            m.task = implied
        elif d.name is not None and m.task != implied:
            raise ConfigError(f"data.name={d.name!r} is a {implied} data set, but model.task={m.task!r}; set "
                              f"model.task={implied} (or auto) or choose another data set")
        return m.task

    def _check_data(self, task: str) -> None:
        m, d = self.model, self.data
        if task == "causal-lm" and d.label_column is not None:
            raise ConfigError(f"data.label_column must be null for model.task='causal-lm', got {quote(d.label_column)}")
        if d.name is not None:
            text, label = DATASET_COLUMNS[d.name]
            if d.text_column != text:
                raise ConfigError(f"data.text_column={d.text_column!r} does not apply to the built-in data set "
                                  f"{d.name!r} (its text column is {text!r}); use data.files for your own data")
            if d.label_column not in (None, label):
                raise ConfigError(f"data.label_column={d.label_column!r} does not apply to the built-in data set "
                                  f"{d.name!r} (its label column is {label!r}); use data.files for your own data")
        if task == "seq-cls" and d.files is not None and d.label_column is None:
            raise ConfigError(f"data.label_column is required for model.task='seq-cls' on data.files, got "
                              f"{d.label_column!r}")
        if task == "causal-lm" and m.num_labels is not None:
            raise ConfigError(f"model.num_labels must be null for model.task='causal-lm', got {quote(m.num_labels)}")
        if d.name == "rotten_tomatoes" and m.num_labels not in (None, 2):
            raise ConfigError(f"model.num_labels must be 2 (or null) for rotten_tomatoes, got {quote(m.num_labels)}")

    def _derived(self) -> list[tuple[object, str, str, object, str]]:
        """``(section, section key, field, value it must take, its owner)`` of the keys owned by another section."""
        c = self.calibration
        fraction = c.fraction if c.fraction is not None else _field_default(PruneConfig, "calibration_fraction")
        owner = f"calibration.fraction={c.fraction!r}" if c.fraction is not None else f"calibration.count={c.count!r}"
        return [(self.prune, "prune", "task", self.model.task, f"model.task={self.model.task!r}"),
                (self.finetune, "finetune", "task", self.model.task, f"model.task={self.model.task!r}"),
                (self.prune, "prune", "calibration_fraction", fraction, owner)]

    def _resolve_derived(self) -> None:
        for section, skey, name, want, owner in self._derived():
            have = getattr(section, name)
            if have == want:
                continue
            if have != _field_default(type(section), name):
                raise ConfigError(f"{skey}.{name}={have!r} contradicts {owner}; leave {skey}.{name} out (it "
                                  f"follows {owner.partition('=')[0]})")
            setattr(section, name, want)

    def _check_sections(self, task: str) -> None:
        c, e = self.calibration, self.evaluate
        if c.stratified is None:
            c.stratified = task == "seq-cls"
        elif c.stratified and task != "seq-cls":
            raise ConfigError(f"calibration.stratified={c.stratified!r} needs class labels, but model.task={task!r}")
        if e.metrics is None:
            e.metrics = list(METRICS[task])
        for i, metric in enumerate(e.metrics):
            if metric not in METRICS[task]:
                raise ConfigError(f"evaluate.metrics[{i}]={metric!r} is not a {task} metric; choose from "
                                  f"{list(METRICS[task])}")
        if self.model.teacher is not None and self.teacher.steps > 0:
            raise ConfigError(f"teacher.steps={self.teacher.steps!r} would fine-tune a teacher, but model.teacher="
                              f"{self.model.teacher!r} is given; set teacher.steps=0 or leave model.teacher out")
        n = self.ray.num_workers
        jobs = [("prune.batch_size", self.prune.batch_size, True),
                ("finetune.batch_size", self.finetune.batch_size, self.finetune.steps > 0),
                ("teacher.batch_size", self.teacher.batch_size, self.teacher.steps > 0)]
        for key, batch, used in jobs:
            if used and batch % n:
                raise ConfigError(f"{key}={quote(batch)} must be a multiple of ray.num_workers={n!r} (each worker "
                                  f"takes an equal share of every batch)")
        ft, cap = self.finetune, self.data.max_train_samples
        if ft.steps > 0 and ft.eval_every > 0 and cap is not None and cap - ft.eval_samples < ft.batch_size:
            raise ConfigError(f"finetune.eval_samples={ft.eval_samples!r} held out of data.max_train_samples={cap!r} "
                              f"leaves fewer than finetune.batch_size={ft.batch_size!r} samples to fine-tune on")

    def _post_load(self, data: Mapping[str, Any], prefix: str) -> None:
        """A derived key written in the file must agree with its owner even when it equals the dataclass default."""
        for section, skey, name, _, owner in self._derived():
            raw = data.get(skey)
            if isinstance(raw, Mapping) and name in raw and raw[name] != getattr(section, name):
                raise ConfigError(f"{_join(prefix, skey)}.{name}={raw[name]!r} contradicts {owner}; leave "
                                  f"{skey}.{name} out (it follows {owner.partition('=')[0]})")


#: Keys of one section that exclude each other: an override of one drops the others the file gave.
EXCLUSIVE: dict[type, tuple[frozenset[str], ...]] = {
    Budget: (frozenset({"params", "flops"}),),
    CalibrationConfig: (frozenset({"fraction", "count"}),),
    DataConfig: (frozenset({"name", "files"}),),
}


def _field_default(cls: type, name: str) -> object:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# ---------------------------------------------------------------------------------------------------------------------
# generic structured loading
# ---------------------------------------------------------------------------------------------------------------------


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: object, choices: Iterable[str], prefix: str) -> str:
    choices = sorted(choices)
    full = _join(prefix, key)
    full = full if len(full) <= 200 else quote(full)[1:]  # a pasted blob as a key: cut, without a second quote
    close = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
    if close:
        return f"unknown key '{full}'; did you mean '{_join(prefix, close[0])}'?"
    return f"unknown key '{full}'; valid keys{' of ' + prefix if prefix else ''}: {choices}"


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _name(tp: Any) -> str:
    names = {bool: "bool", int: "int", float: "number", str: "string"}
    if tp in names:
        return names[tp]
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _describe(tp: Any) -> str:
    """How a type reads in an error message: ``an int``, ``a number or null``, ``a list of ints``."""
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if float in args and int in args:
            args.remove(int)
        parts = [_describe(a) for a in args] + (["null"] if type(None) in get_args(tp) else [])
        return " or ".join(parts)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple) or tp in (list, tuple):
        elem = args[0] if args else Any
        return f"a list of {_name(elem)}s"
    if origin is dict or tp is dict:
        return f"a mapping of {_name(args[0])} to {_name(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping (section {tp.__name__})"
    return {bool: "a bool (true or false)", int: "an int", float: "a number", str: "a string"}.get(tp, f"a {_name(tp)}")


def _exact(tp: Any, value: object) -> bool:
    """Whether ``value`` already has type ``tp`` (picks the member of a union such as ``float | int``)."""
    if tp is int:
        return type(value) is int
    if tp in (float, str, bool):
        return type(value) is tp
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (Mapping, tp))
    origin = get_origin(tp) or tp
    return isinstance(origin, type) and isinstance(value, origin)


def _convert(tp: Any, value: Any, key: str, what: str | None = None) -> Any:
    """``value`` checked against (and converted to) type ``tp``; ``key`` is the full dotted key for messages."""
    what = what or _describe(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must be {what}, got None")
        members = [a for a in args if a is not type(None)]
        candidates = [a for a in members if _exact(a, value)] or members
        if len(candidates) == 1:
            return _convert(candidates[0], value, key, what)
        for a in candidates:
            try:
                return _convert(a, value, key, what)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {what}, got {quote(value)}")
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1) if isinstance(value, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} must be one of {list(args)}, got {quote(value)}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if type(value) is int:
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {quote(value)}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple
                if len(value) != len(args):
                    raise ConfigError(f"{key} must be a list of {len(args)} items, got {quote(value)}")
                return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
            elem = args[0] if args else Any
            items = [_convert(elem, v, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if (origin or tp) is tuple else items
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping):
            kt, vt = args if args else (Any, Any)
            out = {}
            for k, v in value.items():
                if kt is not Any and not _exact(kt, k):
                    raise ConfigError(f"{key} keys must be {_describe(kt)}, got {quote(k)}")
                out[k] = _convert(vt, v, _join(key, k))
            return out
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping) or value is None:  # an empty section (``teacher:``) takes its defaults
            return from_dict(tp, value or {}, key)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key} must be {what}, got {quote(value)}")


def _qualify(message: str, prefix: str) -> str:
    """Rewrite a nested section's message (``budget.params ...``) to name the full key (``prune.budget.params``)."""
    if not prefix:
        return message
    last = prefix.rsplit(".", 1)[-1]
    if last != prefix:
        message = re.sub(rf"(?<![\w.]){re.escape(last)}(?=[.\s\[=])", prefix, message)
    if not re.search(rf"(?<![\w.]){re.escape(prefix)}(?!\w)", message):
        message = f"{prefix}: {message}"
    return message


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, checking every key and type recursively.

    ``prefix`` is the dotted key of ``data`` itself (``""`` for the top level) and starts every message: an unknown
    key is ``unknown key 'prune.setps'; did you mean 'prune.steps'?``, a wrong type ``prune.steps must be an int, got
    'ten'``; errors raised by a section's own checks are rewritten to name the full key. Missing keys take the
    dataclass defaults; a field without a default is required.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass, got {quote(cls)}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys to values, got {quote(data)}")
    fields = _init_fields(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key(key, fields, prefix))
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(prefix, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(prefix, name)} is required, but missing")
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_qualify(str(e), prefix)) from None
    post_load = getattr(obj, "_post_load", None)
    if post_load is not None:
        post_load(data, prefix)
    return obj


def _section_type(tp: Any) -> type | None:
    """The dataclass of a field typed ``Section`` or ``Section | None``, else None."""
    if _is_union(tp):
        found = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def _merge(raw: dict, tree: Mapping[str, Any], cls: type, prefix: str) -> None:
    fields = _init_fields(cls)
    hints = _hints(cls)
    groups = EXCLUSIVE.get(cls, ())
    for key, value in tree.items():
        if key not in fields:
            raise ConfigError(_unknown_key(key, fields, prefix))
        for group in groups:
            if key in group:
                for other in group - {key} - set(tree):
                    raw.pop(other, None)
        section = _section_type(hints[key])
        current = raw.get(key)
        if isinstance(value, Mapping) and section is not None and (current is None or isinstance(current, Mapping)):
            merged = dict(current or {})
            _merge(merged, value, section, _join(prefix, key))
            raw[key] = merged
        elif isinstance(value, Mapping) and isinstance(current, Mapping):  # a dict-valued field: merge its keys
            raw[key] = {**current, **value}
        else:
            raw[key] = value


# ---------------------------------------------------------------------------------------------------------------------
# YAML and overrides
# ---------------------------------------------------------------------------------------------------------------------


#: Most YAML nodes a config may expand to, aliases counted at every use (the shipped configs have ~150): a "billion
#: laughs" file of nested aliases fails at once instead of exhausting time and memory.
MAX_YAML_NODES = 100_000
#: Deepest nesting of YAML collections in a config (the shipped configs nest 4 deep).
MAX_YAML_DEPTH = 50
#: Largest config file read (the shipped configs have ~3 kB).
MAX_CONFIG_BYTES = 1 << 20


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (``1e-4``) and booleans (``true`` / ``false`` only); no repeated keys; at
    most :data:`MAX_YAML_NODES` nodes with aliases expanded and :data:`MAX_YAML_DEPTH` levels of nesting."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        depth = getattr(self, "_vtrans_depth", 0) + 1
        if depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels",
                                              self.peek_event().start_mark)
        self._vtrans_depth = depth
        try:
            node = super().compose_node(parent, index)
        finally:
            self._vtrans_depth = depth - 1
        sizes: dict[int, int] = self.__dict__.setdefault("_vtrans_sizes", {})
        if id(node) not in sizes:  # an alias returns its anchor's node, already counted: its size is reused
            children = node.value if isinstance(node, yaml.SequenceNode) else [
                n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES:,} values once its "
                                                  f"aliases (*name) are expanded", node.start_mark)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # a list as key: the base constructor reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"found key {key!r} twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


_KEY = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["prune.budget.params=0.3", "data.files=[a.csv,b.csv]"]`` -> ``{"prune": {"budget": {"params": 0.3}}, ...}``.

    Values are YAML (numbers, ``true`` / ``false``, ``null`` or nothing for None, ``[a, b]`` lists, ``{k: v}``
    mappings); a later override of the same key wins. Keys are checked against the config by :func:`merge_overrides`.
    """
    tree: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {quote(item)} must look like key=value, e.g. prune.steps=100")
        key, _, text = item.partition("=")
        key = key.strip()
        if not _KEY.match(key):
            raise ConfigError(f"override {quote(item)}: {quote(key)} is not a dotted key like prune.budget.params")
        try:
            value = yaml.load(text, Loader=_Loader)
        except RecursionError:
            raise ConfigError(f"override {quote(item)}: the value is nested too deeply") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {quote(item)}: the value {quote(text)} is not valid YAML ({_yaml_problem(e)})"
                              ) from None
        *parents, leaf = key.split(".")
        node = tree
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                above = ".".join(parents[: depth + 1])
                raise ConfigError(f"override {item!r} sets a key inside {above}, which an earlier override set to "
                                  f"{child!r}")
            node = child
        node[leaf] = value
    return tree


def merge_overrides(raw: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any],
                    cls: type = PipelineConfig) -> dict[str, Any]:
    """A copy of the plain mapping ``raw`` with ``overrides`` (``key=value`` strings or a nested mapping) merged in.

    Every overridden key must exist in ``cls`` (else the unknown-key error with a suggestion). Mappings merge key by
    key; an override of one of a section's mutually exclusive keys (:data:`EXCLUSIVE`) drops the others.
    """
    tree = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    merged = copy.deepcopy(dict(raw))
    _merge(merged, tree, cls, "")
    return merged


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Read a pipeline YAML, apply ``key=value`` overrides and build the checked :class:`PipelineConfig`.

    Every problem - a missing or unreadable file, invalid YAML, an unknown key, a wrong type or value, sections that
    contradict each other - is a :class:`~vtrans.errors.ConfigError` raised here, before any Ray or MLflow work.
    """
    raw = read_yaml(path)
    return from_dict(PipelineConfig, merge_overrides(raw, overrides))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a plain mapping (YAML 1.2 scalars, repeated keys refused), ``name`` defaulted to the stem."""
    path = Path(path)
    kind = path_kind("config file", str(path))
    if kind is None:
        raise ConfigError(f"config file {quote(str(path))} not found (relative to {Path.cwd()})")
    if kind != "file":
        raise ConfigError(f"config file {quote(str(path))} is {KIND_WORDS[kind]}, not a YAML file")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {quote(str(path))} has {path.stat().st_size:,} bytes, more than a "
                              f"config's {MAX_CONFIG_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {quote(str(path))} cannot be read: {quote(str(e))}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise ConfigError(f"config file {quote(str(path))} is not valid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {quote(str(path))} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {quote(str(path))} must hold a mapping of sections (model:, data:, ...), "
                          f"got {quote(raw)}")
    raw.setdefault("name", path.stem)
    return raw


# ---------------------------------------------------------------------------------------------------------------------
# serialising
# ---------------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot serialise {value!r} of type {type(value).__name__}")


def to_dict(config: Any) -> dict[str, Any]:
    """A config (or section) as plain JSON-able data; ``from_dict(type(c), to_dict(c)) == c``."""
    out = _plain(config)
    if not isinstance(out, dict):
        raise TypeError(f"to_dict needs a dataclass instance or a mapping, got {quote(config)}")
    return out


def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        try:
            if yaml.load(value, Loader=_Loader) == value:
                return value
        except yaml.YAMLError:
            pass
        return json.dumps(value)  # quoted: a string YAML would read as something else ("true", "1", "a: b")
    return json.dumps(value)  # null, true / false, numbers, [lists], {mappings}: all YAML as well


def flatten(config: Any) -> dict[str, str]:
    """Dotted keys to text values, e.g. ``{"prune.budget.params": "0.5", "evaluate.latency_seq_lens": "[128]"}``.

    Made for MLflow params; every item written as ``key=value`` is an override that reproduces the value.
    """
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, _join(key, k))
        else:
            out[key] = _scalar_text(value)

    walk(to_dict(config), "")
    return out


def config_hash(config: Any) -> str:
    """First 16 hex digits of the SHA-256 of the canonical JSON of a config, a section or a mapping (stage caching).
    Credentials in URIs are redacted first: a hash is recorded (tags, stage folders), and a short password could be
    found from it by trying; the same data with other credentials is the same data."""
    from pipelines.redact import redact_data

    text = json.dumps(redact_data(_plain(config)), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

"""Pipeline configuration: one YAML file per pipeline, loaded into typed dataclasses, with ``key=value`` overrides.

```python
from pipelines.config import load_config, flatten, config_hash
cfg = load_config("pipelines/configs/minilm-rotten-tomatoes.yaml", ["prune.budget.params=0.3", "ray.num_workers=1"])
cfg.prune.budget            # Budget(params=0.3, scope='blocks', ...)
flatten(cfg)                # {"prune.budget.params": "0.3", ...}: MLflow params; each item is a valid override
config_hash(cfg.prune)      # 16 hex digits of the section's canonical JSON: a stage cache key
```

Rules (torchtune / litgpt style):

- Sections are dataclasses whose fields carry docstrings; ``prune`` and ``finetune`` are the library's
  :class:`vtrans.train.PruneConfig` and :class:`vtrans.finetune.FinetuneConfig`, ``ray`` is :class:`RayConfig`.
  A nested mapping is built from the nested class's own defaults. Values are checked with :mod:`vtrans.checks`, on
  direct construction too, not only when loading YAML.
- Loading is strict (:mod:`pipelines.typed_config`, re-exported here): an unknown key is an error that names the full
  dotted key and suggests the closest valid one; types are checked against the annotations; YAML is read with YAML 1.2
  scalars (``1e-4`` is a float, only ``true`` / ``false`` are booleans); a key repeated in one mapping is an error.
- Overrides (``prune.budget.params=0.3``, ``data.files=[a.csv,b.csv]``, ``tracking.uri=`` for null) are parsed as
  YAML and merged into the file's mapping before anything is built; the last override of a key wins. Keys that
  exclude each other - ``params`` / ``flops`` of a budget, ``fraction`` / ``count`` of the calibration, ``name`` /
  ``files`` of the data (:data:`EXCLUSIVE`) - replace each other: ``prune.budget.flops=0.4`` on a file with
  ``params: 0.5`` drops ``params``. Giving both in the overrides themselves is the usual "exactly one" error.
- The task has one owner, ``model.task`` (``auto``: from the data). ``prune.task`` and ``finetune.task`` follow it, as
  does ``prune.calibration_fraction`` the ``calibration`` section: left out, they are set from their owner; written
  out, they must agree with it. After loading, ``model.task``, ``calibration.stratified`` and ``evaluate.metrics``
  are always concrete (the metrics from :data:`vtrans.metrics.TASK_METRICS`).
- Everything is checked in :func:`load_config`, before any Ray or MLflow work; this module imports neither.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines import typed_config
from pipelines.typed_config import (
    config_hash,
    field_default,
    flatten,
    from_dict,
    join_key,
    parse_overrides,
    read_yaml,
    to_dict,
)
from vtrans.assets import DATASETS, MODELS
from vtrans.checkpoint import TOKENIZER_FILES, has_tokenizer
from vtrans.checks import check_choice, check_int, check_int_list, check_number, check_text
from vtrans.config import Budget
from vtrans.distill import MAX_STEPS, TASKS
from vtrans.errors import KIND_WORDS, ConfigError, path_kind, quote
from vtrans.finetune import FinetuneConfig
from vtrans.metrics import TASK_METRICS
from vtrans.train import PruneConfig

__all__ = [
    "EXCLUSIVE",
    "CalibrationConfig",
    "DataConfig",
    "EvaluateConfig",
    "ModelConfig",
    "PipelineConfig",
    "RayConfig",
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

#: Most classes of a classification head (``model.num_labels``, or the largest class id + 1 in the data).
MAX_NUM_LABELS = 10_000
#: Most timed forward passes per latency cell (``evaluate.latency_repeats``) and untimed ones (``evaluate.warmup``).
MAX_LATENCY_REPEATS = 10_000
#: Largest batch at which latency is timed (``evaluate.latency_batch_sizes``) or quality evaluated
#: (``evaluate.batch_size``).
MAX_EVAL_BATCH = 4096
#: Most examples per lm-eval task (``evaluate.lm_eval_limit``).
MAX_LM_EVAL_LIMIT = 1_000_000

#: Task of each built-in data set.
DATASET_TASKS: dict[str, str] = {"rotten_tomatoes": "seq-cls", "wikipedia": "causal-lm", "lee_news": "causal-lm"}
#: Columns of each built-in data set (text, label).
DATASET_COLUMNS: dict[str, tuple[str, str | None]] = {"rotten_tomatoes": ("text", "label"), "wikipedia": ("text", None),
                                                      "lee_news": ("text", None)}
#: Local data file formats by suffix (``.jsonl`` is read as JSON lines).
FILE_FORMATS: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_uri(path: str) -> bool:
    """``scheme://...`` (a remote file for Ray Data), not a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


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
        check_text("model.name", self.name)
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
        check_choice("model.task", self.task, (*TASKS, "auto"))
        if self.num_labels is not None:
            check_int("model.num_labels", self.num_labels, 2, MAX_NUM_LABELS)
        if self.teacher is not None:
            check_text("model.teacher", self.teacher)
            kind = path_kind("model.teacher", self.teacher)
            if kind != "dir":
                raise ConfigError(f"model.teacher must be a local directory holding a fine-tuned teacher, got "
                                  f"{quote(self.teacher)} "
                                  f"({'no such directory' if kind is None else KIND_WORDS[kind]})")


@dataclass
class DataConfig:
    """The training and test data: a built-in data set or local files, split into train and test."""

    name: Literal["rotten_tomatoes", "wikipedia", "lee_news"] | None = None
    """Built-in data set: ``rotten_tomatoes`` (12,752 labelled snippets, seq-cls), ``wikipedia`` (106 articles,
    causal-lm) or ``lee_news`` (300 news stories, causal-lm). Exactly one of ``name`` and ``files``."""
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
            check_choice("data.name", self.name, DATASETS)
        if self.files is not None:
            if not isinstance(self.files, list) or not self.files:
                raise ConfigError(f"data.files must be a non-empty list of paths, got {quote(self.files)}")
            formats = set()
            for i, f in enumerate(self.files):
                check_text(f"data.files[{i}]", f)
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
        check_choice("data.reader", self.reader, ("auto", "pyarrow", "ray"))
        check_text("data.text_column", self.text_column)
        if self.label_column is not None:
            check_text("data.label_column", self.label_column)
            if self.label_column == self.text_column:
                raise ConfigError(f"data.label_column must differ from data.text_column, got "
                                  f"{quote(self.label_column)}")
        check_number("data.test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int("data.max_length", self.max_length, 1)
        check_int("data.seq_len", self.seq_len, 2)
        if self.max_train_samples is not None:
            check_int("data.max_train_samples", self.max_train_samples, 1)
        if self.max_test_samples is not None:
            check_int("data.max_test_samples", self.max_test_samples, 1)
        check_int("data.seed", self.seed)


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
            check_number("calibration.fraction", self.fraction, 0.0, 1.0, low_open=True)
        if self.count is not None:
            check_int("calibration.count", self.count, 1)
        if self.stratified is not None and not isinstance(self.stratified, bool):
            raise ConfigError(f"calibration.stratified must be true, false or null, got {quote(self.stratified)}")
        check_int("calibration.seed", self.seed)


@dataclass
class TeacherConfig:
    """Fine-tuning of the dense model into the distillation teacher (only when ``model.teacher`` is not given)."""

    steps: int = 0
    """Fine-tuning steps (at most ``vtrans.distill.MAX_STEPS`` = 1,000,000); 0: the dense model is the teacher as it is
    (e.g. a pretrained LM)."""
    lr: float = 1e-4
    """Learning rate."""
    batch_size: int = 32
    """Batch size over all workers (a multiple of ``ray.num_workers``)."""
    seed: int = 0
    """Seed of the data order and of the new classification head."""

    def __post_init__(self) -> None:
        check_int("teacher.steps", self.steps, 0, MAX_STEPS)
        check_number("teacher.lr", self.lr, 0.0, math.inf, low_open=True, high_open=True)
        check_int("teacher.batch_size", self.batch_size, 1)
        check_int("teacher.seed", self.seed)


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
    lm_eval_tasks: list[str] | None = None
    """lm-evaluation-harness tasks run on the dense and the compressed model (causal-lm only; needs
    ``vtrans[eval]``): each metric logged as ``lm_eval_<task>_<metric>`` (dense: ``dense_lm_eval_...``), a valid
    sweep objective. ``lambada_local`` is shipped (built-in text, no dataset hub); any lm-eval task whose data is
    reachable or cached works. Checked before any work (:func:`vtrans.lm_eval.check_tasks`). None: none."""
    lm_eval_limit: int | None = None
    """Examples of each ``lm_eval_tasks`` task (its first ones; at most :data:`MAX_LM_EVAL_LIMIT`); None: all."""

    def __post_init__(self) -> None:
        if self.metrics is not None:
            if not isinstance(self.metrics, list) or not self.metrics:
                raise ConfigError(f"evaluate.metrics must be a non-empty list, got {quote(self.metrics)}")
            known = sorted({m for ms in TASK_METRICS.values() for m in ms})
            for i, m in enumerate(self.metrics):
                check_choice(f"evaluate.metrics[{i}]", m, known)
            if len(set(self.metrics)) != len(self.metrics):
                raise ConfigError(f"evaluate.metrics lists a metric twice: {self.metrics!r}")
        check_int("evaluate.batch_size", self.batch_size, 1, MAX_EVAL_BATCH)
        check_int_list("evaluate.latency_batch_sizes", self.latency_batch_sizes, 1, MAX_EVAL_BATCH)
        check_int_list("evaluate.latency_seq_lens", self.latency_seq_lens, 1)
        check_int("evaluate.latency_repeats", self.latency_repeats, 1, MAX_LATENCY_REPEATS)
        check_int("evaluate.warmup", self.warmup, 0, MAX_LATENCY_REPEATS)
        if self.threads is not None:
            check_int("evaluate.threads", self.threads, 1)
        if self.lm_eval_tasks is not None:
            if not isinstance(self.lm_eval_tasks, list) or not self.lm_eval_tasks:
                raise ConfigError(f"evaluate.lm_eval_tasks must be a non-empty list of lm-eval task names (or null), "
                                  f"got {quote(self.lm_eval_tasks)}")
            for i, name in enumerate(self.lm_eval_tasks):
                check_text(f"evaluate.lm_eval_tasks[{i}]", name)
            if len(set(self.lm_eval_tasks)) != len(self.lm_eval_tasks):
                raise ConfigError(f"evaluate.lm_eval_tasks lists a task twice: {self.lm_eval_tasks!r}")
        if self.lm_eval_limit is not None:
            check_int("evaluate.lm_eval_limit", self.lm_eval_limit, 1, MAX_LM_EVAL_LIMIT)
            if self.lm_eval_tasks is None:
                raise ConfigError(f"evaluate.lm_eval_limit={self.lm_eval_limit!r} limits the lm-eval tasks, but "
                                  f"evaluate.lm_eval_tasks is not set; set both or neither")


#: ``tracking.experiment`` when neither the config nor ``$MLFLOW_EXPERIMENT_NAME`` names one.
DEFAULT_EXPERIMENT = "vtrans"


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    uri: str | None = None
    """Tracking URI (``http://host:5000``, ``sqlite:///...``; a relative SQLite path is taken from the working
    directory); None: ``$MLFLOW_TRACKING_URI``, else an embedded ``sqlite:///<cwd>/mlflow.db``."""
    experiment: str = field(default_factory=lambda: os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    """Experiment name. Not given: ``$MLFLOW_EXPERIMENT_NAME``, else ``vtrans`` (a value in the config or an override
    wins over the variable)."""
    artifact_location: str | None = None
    """Artifact root of a newly created experiment; None: ``mlartifacts/`` next to a local SQLite file, else the
    server's default."""

    def __post_init__(self) -> None:
        if self.uri is not None:
            check_text("tracking.uri", self.uri)
            self.resolved_uri()  # the form is checked here; whether the store answers, before a run starts
        check_text("tracking.experiment", self.experiment)
        if self.artifact_location is not None:
            check_text("tracking.artifact_location", self.artifact_location)

    def resolved_uri(self) -> str:
        """The absolute tracking URI (:func:`pipelines.tracking.resolve_tracking_uri`): ``uri``, else
        ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store in the current working directory."""
        from pipelines.tracking import resolve_tracking_uri

        return resolve_tracking_uri(self.uri)


#: How the Ray Train workers of a prune / fine-tune job hold the model (``ray.strategy``).
STRATEGIES = ("ddp", "fsdp")


@dataclass
class RayConfig:
    """Where and how wide a job runs."""

    address: str | None = None
    """Ray address (``host:port`` of the GCS, ``auto``, ``ray://...``); None: ``$RAY_ADDRESS`` when set (a job's
    driver), else a new local Ray."""
    num_workers: int = 1
    """Data-parallel Ray Train workers (each gets batch_size / num_workers samples per step)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); the cluster must have num_workers GPUs."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (also its torch thread count)."""
    max_failures: int = 0
    """Worker-group restarts from the last checkpoint before the job fails."""
    strategy: str = "ddp"
    """How the prune and fine-tune workers hold the model. ``ddp``: every worker a whole copy (DDP all-reduces the
    gradients). ``fsdp``: every transformer block's weights, gradients and optimizer state sharded over the workers
    (torch FSDP2 ``fully_shard``; masks and lambdas stay whole on every worker), for a model that does not fit one
    worker - see pipelines/GUIDE.md. Both take the same steps: N workers x B/N samples give one worker's masks on B."""

    def __post_init__(self) -> None:
        check_int("ray.num_workers", self.num_workers, 1, what="an integer >= 1")
        check_int("ray.max_failures", self.max_failures, 0, what="an integer >= 0")
        check_number("ray.cpus_per_worker", self.cpus_per_worker, 0, low_open=True, what="> 0")
        check_choice("ray.strategy", self.strategy, STRATEGIES)
        if self.strategy == "fsdp" and self.num_workers < 2:
            raise ConfigError(f"ray.strategy={self.strategy!r} shards the model over the workers and needs "
                              f"ray.num_workers >= 2, got ray.num_workers={self.num_workers!r}; use ray.strategy='ddp' "
                              f"for one worker")


@dataclass
class PipelineConfig:
    """One compression pipeline: teacher -> calibrate -> prune -> fine-tune -> evaluate, tracked in MLflow.

    Construction resolves and cross-checks the sections (and updates them in place): ``model.task`` from the data when
    ``auto``; ``prune.task`` / ``finetune.task`` from ``model.task``, ``prune.calibration_fraction`` from
    ``calibration``, and ``prune.finetune_method`` / ``prune.lora`` (the fine-tunes between pruning rounds) from
    ``finetune.method`` / ``finetune.lora`` (a value left at its dataclass default is set, any other must agree);
    ``calibration.stratified`` and ``evaluate.metrics`` from the task; the data, metrics and labels must fit the task,
    and the batch sizes of the Ray jobs must divide among ``ray.num_workers``.
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
        check_text("output", self.output)
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
        fraction = c.fraction if c.fraction is not None else field_default(PruneConfig, "calibration_fraction")
        owner = f"calibration.fraction={c.fraction!r}" if c.fraction is not None else f"calibration.count={c.count!r}"
        ft = self.finetune
        return [(self.prune, "prune", "task", self.model.task, f"model.task={self.model.task!r}"),
                (self.finetune, "finetune", "task", self.model.task, f"model.task={self.model.task!r}"),
                (self.prune, "prune", "calibration_fraction", fraction, owner),
                # one fine-tune method for every fine-tune: between pruning rounds and of the compressed model
                (self.prune, "prune", "finetune_method", ft.method, f"finetune.method={ft.method!r}"),
                (self.prune, "prune", "lora", ft.lora, f"finetune.lora={ft.lora!r}")]

    def _resolve_derived(self) -> None:
        for section, skey, name, want, owner in self._derived():
            have = getattr(section, name)
            if have == want:
                continue
            if have != field_default(type(section), name):
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
            e.metrics = list(TASK_METRICS[task])
        self.prune.budget = self._latency_shape("prune.budget", self.prune.budget)
        if self.posterior_budget is not None:
            self.posterior_budget = self._latency_shape("posterior_budget", self.posterior_budget)
        if e.lm_eval_tasks is not None and task != "causal-lm":
            raise ConfigError(f"evaluate.lm_eval_tasks={e.lm_eval_tasks!r} needs a causal LM, but model.task={task!r}; "
                              f"leave evaluate.lm_eval_tasks out for seq-cls")
        for i, metric in enumerate(e.metrics):
            if metric not in TASK_METRICS[task]:
                raise ConfigError(f"evaluate.metrics[{i}]={metric!r} is not a {task} metric; choose from "
                                  f"{list(TASK_METRICS[task])}")
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

    def _latency_shape(self, key: str, budget: Budget) -> Budget:
        """A latency budget measured at the evaluation's first latency point (``evaluate.latency_batch_sizes[0]`` x
        ``evaluate.latency_seq_lens[0]``) unless it gives its own ``batch_size`` / ``seq_len``."""
        if budget.metric != "latency":
            return budget
        e = self.evaluate
        shape = {}
        if budget.batch_size == field_default(Budget, "batch_size"):
            shape["batch_size"] = e.latency_batch_sizes[0]
        if budget.seq_len == field_default(Budget, "seq_len"):
            shape["seq_len"] = e.latency_seq_lens[0]
        if budget.batch_size > MAX_EVAL_BATCH:
            raise ConfigError(f"{key}.batch_size must be at most {MAX_EVAL_BATCH:,} (as evaluate.latency_batch_sizes), "
                              f"got {budget.batch_size!r}")
        if self.ray.num_workers > 1:
            raise ConfigError(f"{key}.latency={budget.latency!r} with ray.num_workers={self.ray.num_workers!r}: every "
                              f"worker would measure its own latency table; prune a latency budget with "
                              f"ray.num_workers=1")
        return dataclasses.replace(budget, **shape) if shape else budget

    def _post_load(self, data: Mapping[str, Any], prefix: str) -> None:
        """A derived key written in the file must agree with its owner even when it equals the dataclass default."""
        for section, skey, name, _, owner in self._derived():
            raw = data.get(skey)
            if isinstance(raw, Mapping) and name in raw and not _agrees(raw[name], getattr(section, name)):
                raise ConfigError(f"{join_key(prefix, skey)}.{name}={raw[name]!r} contradicts {owner}; leave "
                                  f"{skey}.{name} out (it follows {owner.partition('=')[0]})")


def _agrees(written: Any, value: Any) -> bool:
    """Whether a value written in a file is ``value``: a section (a dataclass) key by key, as far as it is written."""
    if dataclasses.is_dataclass(value) and isinstance(written, Mapping):
        return all(hasattr(value, k) and _agrees(v, getattr(value, k)) for k, v in written.items())
    return written == value


#: Keys of one section that exclude each other: an override of one drops the others the file gave.
EXCLUSIVE: dict[type, tuple[frozenset[str], ...]] = {
    Budget: (frozenset({"params", "flops", "latency"}),),
    CalibrationConfig: (frozenset({"fraction", "count"}),),
    DataConfig: (frozenset({"name", "files"}),),
}


def merge_overrides(raw: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any],
                    cls: type = PipelineConfig) -> dict[str, Any]:
    """A copy of the plain mapping ``raw`` with ``overrides`` (``key=value`` strings or a nested mapping) merged in.

    Every overridden key must exist in ``cls`` (else the unknown-key error with a suggestion). Mappings merge key by
    key; an override of one of a section's mutually exclusive keys (:data:`EXCLUSIVE`) drops the others.
    """
    return typed_config.merge_overrides(raw, overrides, cls, EXCLUSIVE)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Read a pipeline YAML, apply ``key=value`` overrides and build the checked :class:`PipelineConfig`.

    Every problem - a missing or unreadable file, invalid YAML, an unknown key, a wrong type or value, sections that
    contradict each other - is a :class:`~vtrans.errors.ConfigError` raised here, before any Ray or MLflow work.
    """
    raw = read_yaml(path)
    return from_dict(PipelineConfig, merge_overrides(raw, overrides))


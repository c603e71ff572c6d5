"""The benchmark harness (issue 7): VTrans against the baselines on real models, and the system's own speed.

    python -m pipelines.bench --profile quick|full|smoke [--out runs/bench] [--device auto|cpu|cuda] [key=value ...]

One command measures, for all-MiniLM-L6-v2 on Rotten Tomatoes (accuracy; the teacher is MiniLM fine-tuned on the
task first) and SmolLM2-135M on Wikipedia text (perplexity), and for every method (``random``, ``magnitude``,
``kwon`` = Kwon et al. 2022 Fisher pruning, ``vtrans``, ``fast``, ``faster``), block-parameter budget and seed:

- quality without and with the post-pruning fine-tune (the same fine-tune for every method), mean ± std over seeds;
- achieved parameters and FLOPs in both scopes against the target (exact counts);
- latency and throughput of each compressed model against the dense one (fixed threads, batch sizes x seq len,
  warm-up, median of repeats) and measured speedup ÷ FLOPs reduction;
- compression wall time per method and the Faster-VTrans ÷ VTrans ratio;
- peak RSS per stage (sampled while the stage runs);
- Ray overhead: a small pipeline through the stage DAG on local Ray against the same stages in one plain process.

Everything goes to the MLflow experiment ``benchmarks`` (a parent run per invocation, a child run per result row)
and to ``--out``: ``results.json``, ``results.md`` and ``pareto-<task>.png``.

Where the work runs. Data and teacher: the pipeline's own ``calibrate`` and ``teacher`` stages (the teacher a Ray
Train job with ``executor=ray``, an in-process loop with ``local``) under ``<out>/stages/``, keyed as the pipeline
keys them: computed once per output folder, reused on a re-run (and by ``vtrans run`` on the same folder). The grid:
one *cell* per (task, method, seed) that compresses to every budget, evaluates, fine-tunes and evaluates again, its
rows cached as ``<out>/cells/<task>/<method>-s<seed>-<key>.json``. Inside a cell training is a plain loop in one
process: a Ray Train job's fixed cost (~15-20 s here) would dominate hundreds of short jobs. With ``executor=ray``
(every profile) each cell is a Ray task holding ``cpus_per_cell`` CPUs (and a GPU with ``--device cuda``), so two run
side by side on this 2-core machine and a cluster runs as many as it holds; ``executor=local`` runs them one after the
other in this process. Latency is measured afterwards in the driver, model after model, never beside other work.
On a cluster ``--out`` must be on storage every node sees, and with ``--device cuda`` the driver needs a GPU too (the
dense evaluation, the latency and the plain-process half of the overhead run there): ``ray job submit
--entrypoint-num-gpus 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pipelines import bench_report
from pipelines.config import PipelineConfig, config_hash, flatten, from_dict, merge_overrides, to_dict
from vtrans.errors import ConfigError, VtransError

METHODS = ("random", "magnitude", "kwon", "vtrans", "fast", "faster")
TRAINING_FREE = ("random", "magnitude", "kwon")
VIB_METHODS = ("vtrans", "fast", "faster")
DETERMINISTIC = ("magnitude",)
"""Methods whose pruning does not depend on the seed: pruned once; their seeds vary only the fine-tune."""
KINDS = {"encoder": ("seq-cls", "rotten_tomatoes", "accuracy"), "decoder": ("causal-lm", "wikipedia", "perplexity")}
CELL_VERSION = 1
OPTIONAL_SETTINGS = ("kl_multipliers", "kl_normalisation", "logvar_init", "keep_sharpness", "threshold", "lr_mu",
                     "lr_lambdas", "mask_lr_decay", "warmup", "selection", "reconstruct", "kwon_tune", "init",
                     "init_keep", "warmup_from", "constraint")
#: The VIB recipe settings of a task (None: the library's default), passed to ``vtrans.VIBConfig`` / ``PruneConfig``.
VIB_SETTINGS = ("logvar_init", "keep_sharpness", "threshold", "selection")
PRUNE_SETTINGS = ("lr_mu", "lr_lambdas", "mask_lr_decay", "warmup", "reconstruct", "init", "init_keep", "warmup_from",
                  "constraint")
"""Task settings added after cells were cached: left at None they are not part of a cell's key."""
EXPERIMENT = "benchmarks"
# the report whose marked sections the published profiles rewrite (``--readme auto``), relative to the working directory
BENCHMARKS_REPORT = "pipelines/BENCHMARKS.md"


# ---------------------------------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------------------------------


def _check_int(key: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an int >= {minimum}, got {value!r}")


def _check_positive(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a number > 0, got {value!r}")


@dataclass
class LatencyProfile:
    """How forward latency is timed (:func:`vtrans.latency.time_forward` on random token ids)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    """Batch sizes timed."""
    seq_len: int = 128
    """Sequence length timed (also the FLOPs' sequence length for the speedup ÷ FLOPs-reduction ratio)."""
    repeats: int = 20
    """Timed forward passes per batch size; the median is reported."""
    warmup: int = 3
    """Untimed passes before timing."""
    threads: int = 1
    """``torch.set_num_threads`` while timing (CPU)."""

    def __post_init__(self) -> None:
        if not isinstance(self.batch_sizes, list) or not self.batch_sizes:
            raise ConfigError(f"latency.batch_sizes must be a non-empty list of ints, got {self.batch_sizes!r}")
        for i, b in enumerate(self.batch_sizes):
            _check_int(f"latency.batch_sizes[{i}]", b, 1)
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ConfigError(f"latency.batch_sizes lists a batch size twice: {self.batch_sizes!r}")
        _check_int("latency.seq_len", self.seq_len, 1)
        _check_int("latency.repeats", self.repeats, 1)
        _check_int("latency.warmup", self.warmup, 0)
        _check_int("latency.threads", self.threads, 1)


@dataclass
class TaskProfile:
    """One model and data set of a profile: ``encoder`` = a classifier on Rotten Tomatoes (accuracy), ``decoder`` =
    a causal LM on Wikipedia text (perplexity). Steps are optimizer steps of one process at the given batch size."""

    label: str
    """Row label (``minilm``, ``smollm2``): MLflow run names, file names, table headings."""
    model: str
    """A built-in model (``minilm``, ``smollm2``) or a local Hugging Face directory."""
    budgets: list[float]
    """Block-parameter budgets (fractions of the dense transformer layers' parameters)."""
    methods: list[str]
    """Methods compared, from ``random``, ``magnitude``, ``kwon``, ``vtrans``, ``fast``, ``faster``."""
    train_samples: int
    """Training texts (encoder: a stratified subset) or 128-token chunks (decoder)."""
    test_samples: int
    """Held-out texts / chunks the quality is measured on."""
    seq_len: int
    """Encoder: texts truncated to this many tokens. Decoder: chunk length."""
    prune_steps: dict[str, int]
    """VIB training steps of each of ``vtrans``, ``fast``, ``faster`` that are in ``methods``."""
    finetune_steps: int
    """Post-pruning fine-tune steps, the same for every method (logit distillation from the teacher)."""
    seeds: int = 3
    """Seeds of ``random`` (the scores) and ``kwon`` (the calibration draw); ``magnitude`` is pruned once."""
    trained_seeds: int = 1
    """Seeds of the VIB methods (data order, mask init and noise)."""
    finetune_seeds: int = 1
    """Seeds 0 .. n-1 of every method are also fine-tuned (<= ``seeds`` and ``trained_seeds``)."""
    calibration_fraction: float | None = 0.03
    """Calibration subset of ``fast`` / ``faster`` as a fraction of the training samples (stratified for the
    encoder); exactly one of this and ``calibration_count``."""
    calibration_count: int | None = None
    """The calibration subset as a sample count."""
    teacher_steps: int = 0
    """Fine-tuning steps that make the dense model the teacher (0: the dense model is the teacher, as for an LM)."""
    teacher_batch: int = 32
    teacher_lr: float = 1e-4
    prune_batch: int = 16
    shared_posterior: bool = True
    """One VIB training per (method, seed) at the smallest budget, re-thresholded to the others
    (``vtrans.posterior``; what a sweep's ``reuse_posterior`` does); false: one training per budget."""
    lr_masks: float = 0.02
    lr_weights: float = 3e-5
    kl_weight: float = 0.01
    kl_multipliers: dict[str, float] | None = None
    """Per-structure-type KL multipliers (``hidden``, ``heads``, ``neurons``, ``mha``, ``ffn``; missing types 1);
    None: all 1 (``vtrans.VIBConfig``)."""
    kl_normalisation: str | None = None
    """``group`` or ``unit`` (``vtrans.VIBConfig.kl_normalisation``); None: the library's default (``group``)."""
    logvar_init: float | None = None
    """Initial mask log-variance (``vtrans.VIBConfig.logvar_init``); None: the library's default (-9)."""
    keep_sharpness: float | None = None
    """``k`` of the soft keep probability (``vtrans.VIBConfig.keep_sharpness``); None: the library's default."""
    threshold: float | None = None
    """``vtrans.VIBConfig.threshold``; None: the library's default."""
    selection: str | None = None
    """``threshold`` or ``quota`` (``vtrans.VIBConfig.selection``); None: the library's default."""
    lr_mu: float | None = None
    """Learning rate of the mask means (``vtrans.train.PruneConfig.lr_mu``); None: ``lr_masks``."""
    lr_lambdas: float | None = None
    """Learning rate of the Lagrange multipliers; None: the library's default."""
    mask_lr_decay: str | None = None
    """``none`` or ``linear`` (``PruneConfig.mask_lr_decay``); None: the library's default."""
    warmup: float | None = None
    """Share of the pruning steps over which the size target moves to the budget; None: the library's default."""
    reconstruct: bool | None = None
    """Least-squares reconstruction of the VIB methods' selections (``PruneConfig.reconstruct``, on
    ``kwon_samples`` training samples); None: the library's default."""
    init: str | None = None
    """``constant`` or ``fisher`` (``PruneConfig.init``: the masks start from Kwon's selection on ``kwon_samples``
    training samples); None: the library's default."""
    init_keep: float | None = None
    """Keep probability of the units a ``fisher`` start keeps; None: the library's default."""
    warmup_from: str | None = None
    """``dense`` or ``start`` (``PruneConfig.warmup_from``); None: the library's default."""
    constraint: str | None = None
    """``lagrangian``, ``upper`` or ``projection`` (``PruneConfig.constraint``); None: the library's default."""
    kwon_tune: bool | None = None
    """Kwon's least-squares mask tuning (``vtrans.fisher.kwon_prune(tune=...)``); None: on (the paper's method)."""
    hidden_weight: float = 0.5
    """Layer (hidden-state) distillation weight of ``vtrans`` and ``fast`` (``faster`` has frozen weights: 0)."""
    kwon_samples: int = 256
    """Calibration samples of the Fisher information (drawn from the training set with the seed)."""
    kwon_batch: int = 32
    finetune_batch: int = 16
    finetune_lr: float = 5e-5
    eval_batch: int = 64
    tolerance: float = 0.005
    """Budgets are met within this fraction under the target (``vtrans.Budget.tolerance``)."""
    latency: LatencyProfile = field(default_factory=LatencyProfile)

    def __post_init__(self) -> None:
        for key in ("label", "model"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise ConfigError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        if not isinstance(self.budgets, list) or not self.budgets:
            raise ConfigError(f"budgets must be a non-empty list of fractions, got {self.budgets!r}")
        for i, b in enumerate(self.budgets):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
                raise ConfigError(f"budgets[{i}] must be a fraction in (0, 1), got {b!r}")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"budgets lists a budget twice: {self.budgets!r}")
        self.budgets = [float(b) for b in self.budgets]
        if not isinstance(self.methods, list) or not self.methods:
            raise ConfigError(f"methods must be a non-empty list, choose from {list(METHODS)}, got {self.methods!r}")
        for i, m in enumerate(self.methods):
            if m not in METHODS:
                raise ConfigError(f"methods[{i}] must be one of {list(METHODS)}, got {m!r}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods lists a method twice: {self.methods!r}")
        for key in ("train_samples", "test_samples", "seeds", "trained_seeds", "prune_batch", "kwon_samples",
                    "kwon_batch", "finetune_batch", "eval_batch", "teacher_batch"):
            _check_int(key, getattr(self, key), 1)
        _check_int("seq_len", self.seq_len, 2)
        for key in ("finetune_steps", "finetune_seeds", "teacher_steps"):
            _check_int(key, getattr(self, key), 0)
        if self.finetune_seeds > min(self.seeds, self.trained_seeds):
            raise ConfigError(f"finetune_seeds={self.finetune_seeds} must be <= seeds={self.seeds} and "
                              f"trained_seeds={self.trained_seeds} (a fine-tuned row fine-tunes that seed's pruning)")
        if (self.finetune_steps == 0) != (self.finetune_seeds == 0):
            raise ConfigError(f"finetune_steps={self.finetune_steps} and finetune_seeds={self.finetune_seeds} must be "
                              f"both 0 (no fine-tuned rows) or both >= 1")
        if not isinstance(self.prune_steps, dict):
            raise ConfigError(f"prune_steps must map method -> steps, got {self.prune_steps!r}")
        for m, s in self.prune_steps.items():
            if m not in VIB_METHODS:
                raise ConfigError(f"prune_steps has {m!r}; only {list(VIB_METHODS)} train")
            _check_int(f"prune_steps.{m}", s, 1)
        missing = [m for m in self.methods if m in VIB_METHODS and m not in self.prune_steps]
        if missing:
            raise ConfigError(f"prune_steps needs the steps of {missing} (in methods), got {self.prune_steps!r}")
        if (self.calibration_fraction is None) == (self.calibration_count is None):
            raise ConfigError(f"exactly one of calibration_fraction and calibration_count, got "
                              f"calibration_fraction={self.calibration_fraction!r}, "
                              f"calibration_count={self.calibration_count!r}")
        if self.calibration_fraction is not None and not 0 < self.calibration_fraction <= 1:
            raise ConfigError(f"calibration_fraction must be in (0, 1], got {self.calibration_fraction!r}")
        if self.calibration_count is not None:
            _check_int("calibration_count", self.calibration_count, 1)
        for key in ("teacher_lr", "lr_masks", "lr_weights", "finetune_lr"):
            _check_positive(key, getattr(self, key))
        for key in ("kl_weight", "hidden_weight"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{key} must be a number >= 0, got {v!r}")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"tolerance must be in (0, 1), got {self.tolerance!r}")
        if self.logvar_init is not None and (isinstance(self.logvar_init, bool)
                                             or not isinstance(self.logvar_init, (int, float))
                                             or not math.isfinite(self.logvar_init)):
            raise ConfigError(f"logvar_init must be a finite number, got {self.logvar_init!r}")
        if self.keep_sharpness is not None:
            _check_positive("keep_sharpness", self.keep_sharpness)
        if self.kl_normalisation is not None:
            from vtrans.config import KL_NORMALISATIONS

            if self.kl_normalisation not in KL_NORMALISATIONS:
                raise ConfigError(f"kl_normalisation must be one of {list(KL_NORMALISATIONS)}, "
                                  f"got {self.kl_normalisation!r}")
        if self.kl_multipliers is not None:
            from vtrans.config import STRUCTURES

            if not isinstance(self.kl_multipliers, dict):
                raise ConfigError(f"kl_multipliers must map structure -> number, got {self.kl_multipliers!r}")
            for k, v in self.kl_multipliers.items():
                if k not in STRUCTURES:
                    raise ConfigError(f"kl_multipliers has unknown structure {k!r}; choose from {list(STRUCTURES)}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ConfigError(f"kl_multipliers.{k} must be a number >= 0, got {v!r}")

    def seeds_of(self, method: str) -> int:
        """How many pruning seeds ``method`` runs."""
        if method in DETERMINISTIC:
            return max(1, self.finetune_seeds)
        return self.trained_seeds if method in VIB_METHODS else self.seeds


@dataclass
class OverheadProfile:
    """The small pipeline run twice for the Ray overhead: through the stage DAG on local Ray (``vtrans run``) and
    as the same stages in one plain process. One Ray Train worker with one CPU, one thread in the plain process."""

    model: str = "minilm"
    """A built-in model or a local directory (a sequence classifier on Rotten Tomatoes)."""
    train_samples: int = 512
    test_samples: int = 256
    max_length: int = 64
    teacher_steps: int = 20
    prune_steps: int = 20
    finetune_steps: int = 20
    batch_size: int = 16
    method: Literal["vtrans", "fast", "faster"] = "faster"
    budget: float = 0.5
    tolerance: float = 0.005
    latency: LatencyProfile = field(default_factory=lambda: LatencyProfile(batch_sizes=[1, 32], repeats=3, warmup=1))

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"overhead.model must be a non-empty string, got {self.model!r}")
        for key in ("train_samples", "test_samples", "max_length", "teacher_steps", "prune_steps", "finetune_steps",
                    "batch_size"):
            _check_int(f"overhead.{key}", getattr(self, key), 1)
        if self.method not in VIB_METHODS:
            raise ConfigError(f"overhead.method must be one of {list(VIB_METHODS)}, got {self.method!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget < 1:
            raise ConfigError(f"overhead.budget must be a fraction in (0, 1), got {self.budget!r}")


@dataclass
class Profile:
    """A whole benchmark: the tasks, the overhead comparison and where the work runs."""

    name: str
    description: str
    """One line: what the profile is for."""
    encoder: TaskProfile | None = None
    decoder: TaskProfile | None = None
    overhead: OverheadProfile | None = None
    executor: Literal["local", "ray"] = "local"
    """``local``: the grid in this process; ``ray``: every cell a Ray task (a cluster runs them side by side)."""
    threads: int | None = None
    """``torch.set_num_threads`` for training and evaluation in this process (None: torch's default)."""
    cpus_per_cell: float = 1.0
    """CPUs a cell's Ray task holds (``executor=ray``); also its torch threads."""
    teacher_workers: int = 1
    """With ``executor=ray`` the teacher is the pipeline's own teacher stage, a Ray Train job with this many
    data-parallel workers (one CPU each, or one GPU each with ``--device cuda``); ``local``: a loop in this process."""

    def __post_init__(self) -> None:
        if self.encoder is None and self.decoder is None:
            raise ConfigError("a profile needs at least one of encoder and decoder")
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"executor must be one of ['local', 'ray'], got {self.executor!r}")
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        _check_positive("cpus_per_cell", self.cpus_per_cell)
        _check_int("teacher_workers", self.teacher_workers, 1)
        for _, t in self.tasks():
            if t.teacher_batch % self.teacher_workers:
                raise ConfigError(f"{t.label}: teacher_batch={t.teacher_batch} must be divisible by teacher_workers="
                                  f"{self.teacher_workers}")
        labels = [t.label for _, t in self.tasks()]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"encoder.label and decoder.label must differ, got {labels!r}")

    def tasks(self) -> list[tuple[str, TaskProfile]]:
        """``[(kind, section)]`` of the tasks present, encoder first."""
        return [(k, t) for k in ("encoder", "decoder") if (t := getattr(self, k)) is not None]


_ALL = list(METHODS)

PROFILES: dict[str, Profile] = {
    # the end-to-end check of every code path (as quick runs it), nothing measured seriously
    "smoke": Profile(
        name="smoke", description="every code path on a few steps and samples (seconds per cell)",
        encoder=TaskProfile(label="minilm", model="minilm", budgets=[0.5, 0.3], methods=_ALL, train_samples=256,
                            test_samples=64, seq_len=32, prune_steps={"vtrans": 3, "fast": 3, "faster": 3},
                            finetune_steps=3, seeds=2, trained_seeds=1, finetune_seeds=1, calibration_fraction=0.25,
                            teacher_steps=6, teacher_batch=16, prune_batch=8, kwon_samples=32, kwon_batch=16,
                            finetune_batch=8, eval_batch=64,
                            kl_normalisation="unit",
                            latency=LatencyProfile(batch_sizes=[1, 4], seq_len=32, repeats=2, warmup=1)),
        decoder=TaskProfile(label="smollm2", model="smollm2", budgets=[0.7], methods=_ALL, train_samples=32,
                            test_samples=8, seq_len=32, prune_steps={"vtrans": 2, "fast": 2, "faster": 2},
                            finetune_steps=2, seeds=1, trained_seeds=1, finetune_seeds=1, calibration_fraction=None,
                            calibration_count=8, prune_batch=2, kwon_samples=8, kwon_batch=4, finetune_batch=2,
                            eval_batch=8, hidden_weight=0.0,
                            kl_normalisation="unit",
                            latency=LatencyProfile(batch_sizes=[1, 2], seq_len=32, repeats=2, warmup=1)),
        overhead=OverheadProfile(train_samples=64, test_samples=32, max_length=32, teacher_steps=2, prune_steps=2,
                                 finetune_steps=2, batch_size=8,
                                 latency=LatencyProfile(batch_sizes=[1], seq_len=32, repeats=2, warmup=1)),
        executor="ray", threads=1, cpus_per_cell=1.0, teacher_workers=2,
    ),
    # this 2-core CPU machine within 45 minutes: two cells at a time, one thread each (two threads per process on
    # two shared cores ran 3x slower than one here)
    "quick": Profile(
        name="quick", description="the 2-core CPU development machine within 45 minutes: every measure, cut steps, "
                                  "samples and seeds, SmolLM2 at one budget",
        encoder=TaskProfile(label="minilm", model="minilm", budgets=[0.7, 0.5, 0.3, 0.2], methods=_ALL,
                            train_samples=4000, test_samples=1000, seq_len=64,
                            prune_steps={"vtrans": 200, "fast": 100, "faster": 100}, finetune_steps=50, seeds=3,
                            trained_seeds=3, finetune_seeds=1, calibration_fraction=0.03, teacher_steps=200,
                            teacher_batch=32, prune_batch=16, kwon_samples=128, kwon_batch=32, finetune_batch=16,
                            kl_normalisation="unit",
                            latency=LatencyProfile(batch_sizes=[1, 32], seq_len=128, repeats=5, warmup=1)),
        decoder=TaskProfile(label="smollm2", model="smollm2", budgets=[0.7], methods=_ALL, train_samples=128,
                            test_samples=16, seq_len=128, prune_steps={"vtrans": 8, "fast": 8, "faster": 12},
                            finetune_steps=5, seeds=1, trained_seeds=1, finetune_seeds=1,
                            calibration_fraction=None, calibration_count=32, prune_batch=4, kwon_samples=16,
                            kwon_batch=8, finetune_batch=4, eval_batch=8, hidden_weight=0.0,
                            kl_normalisation="unit",
                            latency=LatencyProfile(batch_sizes=[1, 8], seq_len=128, repeats=3, warmup=1)),
        overhead=OverheadProfile(),
        executor="ray", threads=1, cpus_per_cell=1.0, teacher_workers=2,
    ),
    # the recipe ablations of the VIB methods (issue 16): MiniLM at two budgets, every budget trained on its own, no
    # fine-tune, one seed; a row is this profile with the recipe's overrides (pipelines/BENCHMARKS.md,
    # "The VIB recipe (issue 16): ablations")
    "ablation": Profile(
        name="ablation", description="VIB recipe ablations: MiniLM, Faster-VTrans and Kwon at 50% and 20% of block "
                                     "parameters, one training per budget, no fine-tune, one seed",
        encoder=TaskProfile(label="minilm", model="minilm", budgets=[0.5, 0.2], methods=["kwon", "faster"],
                            train_samples=4000, test_samples=1000, seq_len=64,
                            prune_steps={"vtrans": 200, "fast": 100, "faster": 100}, finetune_steps=0, seeds=1,
                            trained_seeds=1, finetune_seeds=0, calibration_fraction=0.03, teacher_steps=200,
                            teacher_batch=32, prune_batch=16, shared_posterior=False, kwon_samples=128,
                            kwon_batch=32, finetune_batch=16, lr_masks=0.05,
                            latency=LatencyProfile(batch_sizes=[1], seq_len=128, repeats=1, warmup=0)),
        executor="ray", threads=1, cpus_per_cell=1.0, teacher_workers=1,
    ),
    # a GPU cluster (--device cuda): paper-like settings, every cell a Ray task with a GPU
    "full": Profile(
        name="full", description="a GPU cluster (--device cuda): paper-like steps, all budgets, 3 seeds everywhere, "
                                 "one VIB training per budget, cells side by side as Ray tasks with a GPU each",
        encoder=TaskProfile(label="minilm", model="minilm", budgets=[0.7, 0.5, 0.3, 0.2], methods=_ALL,
                            train_samples=11476, test_samples=1275, seq_len=64,
                            prune_steps={"vtrans": 3000, "fast": 600, "faster": 600}, finetune_steps=1500, seeds=3,
                            trained_seeds=3, finetune_seeds=3, calibration_fraction=0.03, teacher_steps=1200,
                            teacher_batch=32, prune_batch=32, shared_posterior=False, kwon_samples=2048,
                            kwon_batch=32, finetune_batch=32,
                            kl_normalisation="unit",
                            latency=LatencyProfile(batch_sizes=[1, 32], seq_len=128, repeats=20, warmup=3)),
        decoder=TaskProfile(label="smollm2", model="smollm2", budgets=[0.7, 0.5, 0.3, 0.2], methods=_ALL,
                            train_samples=4096, test_samples=256, seq_len=128,
                            prune_steps={"vtrans": 1500, "fast": 500, "faster": 500}, finetune_steps=1000, seeds=3,
                            trained_seeds=3, finetune_seeds=3, calibration_fraction=None, calibration_count=256,
                            prune_batch=8, shared_posterior=False, kwon_samples=512, kwon_batch=8, finetune_batch=8,
                            eval_batch=16, hidden_weight=0.0,
                            kl_normalisation="unit",
                            latency=LatencyProfile(batch_sizes=[1, 32], seq_len=128, repeats=20, warmup=3)),
        overhead=OverheadProfile(),
        executor="ray", cpus_per_cell=4.0, teacher_workers=1,
    ),
}


def load_profile(name: str, overrides: list[str] | None = None) -> Profile:
    """A built-in profile with ``key=value`` overrides (``encoder.prune_steps.vtrans=300``, ``decoder=null``,
    ``executor=ray``): unknown keys and bad values are a :class:`ConfigError` naming the key."""
    if name not in PROFILES:
        import difflib

        close = difflib.get_close_matches(str(name), list(PROFILES), n=1)
        raise ConfigError(f"profile must be one of {sorted(PROFILES)}, got {name!r}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    if not overrides:
        return copy.deepcopy(PROFILES[name])
    return from_dict(Profile, merge_overrides(to_dict(PROFILES[name]), overrides, cls=Profile))


# ---------------------------------------------------------------------------------------------------------------------
# measuring helpers
# ---------------------------------------------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every ``interval`` seconds.

    ``peak_mb``: the highest RSS seen (MB); ``delta_mb``: that peak above the RSS at entry (what the stage itself
    added, in a long-lived process that already holds other models)."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.start_mb = self.peak_mb = self.delta_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self) -> PeakRSS:
        self.start_mb = self.peak_mb = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())
        self.delta_mb = self.peak_mb - self.start_mb

    def as_dict(self) -> dict[str, float]:
        return {"peak_rss_mb": self.peak_mb, "delta_mb": self.delta_mb}


class LoadWatch:
    """The machine's 1-minute load average while the block runs, sampled every ``interval`` seconds: how much other
    work shared the CPUs with the benchmark (every timing depends on it)."""

    def __init__(self, interval: float = 15.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> LoadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def as_dict(self) -> dict[str, float]:
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples), "start": self.samples[0],
                "end": self.samples[-1], "cpus": float(os.cpu_count() or 1)}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# in-process training and the in-process stages
# ---------------------------------------------------------------------------------------------------------------------


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
    from pipelines.stages.calibrate import load_split
    from vtrans.checkpoint import load_tokenizer
    from vtrans.train import DistillConfig, FinetuneConfig, Finetuner

    cfg = ctx.config
    if cfg.model.teacher is not None:
        return StageOutput(outputs={"model": cfg.model.teacher}, info={"source": "given"})
    if cfg.teacher.steps == 0:
        return StageOutput(outputs={"model": str(ctx.model_path)}, info={"source": "dense"})
    data, t = inputs["calibrate"], cfg.teacher
    ft = FinetuneConfig(steps=t.steps, lr=t.lr, batch_size=t.batch_size, task=cfg.task, seed=t.seed,
                        distill=DistillConfig(logit_weight=0.0))
    torch.manual_seed(t.seed)  # the new classification head
    model = load_model(str(ctx.model_path), cfg.task, data.info.get("num_labels"), device)
    history = train_in_process(Finetuner(model, ft), load_split(data, "train", cfg.task), data.info["pad_token_id"],
                               device, "teacher")
    model.eval()
    out = _save(model, work / "model", load_tokenizer(ctx.model_path))
    return StageOutput(outputs={"model": str(out)}, metrics={"final_loss": history[-1]["loss"]},
                       info={"source": "fine-tuned", "steps": t.steps, "in_process": True})


def _local_prune(ctx, work: Path, inputs: dict, run_id: str | None, device: str = "cpu"):
    """The prune stage in this process (no posterior reuse)."""
    from pipelines.stages.base import StageOutput
    from pipelines.stages.calibrate import load_split
    from vtrans import compress
    from vtrans.checkpoint import load_tokenizer
    from vtrans.train import Pruner

    cfg = ctx.config
    data, teacher_dir = inputs["calibrate"], inputs["teacher"].outputs["model"]
    split = "calibration" if cfg.calibrates else "train"
    num_labels = data.info.get("num_labels")
    model = load_model(teacher_dir, cfg.task, num_labels, device)
    teacher = load_model(teacher_dir, cfg.task, num_labels, device) if cfg.prune.method != "faster" else None
    from pipelines.train_jobs import prune_calibration

    pruner = Pruner(model, cfg.prune, teacher)
    dataset = load_split(data, split, cfg.task)
    train_in_process(pruner, dataset, data.info["pad_token_id"], device, "prune")  # warm start included
    pruner.finish()
    if cfg.prune.reconstruct:
        pruner.reconstruct(prune_calibration(dataset, cfg.prune, data.info["pad_token_id"], device))
    out = _save(compress(pruner.vib).eval(), work / "compressed", load_tokenizer(teacher_dir))
    return StageOutput(outputs={"compressed": str(out)}, info={"split": split})


def _local_finetune(ctx, work: Path, inputs: dict, run_id: str | None, device: str = "cpu"):
    """The finetune stage in this process."""
    from pipelines.stages.base import StageOutput
    from pipelines.stages.calibrate import load_split
    from vtrans.checkpoint import load_tokenizer
    from vtrans.train import Finetuner

    cfg = ctx.config
    pruned = inputs["prune"].outputs["compressed"]
    if cfg.finetune.steps == 0:
        return StageOutput(outputs={"model": pruned}, info={"fine_tuned": False})
    data, teacher_dir = inputs["calibrate"], inputs["teacher"].outputs["model"]
    model = load_model(pruned, cfg.task, None, device)
    teacher = load_model(teacher_dir, cfg.task, data.info.get("num_labels"), device)
    train_in_process(Finetuner(model, cfg.finetune, teacher), load_split(data, "train", cfg.task),
                     data.info["pad_token_id"], device, "finetune")
    model.eval()
    out = _save(model, work / "model", load_tokenizer(pruned))
    return StageOutput(outputs={"model": str(out)}, info={"fine_tuned": True})


def _local_evaluate(ctx, work: Path, inputs: dict, run_id: str | None, device: str = "cpu"):
    """The evaluate stage in this process: both models measured here, one after the other."""
    from pipelines.stages import evaluate
    from pipelines.stages.base import StageOutput

    cfg = ctx.config
    data = inputs["calibrate"]
    test, pad = data.outputs["test"], data.info["pad_token_id"]
    comp = evaluate.measure(inputs["finetune"].outputs["model"], cfg.task, test, cfg, pad, "compressed")
    dense = evaluate.measure(inputs["teacher"].outputs["model"], cfg.task, test, cfg, pad, "dense")
    metrics = evaluate.compare(cfg, dense, comp)
    (work / "report.md").write_text(evaluate.markdown(cfg, metrics, f"{comp['device']} ({comp['threads']} threads)"))
    return StageOutput(outputs={"report_md": str(work / "report.md")}, metrics=metrics)


def local_stages(device: str) -> dict[str, LocalStage]:
    """Every pipeline stage as a :class:`LocalStage` (calibrate is the stage itself: it needs no Ray)."""
    from pipelines.stages import calibrate, evaluate, finetune, prune, teacher

    return {"calibrate": LocalStage(calibrate, calibrate.run),
            "teacher": LocalStage(teacher, functools.partial(_local_teacher, device=device)),
            "prune": LocalStage(prune, functools.partial(_local_prune, device=device)),
            "finetune": LocalStage(finetune, functools.partial(_local_finetune, device=device)),
            "evaluate": LocalStage(evaluate, functools.partial(_local_evaluate, device=device))}


# ---------------------------------------------------------------------------------------------------------------------
# per task: data and teacher (cached), the dense reference
# ---------------------------------------------------------------------------------------------------------------------


def task_config(kind: str, t: TaskProfile, out: Path, teacher_workers: int = 1, device: str = "cpu") -> PipelineConfig:
    """The pipeline config whose ``calibrate`` and ``teacher`` stages give this task's data and teacher."""
    task, data_name, _ = KINDS[kind]
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
    from vtrans.evaluate import accuracy, perplexity

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
    fn = accuracy if metric == "accuracy" else perplexity
    quality = fn(model, test, data.info["pad_token_id"], batch_size=t.eval_batch)
    dense = {"quality": quality, **vtrans.count(model, seq_len=t.latency.seq_len).as_dict()}
    sizes = {s: int(data.metrics[f"{s}_samples"]) for s in ("train", "test", "calibration")}
    _log(f"{t.label}: data {data.status}, teacher {teacher.status}; dense {metric} {quality:.4f}, "
         f"params blocks {dense['params_blocks']:,}; " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return TaskSetup(kind=kind, label=t.label, task=task, metric=metric, splits=dict(data.outputs), sizes=sizes,
                     pad_token_id=data.info["pad_token_id"], num_labels=num_labels,
                     teacher_dir=teacher.outputs["model"], keys=keys, dense=dense, stages=stages,
                     model_name=t.model if t.model not in ("minilm", "smollm2") else
                     {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}[t.model],
                     data_name={"rotten_tomatoes": "Rotten Tomatoes", "wikipedia": "Wikipedia text"}[data_name])


# ---------------------------------------------------------------------------------------------------------------------
# cells: (task, method, seed) -> a row per budget, without and with the fine-tune
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CellSpec:
    """Everything one cell needs; picklable (a Ray task's argument)."""

    setup: TaskSetup
    profile: TaskProfile
    method: str
    seed: int
    finetune: bool
    device: str
    threads: int | None
    models_dir: str
    """Where seed 0 saves its compressed models (what the latency phase times)."""
    cache_file: str

    @property
    def save_models(self) -> bool:
        return self.seed == 0


def cell_key(setup: TaskSetup, t: TaskProfile, method: str, seed: int, finetune: bool, device: str) -> str:
    """What a cell's rows depend on: the task's settings (not the seed counts or how latency is timed), the method
    and seed, the data and teacher, the device and the code version."""
    settings = {k: v for k, v in to_dict(t).items()
                if k not in ("label", "methods", "seeds", "trained_seeds", "finetune_seeds", "latency")}
    settings["flops_seq_len"] = t.latency.seq_len  # the rows' FLOPs are counted at it
    for k in OPTIONAL_SETTINGS:  # a setting added later, left at None, keeps the cells computed before it valid
        if settings.get(k) is None:
            settings.pop(k, None)
    if method not in VIB_METHODS:
        settings = {k: v for k, v in settings.items()
                    if k not in ("prune_steps", "prune_batch", "lr_masks", "lr_weights", "kl_weight", "kl_multipliers",
                                 "kl_normalisation", "logvar_init", "keep_sharpness",
                                 "hidden_weight", "shared_posterior")}
    return config_hash({"settings": settings, "method": method, "seed": seed, "finetune": finetune,
                        "data": setup.keys, "device": device, "version": CELL_VERSION})


def _budget(t: TaskProfile, b: float):
    import vtrans

    return vtrans.Budget(params=b, tolerance=t.tolerance)


def _kwon_batches(train, t: TaskProfile, seed: int, pad: int) -> list[dict[str, torch.Tensor]]:
    """Kwon's calibration data: ``kwon_samples`` training samples drawn with the seed, in batches."""
    from pipelines.train_jobs import calibration_batches

    return calibration_batches(train, t.kwon_samples, t.kwon_batch, seed, pad)


def _compressions(spec: CellSpec, teacher, train, calibration) -> Iterator[tuple[float, Any, dict]]:
    """``(budget, compressed model, info)`` for every budget of the cell's method, each timed and RSS-sampled."""
    import vtrans
    from vtrans.train import DistillConfig, PruneConfig, Pruner

    s, t, m = spec.setup, spec.profile, spec.method
    budgets = sorted(t.budgets, reverse=True)

    def fresh():
        return load_model(s.teacher_dir, s.task, s.num_labels, spec.device)

    if m in TRAINING_FREE:
        from vtrans.fisher import kwon_prune

        batches = _kwon_batches(train, t, spec.seed, s.pad_token_id) if m == "kwon" else None
        for b in budgets:
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                model = fresh().eval()
                vib = vtrans.attach(model)
                if m == "kwon":
                    kwon_prune(vib, batches, _budget(t, b), tune=t.kwon_tune is not False)
                else:
                    vib.apply_budget(_budget(t, b), scores=vtrans.score(model, m, seed=spec.seed), method=m)
                small = vtrans.compress(vib).eval()
                dt = time.perf_counter() - t0
            samples = sum(len(x["input_ids"]) for x in batches) if batches else None
            yield b, small, {"compress_s": dt, "prune_samples": samples, "rss": {"compress": rss.as_dict()}}
        return

    steps = t.prune_steps[m]
    data = calibration if m in ("fast", "faster") else train
    recon_batches = _kwon_batches(train, t, spec.seed, s.pad_token_id) if t.reconstruct else None  # as Kwon's tuning
    hidden = t.hidden_weight if m != "faster" else 0.0

    def train_vib(b: float):
        cfg = PruneConfig(method=m, task=s.task, budget=_budget(t, b), steps=steps, rounds=1, finetune_steps=0,
                          batch_size=t.prune_batch, lr_masks=t.lr_masks, lr_weights=t.lr_weights, seed=spec.seed,
                          calibration_samples=t.kwon_samples,
                          **{k: getattr(t, k) for k in PRUNE_SETTINGS if getattr(t, k) is not None},
                          vib=vtrans.VIBConfig(kl_weight=t.kl_weight, kl_multipliers=dict(t.kl_multipliers or {}),
                                               **{k: getattr(t, k) for k in ("kl_normalisation", *VIB_SETTINGS)
                                                  if getattr(t, k) is not None},
                                               seed=spec.seed),
                          distill=DistillConfig(hidden_weight=hidden,
                                                cache_teacher=s.task == "seq-cls" and m != "vtrans"))
        pruner = Pruner(fresh(), cfg, teacher if m != "faster" else None)
        history = train_in_process(pruner, data, s.pad_token_id, spec.device, f"{s.label} {m} s{spec.seed} -> {b:g}")
        return pruner, history

    def expected(history: list[dict]) -> dict[str, float]:
        last = [h for h in history if "expected_size" in h]
        return {"final_expected_size": last[-1]["expected_size"], "final_kl": last[-1]["kl"]} if last else {}

    if t.shared_posterior:
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            pruner, history = train_vib(min(budgets))
            train_s = time.perf_counter() - t0
        posterior = {k: v.clone() for k, v in pruner.vib.state_dict().items()}
        for b in budgets:
            with PeakRSS() as rss_b:
                t0 = time.perf_counter()
                pruner.vib.load_state_dict(posterior)  # a reconstruction rescaled the last budget's means
                pruner.vib.apply_budget(_budget(t, b), method=m)
                if pruner.config.reconstruct:
                    pruner.reconstruct(recon_batches)
                small = vtrans.compress(pruner.vib).eval()
                dt = time.perf_counter() - t0
            yield b, small, {"compress_s": train_s + dt, "train_s": train_s, "threshold_s": dt,
                             "compress_group": f"posterior@{min(budgets):g}", "prune_steps": steps,
                             "prune_samples": len(data), **expected(history),
                             "rss": {"compress": {"peak_rss_mb": max(rss.peak_mb, rss_b.peak_mb),
                                                  "delta_mb": max(rss.delta_mb, rss_b.peak_mb - rss.start_mb)}}}
        return
    for b in budgets:
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            pruner, history = train_vib(b)
            pruner.finish()
            if pruner.config.reconstruct:
                pruner.reconstruct(recon_batches)
            small = vtrans.compress(pruner.vib).eval()
            dt = time.perf_counter() - t0
        yield b, small, {"compress_s": dt, "prune_steps": steps, "prune_samples": len(data), **expected(history),
                         "rss": {"compress": rss.as_dict()}}
        del pruner


def _quality(setup: TaskSetup, model, test, batch: int) -> float:
    from vtrans.evaluate import accuracy, perplexity

    fn = accuracy if setup.metric == "accuracy" else perplexity
    return fn(model, test, setup.pad_token_id, batch_size=batch)


def run_cell(spec: CellSpec) -> list[dict]:
    """Compress to every budget, evaluate, fine-tune (when ``spec.finetune``) and evaluate again: the cell's rows.
    Writes them to ``spec.cache_file`` (what a re-run reads instead of computing)."""
    import vtrans
    from vtrans.train import DistillConfig, FinetuneConfig, Finetuner

    s, t = spec.setup, spec.profile
    started = time.perf_counter()
    rows: list[dict] = []
    with torch_threads(spec.threads):
        train, test, calibration = (load_split_ds(s, split) for split in ("train", "test", "calibration"))
        teacher = load_model(s.teacher_dir, s.task, s.num_labels, spec.device).eval()
        for b, small, info in _compressions(spec, teacher, train, calibration):
            rss = dict(info.pop("rss"))
            with PeakRSS() as r_eval:
                q = _quality(s, small, test, t.eval_batch)
            rss["evaluate"] = r_eval.as_dict()
            counts = vtrans.count(small, seq_len=t.latency.seq_len).as_dict()
            base = {"task": s.label, "method": spec.method, "budget": b, "seed": spec.seed, **info,
                    **{k: v for k, v in counts.items() if k != "seq_len"},
                    "target_params_blocks": b * s.dense["params_blocks"],
                    "budget_met": bench_report.budget_met(counts["params_blocks"], s.dense["params_blocks"], b,
                                                          t.tolerance)}
            if spec.save_models:
                base["model_dir"] = str(_save(small, Path(spec.models_dir) / spec.method / f"p{b:g}"))
            if spec.method not in DETERMINISTIC or spec.seed == 0:  # the other seeds repeat seed 0's pruning
                rows.append({**base, "finetuned": False, "quality": q, "rss": rss})
            _log(f"{s.label} {spec.method} p{b:g} s{spec.seed}: {s.metric} {q:.4f} (params blocks "
                 f"{counts['params_blocks']:,}, {info['compress_s']:.1f}s)")
            if not spec.finetune:
                continue
            ft = FinetuneConfig(steps=t.finetune_steps, lr=t.finetune_lr, batch_size=t.finetune_batch, task=s.task,
                                seed=spec.seed, distill=DistillConfig(cache_teacher=s.task == "seq-cls"))
            with PeakRSS() as r_ft:
                t0 = time.perf_counter()
                small.train()
                train_in_process(Finetuner(small, ft, teacher), train, s.pad_token_id, spec.device,
                                 f"{s.label} {spec.method} p{b:g} s{spec.seed} finetune")
                small.eval()
                ft_s = time.perf_counter() - t0
            with PeakRSS() as r_eval:
                q_ft = _quality(s, small, test, t.eval_batch)
            rows.append({**base, "finetuned": True, "quality": q_ft, "finetune_s": ft_s,
                         "finetune_steps": t.finetune_steps,
                         "rss": {**rss, "finetune": r_ft.as_dict(), "evaluate": r_eval.as_dict()}})
            _log(f"{s.label} {spec.method} p{b:g} s{spec.seed} fine-tuned: {s.metric} {q_ft:.4f} ({ft_s:.1f}s)")
            del small
    cache = Path(spec.cache_file)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"rows": rows, "wall_s": time.perf_counter() - started}, indent=1))
    os.replace(tmp, cache)
    return rows


@dataclass
class _Split:
    """The part of a calibrate stage result that :func:`pipelines.stages.calibrate.load_split` reads."""

    outputs: dict[str, str]


def load_split_ds(setup: TaskSetup, split: str):
    from pipelines.stages.calibrate import load_split

    return load_split(_Split(setup.splits), split, setup.task)


def cached_rows(spec: CellSpec) -> list[dict] | None:
    """The rows of a finished cell with the same key (and its saved models), or None."""
    f = Path(spec.cache_file)
    if not f.is_file():
        return None
    try:
        rows = json.loads(f.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None
    if spec.save_models and not all(Path(r.get("model_dir", "")).is_dir() for r in rows if not r["finetuned"]):
        return None
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# latency
# ---------------------------------------------------------------------------------------------------------------------


def measure_latency(setup: TaskSetup, lat: LatencyProfile, models: list[tuple[str, float, str]],
                    device: str) -> dict:
    """Dense, then every compressed model, then dense again (the drift), one after the other with fixed threads."""
    import vtrans
    from vtrans.latency import op_times, time_forward

    def timings(path: str, ops: bool = True) -> tuple[dict[str, dict], int, dict[str, float] | None]:
        model = load_model(path, setup.task, setup.num_labels, device).eval()
        flops = vtrans.count(model, seq_len=lat.seq_len).flops_total
        out = {}
        for b in lat.batch_sizes:
            tm = time_forward(model, b, lat.seq_len, repeats=lat.repeats, warmup=lat.warmup)
            out[str(b)] = {"median_ms": tm.median_ms, "p90_ms": tm.p90_ms, "throughput": tm.throughput,
                           "tokens_per_s": tm.tokens_per_s}
        # where the time goes at the smallest batch (profiled separately: the profiler slows what it watches)
        split = op_times(model, min(lat.batch_sizes), lat.seq_len, repeats=max(1, min(3, lat.repeats)),
                         warmup=min(1, lat.warmup)) if ops else None
        del model
        return out, flops, split

    with torch_threads(lat.threads), PeakRSS() as rss:
        dense, dense_flops, dense_ops = timings(setup.teacher_dir)
        entries = []
        for method, budget, path in models:
            tm, flops, ops = timings(path)
            red = bench_report.flops_reduction(dense_flops, flops)
            for b, v in tm.items():
                v["speedup"] = bench_report.speedup(dense[b]["median_ms"], v["median_ms"])
                v["speedup_per_flops"] = bench_report.speedup_per_flops(v["speedup"], red)
            entries.append({"method": method, "budget": budget, "flops_total": flops, "flops_reduction": red,
                            "timings": tm, "ops": ops})
            _log(f"{setup.label} latency {method} p{budget:g}: " + ", ".join(
                f"b{b} {v['median_ms']:.1f} ms ({v['speedup']:.2f}x, ÷FLOPs {v['speedup_per_flops']:.2f})"
                for b, v in tm.items()))
        dense_end, _, _ = timings(setup.teacher_dir, ops=False)
    return {"device": device, "threads": lat.threads if device == "cpu" else None, "seq_len": lat.seq_len,
            "repeats": lat.repeats, "warmup": lat.warmup, "batch_sizes": lat.batch_sizes, "dense": dense,
            "dense_end": dense_end, "dense_flops_total": dense_flops, "dense_ops": dense_ops,
            "ops_batch_size": min(lat.batch_sizes), "models": entries, "rss": rss.as_dict()}


# ---------------------------------------------------------------------------------------------------------------------
# Ray overhead
# ---------------------------------------------------------------------------------------------------------------------


def overhead_config(ov: OverheadProfile, root: Path, tracking_uri: str, device: str) -> PipelineConfig:
    return from_dict(PipelineConfig, {
        "name": "bench-ray-overhead",
        "model": {"name": ov.model, "task": "seq-cls", "num_labels": 2},
        "data": {"name": "rotten_tomatoes", "label_column": "label", "max_length": ov.max_length,
                 "max_train_samples": ov.train_samples, "max_test_samples": ov.test_samples},
        "calibration": {"fraction": 0.25},
        "teacher": {"steps": ov.teacher_steps, "batch_size": ov.batch_size},
        "prune": {"method": ov.method, "budget": {"params": ov.budget, "tolerance": ov.tolerance},
                  "steps": ov.prune_steps, "batch_size": ov.batch_size},
        "finetune": {"steps": ov.finetune_steps, "batch_size": ov.batch_size},
        "evaluate": {"latency_batch_sizes": ov.latency.batch_sizes, "latency_seq_lens": [ov.latency.seq_len],
                     "latency_repeats": ov.latency.repeats, "warmup": ov.latency.warmup,
                     "threads": ov.latency.threads},
        "ray": {"num_workers": 1, "cpus_per_worker": 1.0, "use_gpu": device == "cuda"},
        "tracking": {"uri": tracking_uri, "experiment": EXPERIMENT},
        "output": str(root)})


def run_local_pipeline(cfg: PipelineConfig, device: str) -> dict:
    """The pipeline's stages in this process, in order, everything recomputed; wall time and peak RSS per stage."""
    from pipelines.stages import NAMES, STAGES
    from pipelines.stages.base import StageContext, execute
    from pipelines.validate import preflight, with_absolute_paths

    t0 = time.perf_counter()
    checked = preflight(cfg)
    ctx = StageContext(config=with_absolute_paths(cfg), root=str(Path(cfg.output).resolve()), keys=checked.keys,
                       rerun=frozenset(NAMES), model_path=checked.model_path)
    stages = local_stages(device)
    results, out = {}, {}
    with torch_threads(int(cfg.ray.cpus_per_worker)):
        for stage in STAGES:
            with PeakRSS() as rss:
                results[stage.NAME] = execute(stages[stage.NAME], ctx, {n: results[n] for n in stage.NEEDS})
            out[stage.NAME] = {"wall_s": results[stage.NAME].wall_s, **rss.as_dict()}
    return {"wall_s": time.perf_counter() - t0, "stages": out,
            "metrics": {k: v for k, v in results["evaluate"].metrics.items() if isinstance(v, float)}}


def _dag_peak_rss(result) -> float | None:
    """The peak RSS a DAG stage recorded: its Ray Train rank 0 worker's, or the evaluation's measuring processes'."""
    f = Path(result.dir) / "train" / "output" / "resources.json"
    if f.is_file():
        return json.loads(f.read_text()).get("peak_rss_mb")
    peaks = [result.metrics.get(k) for k in ("peak_rss_mb", "dense_peak_rss_mb")]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def ray_overhead(ov: OverheadProfile, out: Path, tracker, parent_run_id: str, device: str) -> dict:
    """The small pipeline in one plain process, then through the stage DAG on a freshly started local Ray (both from
    scratch, every stage recomputed). Ray is shut down afterwards."""
    import ray

    from pipelines.dag import run_pipeline
    from pipelines.ray_runtime import init_ray

    root = out / "overhead"
    if ray.is_initialized():  # the DAG gets a fresh Ray, as `vtrans run` does: no warm workers of the cells
        ray.shutdown()
    _log("ray overhead: the pipeline in one plain process")
    local = run_local_pipeline(overhead_config(ov, root / "local", tracker.uri, device), device)
    t0 = time.perf_counter()
    init_ray()
    ray_init_s = time.perf_counter() - t0
    _log(f"ray overhead: Ray started in {ray_init_s:.1f}s; the pipeline as the stage DAG")
    t0 = time.perf_counter()
    run = run_pipeline(overhead_config(ov, root / "dag", tracker.uri, device), force=True)
    dag_s = time.perf_counter() - t0
    tracker.set_tags(run.run_id, {"mlflow.parentRunId": parent_run_id, "bench.role": "ray-overhead-dag"})
    dag = {"wall_s": dag_s, "run_id": run.run_id,
           "stages": {n: {"wall_s": r.wall_s, "peak_rss_mb": _dag_peak_rss(r), "status": r.status}
                      for n, r in run.results.items()}}
    ray.shutdown()
    desc = (f"{ov.model}, {ov.train_samples} training / {ov.test_samples} test snippets, teacher {ov.teacher_steps} "
            f"steps, {ov.method} to params={ov.budget:g} in {ov.prune_steps} steps, fine-tune {ov.finetune_steps} "
            f"steps (batch {ov.batch_size}), evaluation with latency at batch {ov.latency.batch_sizes} x seq "
            f"{ov.latency.seq_len} ({ov.latency.repeats} repeats); one Ray Train worker (1 CPU) vs one thread")
    return {"description": desc, "ray_init_s": ray_init_s, "local": local, "dag": dag,
            "ratio": bench_report.ratio(dag_s, local["wall_s"], "Ray overhead"),
            "extra_s": dag_s - local["wall_s"], "stages": list(dag["stages"])}


# ---------------------------------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------------------------------


ROW_METRICS = ("quality", "params_blocks", "params_total", "flops_blocks", "flops_total", "target_params_blocks",
               "compress_s", "train_s", "threshold_s", "finetune_s", "final_expected_size", "final_kl")


def _row_run_name(r: dict) -> str:
    return f"{r['task']}/{r['method']}/p{r['budget']:g}/s{r['seed']}/{'finetuned' if r['finetuned'] else 'pruned'}"


def log_row(tracker, parent: str, r: dict, metric: str, dense: dict) -> str:
    """One child run per result row: its identity as params and tags, its numbers as metrics."""
    params = {"task": r["task"], "method": r["method"], "budget": r["budget"], "seed": r["seed"],
              "finetuned": r["finetuned"], "prune_steps": r.get("prune_steps"), "finetune_steps":
              r.get("finetune_steps", 0)}
    tags = {f"bench.{k}": v for k, v in params.items() if k in ("task", "method", "budget", "seed", "finetuned")}
    tags["bench.cached"] = r.get("cached", False)
    run_id = tracker.start_run(_row_run_name(r), parent, params={k: v for k, v in params.items() if v is not None},
                               tags=tags)
    m = {k: float(r[k]) for k in ROW_METRICS if isinstance(r.get(k), (int, float)) and not isinstance(r[k], bool)}
    m[metric] = float(r["quality"])
    m["budget_met"] = float(bool(r["budget_met"]))
    for k in bench_report.SIZE_KEYS:
        m[f"{k}_fraction"] = r[k] / dense[k]
    for stage, v in (r.get("rss") or {}).items():
        m[f"{stage}_peak_rss_mb"] = v["peak_rss_mb"]
        m[f"{stage}_rss_delta_mb"] = v["delta_mb"]
    tracker.log_metrics(run_id, {k: v for k, v in m.items() if math.isfinite(v)})
    tracker.end_run(run_id)
    return run_id


def summary_metrics(results: dict) -> dict[str, float]:
    """The parent run's metrics: per (task, method, budget, fine-tuned) mean and std, ratios, overhead."""
    out: dict[str, float] = {}
    for label, task in results["tasks"].items():
        metric = task["metric"]
        out[f"{label}.dense.{metric}"] = task["dense"]["quality"]
        for (_, m, b, ft), st in bench_report.aggregate(task["rows"]).items():
            key = f"{label}.{m}.p{b:g}.{'finetuned' if ft else 'pruned'}.{metric}"
            out[f"{key}_mean"] = st.mean
            if st.std is not None:
                out[f"{key}_std"] = st.std
        for k, v in bench_report.time_ratios(task).items():
            out[f"{label}.{k}"] = v
        for e in (task.get("latency") or {}).get("models", []):
            for b, v in e["timings"].items():
                out[f"{label}.{e['method']}.p{e['budget']:g}.speedup_b{b}"] = v["speedup"]
                out[f"{label}.{e['method']}.p{e['budget']:g}.speedup_per_flops_b{b}"] = v["speedup_per_flops"]
    if results.get("overhead"):
        out["ray_overhead_ratio"] = results["overhead"]["ratio"]
        out["ray_overhead_extra_s"] = results["overhead"]["extra_s"]
    out["wall_s"] = results["wall_s"]
    return {k: v for k, v in out.items() if math.isfinite(v)}


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------


def machine() -> str:
    import psutil
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GB RAM, {gpu}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def what_ran(profile: Profile, setups: dict[str, TaskSetup], device: str = "cpu") -> list[str]:
    """The profile's settings in words, with the data sizes it found: what the markdown states it did."""
    if profile.executor == "ray":
        where = (f"Executor `ray`: every (task, method, seed) cell a Ray task holding {profile.cpus_per_cell:g} CPU(s)"
                 + (" and a GPU" if device == "cuda" else "") + f" (torch threads {max(1, int(profile.cpus_per_cell))}"
                 f"), as many at once as the cluster holds; the teacher is the pipeline's teacher stage, a "
                 f"{profile.teacher_workers}-worker Ray Train job.")
    else:
        where = ("Executor `local`: the cells one after the other in this process, the teacher a training loop in "
                 "it.")
    threads = f"{profile.threads} torch thread(s)" if profile.threads else "torch's default threads"
    lines = [f"Profile `{profile.name}`: {profile.description}. {where} Data, teacher and dense evaluation in the "
             f"driver with {threads}. Latency measured in the driver after each task's cells, one model at a time."]
    for kind, t in profile.tasks():
        s = setups[t.label]
        seeds = ", ".join(f"{m} {t.seeds_of(m) if m not in DETERMINISTIC else 1}" for m in t.methods)
        teacher = (f"the dense model fine-tuned for {t.teacher_steps} steps (batch {t.teacher_batch}, lr "
                   f"{t.teacher_lr:g}) on the training set" if t.teacher_steps else "the dense model itself")
        vib = ", ".join(f"{m} {t.prune_steps[m]} steps on {s.sizes['calibration' if m != 'vtrans' else 'train']:,}"
                        for m in t.methods if m in VIB_METHODS)
        lines.append(
            f"**{t.label}** ({s.model_name}, {s.data_name}, {s.metric}): {s.sizes['train']:,} training "
            f"{'texts' if kind == 'encoder' else 'chunks'} ({'max ' if kind == 'encoder' else ''}{t.seq_len} tokens), "
            f"{s.sizes['test']:,} held out; teacher: {teacher}. Budgets {', '.join(f'{b:g}' for b in t.budgets)} of "
            f"the block parameters (met within {t.tolerance:.1%} under). Pruning seeds: {seeds}"
            + (" (magnitude is deterministic: one pruning)" if "magnitude" in t.methods else "") + ". "
            f"VIB training (batch {t.prune_batch}, lr masks {t.lr_masks:g}, lr weights {t.lr_weights:g}, KL weight "
            f"{t.kl_weight:g}, KL normalised per {t.kl_normalisation or 'group'}"
            + (f", KL multipliers {t.kl_multipliers}" if t.kl_multipliers else "")
            + (f", initial mask log-variance {t.logvar_init:g}" if t.logvar_init is not None else "")
            + (f", keep sharpness {t.keep_sharpness:g}" if t.keep_sharpness is not None else "")
            + f", layer distillation {t.hidden_weight:g} for vtrans/fast): {vib or 'none'}; "
            + ("one posterior per (method, seed) trained at the smallest budget and re-thresholded to the others. "
               if t.shared_posterior else "one training per budget. ")
            + (f"Kwon: Fisher on {t.kwon_samples} training samples drawn with the seed, mask search, rearrangement "
               f"and least-squares mask tuning. " if "kwon" in t.methods else "")
            + (f"Fine-tune: {t.finetune_steps} steps (batch {t.finetune_batch}, lr {t.finetune_lr:g}, logit "
               f"distillation from the teacher) of seeds 0..{t.finetune_seeds - 1} of every method. "
               if t.finetune_seeds else "No fine-tune. ")
            + f"Latency: batch {t.latency.batch_sizes} x seq {t.latency.seq_len}, {t.latency.repeats} repeats after "
              f"{t.latency.warmup} warm-up, {t.latency.threads} thread(s).")
    if profile.overhead is not None:
        lines.append("Ray overhead: the small pipeline of the last section, run both ways in this command.")
    return lines


class Executor:
    """Runs the cells: one after the other in this process, or as Ray tasks (results in completion order)."""

    def __init__(self, kind: str, device: str, cpus_per_cell: float) -> None:
        self.kind, self.device, self.cpus = kind, device, cpus_per_cell

    def run(self, specs: list[CellSpec]) -> Iterator[tuple[CellSpec, list[dict]]]:
        if self.kind == "local":
            for spec in specs:
                yield spec, run_cell(spec)
            return
        import ray

        from pipelines.ray_runtime import init_ray

        init_ray()
        opts: dict[str, Any] = {"num_cpus": self.cpus, "max_retries": 0}
        if self.device == "cuda":
            opts["num_gpus"] = 1
        task = ray.remote(run_cell).options(name="vtrans-bench-cell", **opts)
        pending = {task.remote(s): s for s in specs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done[0])
            yield spec, ray.get(done[0])


def _cell_specs(setup: TaskSetup, t: TaskProfile, out: Path, device: str, threads: int | None) -> list[CellSpec]:
    specs = []
    for m in t.methods:
        for seed in range(t.seeds_of(m)):
            ft = seed < t.finetune_seeds
            key = cell_key(setup, t, m, seed, ft, device)
            specs.append(CellSpec(setup=setup, profile=t, method=m, seed=seed, finetune=ft, device=device,
                                  threads=threads, models_dir=str(out / "models" / setup.label),
                                  cache_file=str(out / "cells" / setup.label / f"{m}-s{seed}-{key}.json")))
    return specs


def _stage_memory(rows: list[dict], setup: TaskSetup, latency: dict | None) -> dict[str, dict]:
    """Peak RSS per stage: data, teacher, compression (per method), evaluation, fine-tune, latency."""
    out = {k: {"peak_rss_mb": v["peak_rss_mb"], "delta_mb": v["delta_mb"], "runs": 1}
           for k, v in setup.stages.items()}
    for r in rows:
        for stage, v in (r.get("rss") or {}).items():
            name = f"compress ({r['method']})" if stage == "compress" else stage
            cur = out.setdefault(name, {"peak_rss_mb": 0.0, "delta_mb": 0.0, "runs": 0})
            cur["peak_rss_mb"] = max(cur["peak_rss_mb"], v["peak_rss_mb"])
            cur["delta_mb"] = max(cur["delta_mb"], v["delta_mb"])
            cur["runs"] += 1
    if latency:
        out["latency"] = {**latency["rss"], "runs": 1}
    return out


def run_grid(specs: list[CellSpec], executor: Executor, tracker, parent: str) -> list[dict]:
    """Every cell's rows: cached ones read back, the others computed by ``executor``; each row logged as a child run
    as soon as its cell is done (a crash keeps what was finished: the runs and the cell cache)."""
    rows: list[dict] = []

    def add(cell: list[dict], spec: CellSpec, cached: bool) -> None:
        for r in cell:
            r = dict(r, cached=cached)
            r["run_id"] = log_row(tracker, parent, r, spec.setup.metric, spec.setup.dense)
            rows.append(r)

    todo = []
    for spec in specs:
        found = cached_rows(spec)
        if found is None:
            todo.append(spec)
            continue
        _log(f"{spec.setup.label} {spec.method} s{spec.seed}: cached ({spec.cache_file})")
        add(found, spec, cached=True)
    for spec, cell in executor.run(todo):
        add(cell, spec, cached=False)
    return rows


def run_bench(profile: Profile, out: Path, device: str = "cpu", tracking_uri: str | None = None,
              experiment: str = EXPERIMENT, command: str = "", overrides: list[str] | None = None,
              readme: Path | None = None) -> dict:
    """Run the whole benchmark of ``profile`` into ``out``; returns the results written to ``results.json``. With
    ``readme`` its section of this profile (:func:`bench_report.readme_markers`) is replaced by the results."""
    from pipelines.tracking import Tracker

    check_local_resources(profile)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker.connect(tracking_uri, experiment)
    started = time.time()
    load = LoadWatch().__enter__()
    tags = {"bench.profile": profile.name, "bench.device": device, "bench.executor": profile.executor,
            "bench.command": command, "bench.machine": machine()}
    parent = tracker.start_run(f"bench-{profile.name}", params=flatten(profile), tags=tags)
    _log(f"MLflow parent run {parent} in {tracker.uri} (experiment {experiment!r}); output {out}")
    status = "FAILED"
    try:
        executor = Executor(profile.executor, device, profile.cpus_per_cell)
        results: dict[str, Any] = {
            "profile": profile.name, "settings": to_dict(profile), "overrides": list(overrides or []),
            "command": command, "date": time.strftime("%Y-%m-%d", time.localtime(started)),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), "machine": machine(),
            "device": device, "executor": profile.executor, "phases": {},
            "mlflow": {"uri": tracker.uri, "experiment": experiment, "run_id": parent},
            "tasks": {}, "notes": []}
        if profile.executor == "ray":
            from pipelines.ray_runtime import init_ray

            t0 = time.perf_counter()
            init_ray()
            results["ray_start_s"] = time.perf_counter() - t0
        setups: dict[str, TaskSetup] = {}
        with torch_threads(profile.threads):
            for kind, t in profile.tasks():
                phase = time.perf_counter()
                setup = setups[t.label] = prepare_task(kind, t, out, device, profile.executor,
                                                       profile.teacher_workers)
                results["phases"][f"{t.label} data, teacher and dense evaluation"] = time.perf_counter() - phase
                specs = _cell_specs(setup, t, out, device, profile.threads if profile.executor == "local"
                                    else max(1, int(profile.cpus_per_cell)))
                phase = time.perf_counter()
                rows = run_grid(specs, executor, tracker, parent)
                results["phases"][f"{t.label} cells ({len(specs)})"] = time.perf_counter() - phase
                rows.sort(key=lambda r: (bench_report.METHOD_ORDER.index(r["method"]), -r["budget"], r["seed"],
                                         r["finetuned"]))
                models = sorted({(r["method"], r["budget"], r["model_dir"]) for r in rows
                                 if r["seed"] == 0 and not r["finetuned"] and r.get("model_dir")},
                                key=lambda x: (bench_report.METHOD_ORDER.index(x[0]), -x[1]))
                phase = time.perf_counter()
                latency = measure_latency(setup, t.latency, models, device) if models else None
                results["phases"][f"{t.label} latency"] = time.perf_counter() - phase
                _log_latency(tracker, rows, latency)
                results["tasks"][t.label] = {
                    "label": t.label, "kind": kind, "model": t.model, "model_name": setup.model_name,
                    "data_name": setup.data_name, "task": setup.task, "metric": setup.metric, "sizes": setup.sizes,
                    "dense": setup.dense, "tolerance": t.tolerance, "teacher_dir": setup.teacher_dir,
                    "setup": setup.stages, "rows": rows, "latency": latency,
                    "stages": _stage_memory(rows, setup, latency)}
        phase = time.perf_counter()
        results["overhead"] = (ray_overhead(profile.overhead, out, tracker, parent, device)
                               if profile.overhead is not None else None)
        if profile.overhead is not None:
            results["phases"]["Ray overhead (both ways)"] = time.perf_counter() - phase
        results["what_ran"] = what_ran(profile, setups, device)
        load.__exit__(None, None, None)
        results["load_average"] = la = load.as_dict()
        results["notes"].append(f"1-minute load average during the run: mean {la['mean']:.1f}, max {la['max']:.1f} "
                                f"(start {la['start']:.1f}, end {la['end']:.1f}) on {la['cpus']:.0f} CPUs; other work "
                                f"on the machine slows every timing, latency included.")
        results["wall_s"] = time.time() - started
        write_outputs(results, out)
        tracker.log_metrics(parent, summary_metrics(results))
        for name in ("results.json", "results.md", *[f"pareto-{label}.png" for label in results["tasks"]]):
            tracker.log_artifacts(parent, out / name)
        _log_table(tracker, parent, results)
        if readme is not None:
            bench_report.update_readme(readme, results)
            _log(f"updated the {profile.name!r} results section of {readme}")
        status = "FINISHED"
        _log(f"done in {results['wall_s']:.0f}s: {out / 'results.md'}")
        return results
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        load.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            tracker.end_run(parent, status)


def _log_latency(tracker, rows: list[dict], latency: dict | None) -> None:
    """Latency figures on the seed-0 rows' runs (pruned and fine-tuned share the architecture)."""
    if not latency:
        return
    by = {(e["method"], e["budget"]): e for e in latency["models"]}
    for r in rows:
        e = by.get((r["method"], r["budget"]))
        if e is None or r["seed"] != 0:
            continue
        m = {"flops_reduction": e["flops_reduction"]}
        for b, v in e["timings"].items():
            m.update({f"latency_ms_b{b}": v["median_ms"], f"throughput_b{b}": v["throughput"],
                      f"speedup_b{b}": v["speedup"], f"speedup_per_flops_b{b}": v["speedup_per_flops"]})
        r["latency"] = e["timings"]
        tracker.log_metrics(r["run_id"], m)


def _log_table(tracker, parent: str | None, results: dict) -> None:
    """Every row as one MLflow table of the parent run (``rows.json``: the UI's table view)."""
    import pandas as pd

    if parent is None:  # the store went offline: results.json holds the same
        return
    flat = [{k: v for k, v in r.items() if not isinstance(v, dict)} for task in results["tasks"].values()
            for r in task["rows"]]
    tracker.call("log table", tracker.client.log_table, parent, data=pd.DataFrame(flat), artifact_file="rows.json")


def write_outputs(results: dict, out: Path) -> None:
    """``results.json``, ``results.md`` and a Pareto plot per task."""
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    for label, task in results["tasks"].items():
        bench_report.plot_pareto(task, out / f"pareto-{label}.png")
    (out / "results.md").write_text(bench_report.render_markdown(results))


def check_local_resources(profile: Profile, cpus: int | None = None) -> None:
    """With ``executor=ray`` and no cluster to join (no ``$RAY_ADDRESS``), the local Ray has this machine's CPUs: a
    cell asking for more would wait forever, so that is a :class:`ConfigError` before any work. A cluster joined
    through ``$RAY_ADDRESS`` is not checked (it may autoscale)."""
    if profile.executor != "ray" or os.environ.get("RAY_ADDRESS", "local") not in ("", "local"):
        return
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    if profile.cpus_per_cell > cpus:
        raise ConfigError(f"cpus_per_cell={profile.cpus_per_cell:g} is more than the {cpus} CPUs of the local Ray "
                          f"this run would start (no $RAY_ADDRESS): no cell could ever start; set cpus_per_cell={cpus} "
                          f"or lower, or join a cluster")


def render_only(out: Path, readme: str = "auto") -> dict:
    """Rewrite ``results.md``, the Pareto plots and the report section (``pipelines/BENCHMARKS.md``) of a finished run
    from its ``results.json`` (nothing is run or measured again; which file is updated follows the run's profile,
    overrides and experiment, as in :func:`resolve_readme`)."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise ConfigError(f"--out {str(out)!r} has no results.json: run the benchmark into it first")
    results = json.loads(path.read_text())
    target = resolve_readme(readme, results["profile"], results.get("overrides"),
                            results.get("mlflow", {}).get("experiment", EXPERIMENT))
    write_outputs(results, Path(out))
    if target is not None:
        bench_report.update_readme(target, results)
        _log(f"updated the {results['profile']!r} results section of {target}")
    _log(f"rendered {Path(out) / 'results.md'}")
    return results


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be one of ['auto', 'cpu', 'cuda'], got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu")
    return device


def resolve_readme(readme: str, profile: str, overrides: list[str] | None, experiment: str = EXPERIMENT) -> Path | None:
    """The report file the run updates, checked before any work: ``auto`` is ``./pipelines/BENCHMARKS.md`` (relative
    to the working directory: run from the repository root) for the published profiles (quick, full) run as
    published (no overrides, the ``benchmarks`` experiment) when it has the profile's markers, else nothing; an
    explicit path must exist and have them."""
    if readme == "none":
        return None
    if readme == "auto":
        path = Path(BENCHMARKS_REPORT)
        if profile not in ("quick", "full") or overrides or experiment != EXPERIMENT or not path.is_file():
            return None
        return path.resolve() if bench_report.has_readme_markers(path.read_text(), profile) else None
    path = Path(readme).expanduser()
    if not path.is_file():
        raise ConfigError(f"--readme must be an existing file, 'auto' or 'none', got {readme!r}")
    if not bench_report.has_readme_markers(path.read_text(), profile):
        start, end = bench_report.readme_markers(profile)
        raise ConfigError(f"--readme {readme!r} has no {start} ... {end} section for profile {profile!r}")
    return path.resolve()


def _quiet_logs() -> None:
    """Log lines, not carriage-return bars (here and in the Ray workers), and every cell's line from Ray."""
    import transformers

    from pipelines.ray_runtime import worker_env

    os.environ.update(worker_env())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # not "[repeated 3x across cluster]"
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", help=f"one of {sorted(PROFILES)} (default quick)")
    ap.add_argument("--out", default="runs/bench", help="output folder (default runs/bench); cached work is reused")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                                                         "sqlite:///<cwd>/mlflow.db)")
    ap.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    ap.add_argument("--readme", default="auto",
                    help="markdown file whose results section of the profile this run replaces; 'none': no file. "
                         f"Default auto: ./{BENCHMARKS_REPORT} for the quick and full profiles run without overrides, "
                         "else none")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: rewrite results.md, the plots and the --readme section from --out/results.json "
                         "(after a change to the report; the numbers and the command are the run's)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ap.add_argument("overrides", nargs="*", help="profile overrides key=value, e.g. encoder.prune_steps.vtrans=300")
    args = ap.parse_args(argv)
    try:
        if args.render_only:
            render_only(Path(args.out), args.readme)
            return 0
        profile = load_profile(args.profile, args.overrides)
        device = resolve_device(args.device)
        readme = resolve_readme(args.readme, profile.name, args.overrides, args.experiment)
        command = "python -m pipelines.bench " + " ".join(sys.argv[1:] if argv is None else argv)
        _quiet_logs()
        run_bench(profile, Path(args.out), device, args.tracking_uri, args.experiment, command, args.overrides,
                  readme)
    except VtransError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

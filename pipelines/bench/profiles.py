"""What a benchmark runs: the profiles (tasks, budgets, methods, steps, seeds, latency timing, the Ray-overhead
pipeline, where the work runs), the built-in ones and ``key=value`` overrides with their checks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

from pipelines.config import from_dict, merge_overrides, to_dict
from vtrans.checks import check_choice, check_int, check_number
from vtrans.errors import ConfigError

#: The VIB recipe settings of a task (None: the library's default), passed to ``vtrans.VIBConfig`` / ``PruneConfig``.
VIB_SETTINGS = ("logvar_init", "keep_sharpness", "threshold", "selection")
PRUNE_SETTINGS = ("lr_mu", "lr_lambdas", "mask_lr_decay", "warmup", "reconstruct", "init", "init_keep", "warmup_from",
                  "constraint")

METHODS = ("random", "magnitude", "kwon", "vtrans", "fast", "faster")
TRAINING_FREE = ("random", "magnitude", "kwon")
VIB_METHODS = ("vtrans", "fast", "faster")
DETERMINISTIC = ("magnitude",)
"""Methods whose pruning does not depend on the seed: pruned once; their seeds vary only the fine-tune."""


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
            check_int(f"latency.batch_sizes[{i}]", b, 1, what="an int >= 1")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ConfigError(f"latency.batch_sizes lists a batch size twice: {self.batch_sizes!r}")
        check_int("latency.seq_len", self.seq_len, 1, what="an int >= 1")
        check_int("latency.repeats", self.repeats, 1, what="an int >= 1")
        check_int("latency.warmup", self.warmup, 0, what="an int >= 0")
        check_int("latency.threads", self.threads, 1, what="an int >= 1")


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
    lr_masks: float = 0.05
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
    finetune_method: str | None = None
    """``full`` or ``lora`` (``vtrans.finetune.FinetuneConfig.method``: LoRA adapters, merged before the fine-tuned
    row is measured); None: full. LoRA usually wants a higher ``finetune_lr`` (1e-4 - 1e-3)."""
    lora_rank: int | None = None
    """``finetune_method: lora``: the adapters' rank (``vtrans.lora.LoraConfig.rank``); None: the library's default."""
    lora_alpha: float | None = None
    """``finetune_method: lora``: the adapters' alpha; None: the library's default."""
    eval_batch: int = 64
    second_text: str | None = None
    """Decoders: a second built-in text (``lee_news``) whose held-out chunks are scored too (perplexity on a text no
    pruning, calibration or fine-tune saw; ``test_samples`` chunks of ``seq_len`` tokens); None: none."""
    lm_eval_tasks: list[str] | None = None
    """Decoders: lm-evaluation-harness tasks (``lambada_local``, or any task whose data is reachable; ``vtrans[eval]``)
    scored on every row and the dense model, as ``lm_eval_<task>_<metric>``; None: none."""
    lm_eval_limit: int | None = None
    """The first examples of each lm-eval task only; None: all."""
    tolerance: float = 0.005
    """Budgets are met within this fraction under the target (``vtrans.Budget.tolerance``)."""
    uniform: bool | None = None
    """Uniform widths saved as the stock architecture (``vtrans.Budget.uniform``): what loading without vtrans costs
    in quality and speed, against the same profile without it; Kwon's search cannot select them. None: no."""
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
            check_int(key, getattr(self, key), 1, what="an int >= 1")
        check_int("seq_len", self.seq_len, 2, what="an int >= 2")
        for key in ("finetune_steps", "finetune_seeds", "teacher_steps"):
            check_int(key, getattr(self, key), 0, what="an int >= 0")
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
            check_int(f"prune_steps.{m}", s, 1, what="an int >= 1")
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
            check_int("calibration_count", self.calibration_count, 1, what="an int >= 1")
        for key in ("teacher_lr", "lr_masks", "lr_weights", "finetune_lr"):
            check_number(key, getattr(self, key), 0, low_open=True, what="a number > 0")
        for key in ("kl_weight", "hidden_weight"):
            check_number(key, getattr(self, key), 0, what="a number >= 0")
        check_number("tolerance", self.tolerance, 0, 1, low_open=True, high_open=True, what="in (0, 1)")
        if self.kl_multipliers is not None:
            from vtrans.config import STRUCTURES

            if not isinstance(self.kl_multipliers, dict):
                raise ConfigError(f"kl_multipliers must map structure -> number, got {self.kl_multipliers!r}")
            for k, v in self.kl_multipliers.items():
                if k not in STRUCTURES:
                    raise ConfigError(f"kl_multipliers has unknown structure {k!r}; choose from {list(STRUCTURES)}")
                check_number(f"kl_multipliers.{k}", v, 0, what="a number >= 0")
        self._check_recipe()
        self._check_finetune()
        self._check_second_text()
        if self.lm_eval_tasks is not None:
            from vtrans.lm_eval import check_tasks

            check_tasks(self.lm_eval_tasks, "lm_eval_tasks")
        if self.lm_eval_limit is not None:
            check_int("lm_eval_limit", self.lm_eval_limit, 1, what="an int >= 1")
            if self.lm_eval_tasks is None:
                raise ConfigError(f"lm_eval_limit={self.lm_eval_limit!r} needs lm_eval_tasks")
        if self.uniform is not None and not isinstance(self.uniform, bool):
            raise ConfigError(f"uniform must be true or false, got {self.uniform!r}")
        if self.uniform and "kwon" in self.methods:
            raise ConfigError(f"uniform=true: Kwon's search selects per-layer widths, not uniform ones; drop 'kwon' "
                              f"from methods={self.methods!r}")

    def _check_second_text(self) -> None:
        from pipelines.config import DATASET_TASKS

        texts = [k for k, v in DATASET_TASKS.items() if v == "causal-lm"]
        if self.second_text is not None:
            check_choice("second_text", self.second_text, texts)

    def _check_finetune(self) -> None:
        """The fine-tune method and its adapters, checked by the library configs they are passed to."""
        if self.finetune_method is not None:
            check_choice("finetune_method", self.finetune_method, ("full", "lora"))
        if (self.lora_rank is not None or self.lora_alpha is not None) and self.finetune_method != "lora":
            raise ConfigError(f"lora_rank={self.lora_rank!r} / lora_alpha={self.lora_alpha!r} need "
                              f"finetune_method='lora', got finetune_method={self.finetune_method!r}")
        self.lora()

    def lora(self):
        """The :class:`vtrans.lora.LoraConfig` of ``finetune_method: lora`` (the library's defaults where None)."""
        from vtrans.lora import LoraConfig

        given = {k: v for k, v in (("rank", self.lora_rank), ("alpha", self.lora_alpha)) if v is not None}
        try:
            return LoraConfig(**given)
        except ConfigError as e:
            raise ConfigError(f"lora_{str(e).split('finetune.lora.', 1)[-1]}") from None

    def _check_recipe(self) -> None:
        """The VIB recipe settings, checked by the library configs they are passed to (a typo fails here, not after
        the teacher trained)."""
        import vtrans
        from vtrans.train import PruneConfig

        for keys, cls in ((("kl_normalisation", *VIB_SETTINGS), vtrans.VIBConfig), (PRUNE_SETTINGS, PruneConfig)):
            for key in keys:
                value = getattr(self, key)
                if value is None:
                    continue
                try:
                    cls(**{key: value})
                except ConfigError as e:
                    raise ConfigError(f"{key}={value!r}: {e}") from None

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
            check_int(f"overhead.{key}", getattr(self, key), 1, what="an int >= 1")
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
            check_int("threads", self.threads, 1, what="an int >= 1")
        check_number("cpus_per_cell", self.cpus_per_cell, 0, low_open=True, what="a number > 0")
        check_int("teacher_workers", self.teacher_workers, 1, what="an int >= 1")
        for _, t in self.tasks():
            if t.teacher_batch % self.teacher_workers:
                raise ConfigError(f"{t.label}: teacher_batch={t.teacher_batch} must be divisible by teacher_workers="
                                  f"{self.teacher_workers}")
        if self.encoder is not None and self.encoder.lm_eval_tasks is not None:
            raise ConfigError(f"encoder.lm_eval_tasks={self.encoder.lm_eval_tasks!r}: lm-eval tasks score decoders "
                              f"(set decoder.lm_eval_tasks)")
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
                            eval_batch=8, hidden_weight=0.0, second_text="lee_news",
                            kl_normalisation="unit",
                            latency=LatencyProfile(batch_sizes=[1, 2], seq_len=32, repeats=2, warmup=1)),
        overhead=OverheadProfile(train_samples=64, test_samples=32, max_length=32, teacher_steps=2, prune_steps=2,
                                 finetune_steps=2, batch_size=8,
                                 latency=LatencyProfile(batch_sizes=[1], seq_len=32, repeats=2, warmup=1)),
        # one teacher worker (quick has two): the same code path, one Train worker process fewer on CI's two cores
        executor="ray", threads=1, cpus_per_cell=1.0, teacher_workers=1,
    ),
    # this 2-core CPU machine: two cells at a time, one thread each (two threads per process on two shared cores ran
    # 3x slower than one here); the library's recipe (R17: the projection holds the expected size at one budget, so
    # every budget is trained on its own), 3 seeds of every method pruned and fine-tuned; Faster-VTrans at 20 steps (row
    # F20: as good as 200 from the Fisher start, pruned and fine-tuned); SmolLM2 at 80 and 70% with the steps after the
    # warm-up at the budget (the projection), one seed
    "quick": Profile(
        name="quick", description="the 2-core CPU development machine (hours: a VTrans training is minutes): every "
                                  "measure, the library's recipe on cut steps and samples, 3 seeds of MiniLM, "
                                  "SmolLM2 at two budgets",
        encoder=TaskProfile(label="minilm", model="minilm", budgets=[0.7, 0.5, 0.3, 0.2], methods=_ALL,
                            train_samples=4000, test_samples=1000, seq_len=64,
                            prune_steps={"vtrans": 200, "fast": 200, "faster": 20}, finetune_steps=50, seeds=3,
                            trained_seeds=3, finetune_seeds=3, calibration_fraction=0.03, teacher_steps=200,
                            teacher_batch=32, prune_batch=16, shared_posterior=False, kwon_samples=128,
                            kwon_batch=32, finetune_batch=16,
                            kl_normalisation="unit",
                            latency=LatencyProfile(batch_sizes=[1, 32], seq_len=128, repeats=5, warmup=1)),
        decoder=TaskProfile(label="smollm2", model="smollm2", budgets=[0.8, 0.7], methods=_ALL, train_samples=128,
                            test_samples=16, seq_len=128, prune_steps={"vtrans": 40, "fast": 40, "faster": 60},
                            finetune_steps=20, seeds=1, trained_seeds=1, finetune_seeds=1,
                            calibration_fraction=None, calibration_count=32, prune_batch=4, shared_posterior=False,
                            kwon_samples=16, kwon_batch=8, finetune_batch=4, eval_batch=8, hidden_weight=0.0,
                            kl_normalisation="unit", second_text="lee_news",
                            latency=LatencyProfile(batch_sizes=[1, 8], seq_len=128, repeats=3, warmup=1)),
        overhead=OverheadProfile(),
        executor="ray", threads=1, cpus_per_cell=1.0, teacher_workers=2,
    ),
    # the decoder rows of issue 19: SmolLM2 at 90 / 80 / 70% of block parameters, every method, recovered by LoRA
    # (the full fine-tune: `decoder.finetune_method=full decoder.finetune_lr=5e-5 decoder.lora_rank=null
    # decoder.lora_alpha=null`), perplexity on Wikipedia and on the Lee news stories, lambada_local accuracy and
    # perplexity (the first 100 passages) - hours on 2 CPU cores
    "decoder": Profile(
        name="decoder", description="SmolLM2 at 90 / 80 / 70% of block parameters, every method, a short fine-tune, "
                                    "perplexity on two texts and lambada_local",
        decoder=TaskProfile(label="smollm2", model="smollm2", budgets=[0.9, 0.8, 0.7], methods=_ALL,
                            train_samples=128, test_samples=16, seq_len=128,
                            prune_steps={"vtrans": 40, "fast": 40, "faster": 60}, finetune_steps=100, seeds=1,
                            trained_seeds=1, finetune_seeds=1, calibration_fraction=None, calibration_count=32,
                            prune_batch=4, shared_posterior=False, kwon_samples=16, kwon_batch=8, finetune_batch=4,
                            finetune_lr=1e-3, finetune_method="lora", lora_rank=8, lora_alpha=16, eval_batch=8,
                            hidden_weight=0.0, kl_normalisation="unit", second_text="lee_news",
                            lm_eval_tasks=["lambada_local"], lm_eval_limit=100,
                            latency=LatencyProfile(batch_sizes=[1, 8], seq_len=128, repeats=3, warmup=1)),
        executor="ray", threads=1, cpus_per_cell=1.0, teacher_workers=1,
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
                            # the recipe rows R1-R16 were measured against (R4): pinned so their commands reproduce
                            # after the library defaults moved to R15's
                            constraint="lagrangian", mask_lr_decay="none",
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

"""Configuration dataclasses of the library: the VIB masks and the compression budget."""

from __future__ import annotations

from dataclasses import dataclass, field

from vtrans.checks import check_int, check_number
from vtrans.errors import ConfigError, quote

#: Structure types that carry a VIB mask, in the order the paper lists them.
#: ``hidden``: the residual-stream (embedding) dimension, one mask shared by all layers;
#: ``heads``: attention heads (one unit per key/value group for grouped-query attention);
#: ``neurons``: FFN intermediate neurons; ``mha`` / ``ffn``: whole attention / FFN blocks of a layer.
STRUCTURES: tuple[str, ...] = ("hidden", "heads", "neurons", "mha", "ffn")

#: What a mask group's KL is divided by (:attr:`VIBConfig.kl_normalisation`).
KL_NORMALISATIONS: tuple[str, ...] = ("group", "unit")

#: How :meth:`vtrans.vib.VIB.apply_budget` turns the trained masks into hard masks (:attr:`VIBConfig.selection`).
SELECTIONS: tuple[str, ...] = ("threshold", "quota")

#: Budget scopes: ``blocks`` counts the transformer layers only (as CoFi does); ``total`` the whole model.
SCOPES: tuple[str, ...] = ("blocks", "total")

#: Budget metrics: exactly one is given (:class:`Budget`).
METRICS: tuple[str, ...] = ("params", "flops", "latency")

#: Structures whose kept widths :attr:`Budget.align` rounds (``heads``: the attention widths, in whole KV groups).
ALIGNED: tuple[str, ...] = ("heads", "neurons", "hidden")


@dataclass
class VIBConfig:
    """How VIB masks are attached and regularised (METHOD.md, "VIB masks")."""

    structures: tuple[str, ...] = STRUCTURES
    """Which structure types get a mask; the others are always kept whole."""
    mu_init: float = 1.0
    """Mean of the initial mask means (everything starts kept)."""
    mu_init_std: float = 0.01
    """Standard deviation of the initial mask means."""
    logvar_init: float = -3.0
    """Mean of the initial log-variances. With ``keep_sharpness`` 1 and ``threshold`` 0 every unit starts at keep
    probability ``sigmoid(3) = 0.95``: in the sigmoid's live range, so the budget term has gradient from the first step
    (VIBNet's -9 with sharpness 10 gave ``sigmoid(90) = 1.0`` exactly in float32 and a Lagrangian without gradient).
    A ``fisher`` start (``PruneConfig.init``) overrides it per unit."""
    logvar_init_std: float = 0.01
    """Standard deviation of the initial log-variances."""
    threshold: float = 0.0
    """A unit is kept in evaluation when ``log_alpha = logvar - log(mu^2)`` is below this threshold."""
    keep_sharpness: float = 1.0
    """``k`` of the soft keep probability ``sigmoid(-k * (log_alpha - threshold))`` used for budget accounting."""
    kl_weight: float = 0.01
    """Global KL weight (beta); each structure type's KL is scaled by it times its multiplier."""
    kl_multipliers: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STRUCTURES, 1.0))
    """Per-structure-type KL multipliers; missing types default to 1."""
    kl_normalisation: str = "unit"
    """What a group's KL is divided by. ``group``: its own width ``r_i`` (METHOD.md), so a unit of a small group
    (one of a layer's 12 heads, the 6 block gates) carries up to ``ffn / r_i`` times the KL pressure of an FFN
    neuron. ``unit``: the FFN width for every group, so every unit carries the same pressure (equivalent to
    multipliers ``r_i / ffn`` under ``group``), the default: on MiniLM at <= 50% of block parameters ``group`` closed
    whole blocks and collapsed the model to the majority class; ``unit`` did not (pipelines/BENCHMARKS.md, "What was
    tried")."""
    selection: str = "threshold"
    """How the trained masks meet a budget. ``threshold``: one global threshold on ``-log_alpha`` over all units
    (a neuron, a head and a hidden dimension compete on the same scale although their costs differ ~100x).
    ``quota``: every group keeps its expected keep count (the sum of its keep probabilities, what the budget
    Lagrangian trained) of its best units by ``-log_alpha``, all counts scaled by one factor to meet the budget
    exactly (:func:`vtrans.budget.quota_scores`)."""
    seed: int | None = 0
    """Seed of the mask initialisation (None: from torch's global generator)."""

    def __post_init__(self) -> None:
        self.structures = tuple(self.structures)
        for s in self.structures:
            if s not in STRUCTURES:
                raise ConfigError(f"vib.structures has unknown structure {s!r}; choose from {list(STRUCTURES)}")
        if len(set(self.structures)) != len(self.structures):
            raise ConfigError(f"vib.structures lists a structure twice: {list(self.structures)}")
        for key in ("mu_init", "mu_init_std", "logvar_init", "logvar_init_std", "threshold", "keep_sharpness",
                    "kl_weight"):
            check_number(f"vib.{key}", getattr(self, key))
        for key in ("mu_init_std", "logvar_init_std", "kl_weight"):
            check_number(f"vib.{key}", getattr(self, key), 0)
        check_number("vib.keep_sharpness", self.keep_sharpness, 0, low_open=True)
        if self.selection not in SELECTIONS:
            raise ConfigError(f"vib.selection must be one of {list(SELECTIONS)}, got {self.selection!r}")
        if self.kl_normalisation not in KL_NORMALISATIONS:
            raise ConfigError(f"vib.kl_normalisation must be one of {list(KL_NORMALISATIONS)}, "
                              f"got {self.kl_normalisation!r}")
        if not isinstance(self.kl_multipliers, dict):
            raise ConfigError(f"vib.kl_multipliers must map structure -> float, got {self.kl_multipliers!r}")
        merged = dict.fromkeys(STRUCTURES, 1.0)
        for s, v in self.kl_multipliers.items():
            if s not in STRUCTURES:
                raise ConfigError(f"vib.kl_multipliers has unknown structure {s!r}; choose from {list(STRUCTURES)}")
            merged[s] = check_number(f"vib.kl_multipliers.{s}", v, 0)
        self.kl_multipliers = merged


@dataclass(frozen=True)
class Budget:
    """A size target: a fraction in (0, 1] of the dense model, or an absolute integer count (> 1).

    Exactly one of ``params``, ``flops`` and ``latency`` is given. FLOPs are forward FLOPs of one sequence of
    ``seq_len`` tokens (matrix multiplications, 2 per multiply-add, attention counted densely as ``FlopCounterMode``
    does). ``latency`` is a fraction of the dense model's latency predicted by a table measured on the device the model
    is on (:mod:`vtrans.latency_table`), at ``batch_size`` x ``seq_len`` tokens.
    """

    params: float | int | None = None
    """Target parameter count: fraction of the dense model's (in ``scope``), or an absolute count."""
    flops: float | int | None = None
    """Target forward FLOPs at ``seq_len``: fraction of the dense model's, or an absolute count."""
    latency: float | None = None
    """Target latency: a fraction in (0, 1] of the dense model's forward latency at ``batch_size`` x ``seq_len``,
    predicted from a per-layer latency table measured on the model's device (:mod:`vtrans.latency_table`). Always the
    whole model (``scope`` does not apply); the hidden size is never pruned (only heads, neurons and whole blocks);
    not with ``uniform``."""
    seq_len: int = 128
    """Sequence length at which FLOPs are counted and a latency budget is measured."""
    batch_size: int = 1
    """Batch size at which a latency budget is measured (FLOPs and parameters do not depend on it)."""
    scope: str = "blocks"
    """``blocks`` (transformer layers only, the default, as CoFi) or ``total`` (embeddings and heads too)."""
    tolerance: float = 0.005
    """The kept size must lie in ``[(1 - tolerance) * target, target]``."""
    uniform: bool = False
    """Every layer keeps the same number of heads (key/value groups) and FFN neurons, blocks go only as whole layers
    where the architecture allows, and the hidden size stays what the stock config expresses: the compressed model is
    saved as the stock architecture (``model_type`` ``llama`` / ``bert`` / ``roberta`` / ``gpt2``), loadable without
    vtrans (:mod:`vtrans.uniform` lists, per architecture, what the stock config can express)."""
    align: int | dict[str, int] | None = None
    """Hardware-friendly widths: every kept width of every layer is a multiple of its alignment (a removed block, 0
    units, counts as aligned). One integer aligns every structure; a mapping ``{heads: a, neurons: b, hidden: c}``
    only those it names (the others: 1). ``neurons``: the FFN width of each layer; ``hidden``: the hidden size;
    ``heads``: the attention widths in dimensions - a layer keeps ``k`` whole key/value groups with ``k * head_dim``
    (the key / value projections' width; the query / output width ``k * group_size * head_dim`` follows) a multiple of
    ``a``, i.e. ``k`` a multiple of ``a / gcd(a, head_dim)``: ``align=64`` on 64-dim heads leaves the head count free,
    on 32-dim heads it keeps an even number. An alignment may not exceed the width it aligns. The budget is still
    never exceeded, but a coarse granularity may land further below the target than ``tolerance``: that is reported
    (the selection's ``achieved["of_target"]``, compression.json), not an error. None (or 1): no rounding."""

    def __hash__(self) -> int:  # a frozen dataclass with a dict field: hash the mapping's items
        align = tuple(sorted(self.align.items())) if isinstance(self.align, dict) else self.align
        return hash((self.params, self.flops, self.latency, self.seq_len, self.batch_size, self.scope, self.tolerance,
                     self.uniform, align))

    def __post_init__(self) -> None:
        given = [k for k in METRICS if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(f"{k}={getattr(self, k)!r}" for k in (given or METRICS))
            raise ConfigError(f"budget needs exactly one of params, flops or latency, got {got}")
        key = given[0]
        value = getattr(self, key)
        check_number(f"budget.{key}", value, what="a number")
        if key == "latency":
            if not 0.0 < value <= 1.0 or (isinstance(value, int) and value != 1):
                raise ConfigError(f"budget.latency must be a fraction in (0, 1] of the dense model's latency, "
                                  f"got {value!r}")
            object.__setattr__(self, "latency", float(value))
            if self.uniform:
                raise ConfigError("budget.uniform=true is not supported with budget.latency: a latency budget picks "
                                  "every layer's widths from its latency table; give params or flops with uniform")
        check_int("budget.batch_size", self.batch_size, 1, what="a positive integer")
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ConfigError(
                f"budget.{key} must be a fraction in (0, 1] (or an integer count > 1), got {value!r}"
            )
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"budget.{key} must be a fraction in (0, 1] or an integer count > 1, got {value!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"budget.scope must be one of {list(SCOPES)}, got {self.scope!r}")
        check_int("budget.seq_len", self.seq_len, 1, what="a positive integer")
        check_number("budget.tolerance", self.tolerance, 0.0, 1.0, low_open=True, high_open=True)
        if not isinstance(self.uniform, bool):
            raise ConfigError(f"budget.uniform must be true or false, got {self.uniform!r}")
        check_align(self.align)
        if isinstance(self.align, dict):
            object.__setattr__(self, "align", dict(self.align))  # a copy: the budget is frozen

    @property
    def alignment(self) -> dict[str, int]:
        """The alignment of every structure in :data:`ALIGNED` (1: free)."""
        if isinstance(self.align, int):
            return dict.fromkeys(ALIGNED, self.align)
        return {s: (self.align or {}).get(s, 1) for s in ALIGNED}

    @property
    def aligned(self) -> bool:
        """Whether any width is rounded (an alignment of 1 everywhere is the unaligned selection)."""
        return any(a > 1 for a in self.alignment.values())

    @property
    def metric(self) -> str:
        """``params``, ``flops`` or ``latency``."""
        return next(k for k in METRICS if getattr(self, k) is not None)

    @property
    def value(self) -> float | int:
        """The target as given (fraction or absolute count)."""
        return getattr(self, self.metric)

    def target(self, dense_size: int) -> float:
        """The absolute target given the dense model's size in this budget's metric and scope."""
        v = self.value
        return float(v) * dense_size if isinstance(v, float) or v == 1 else float(v)

    def describe(self) -> str:
        """Short human form, e.g. ``params=0.5 (blocks)``."""
        if self.metric == "latency":
            extra = f"batch_size={self.batch_size}, seq_len={self.seq_len}"
            if self.aligned:
                extra += f", align={self.align}" if isinstance(self.align, int) else ", align=" + ",".join(
                    f"{k}={v}" for k, v in self.align.items())
            return f"latency={self.value} ({extra})"
        extra = f", seq_len={self.seq_len}" if self.metric == "flops" else ""
        extra += ", uniform" if self.uniform else ""
        if self.aligned:
            extra += f", align={self.align}" if isinstance(self.align, int) else ", align=" + ",".join(
                f"{k}={v}" for k, v in self.align.items())
        return f"{self.metric}={self.value} ({self.scope}{extra})"

    @classmethod
    def parse(cls, text: str, seq_len: int = 128, scope: str = "blocks", uniform: bool = False,
              align: int | dict[str, int] | None = None, batch_size: int = 1) -> Budget:
        """Parse ``params=0.5`` / ``flops=0.4`` / ``params=5000000`` / ``latency=0.6`` as given on a command line."""
        values: dict[str, float | int] = {}
        for part in str(text).split(","):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in METRICS:
                raise ConfigError(f"budget must look like params=0.5, flops=0.4 or latency=0.6, got {quote(text)}")
            if key in values:
                raise ConfigError(f"budget gives {key} twice in {quote(text)}; give one {key}=VALUE")
            try:
                value: float | int = int(raw) if raw.strip().isdigit() else float(raw)
            except ValueError:
                raise ConfigError(f"budget.{key} must be a number, got {quote(raw.strip())}") from None
            values[key] = 1.0 if value == 1 and isinstance(value, int) else value
        return cls(**values, seq_len=seq_len, scope=scope, uniform=uniform, align=align, batch_size=batch_size)


def check_align(align: object, key: str = "budget.align") -> None:
    """Raise a one-line :class:`ConfigError` naming the key and the value unless ``align`` is None, a positive integer
    or a mapping of :data:`ALIGNED` structures to positive integers."""
    if align is None:
        return
    if isinstance(align, dict):
        if not align:
            raise ConfigError(f"{key} must name at least one of {list(ALIGNED)}, got {{}}")
        for s, v in align.items():
            if s not in ALIGNED:
                raise ConfigError(f"{key} has unknown structure {s!r}; choose from {list(ALIGNED)}")
            check_int(f"{key}.{s}", v, 1, what="a positive integer")
        return
    check_int(key, align, 1, what=f"a positive integer or a mapping of {list(ALIGNED)} to positive integers")


def parse_align(text: str, key: str = "--align") -> int | dict[str, int]:
    """``8`` (every structure) or ``neurons=64,hidden=8`` as given on a command line."""
    raw = str(text).strip()
    if "=" not in raw:
        try:
            value: int | dict[str, int] = int(raw)
        except ValueError:
            raise ConfigError(f"{key} must be a positive integer or heads=A,neurons=B,hidden=C, got {quote(raw)}") \
                from None
    else:
        value = {}
        for part in raw.split(","):
            s, _, v = part.partition("=")
            s = s.strip()
            if s in value:
                raise ConfigError(f"{key} gives {s} twice in {quote(raw)}")
            try:
                value[s] = int(v)
            except ValueError:
                raise ConfigError(f"{key}.{s.strip()} must be a positive integer, got {quote(v.strip())}") from None
    check_align(value, key)
    return value

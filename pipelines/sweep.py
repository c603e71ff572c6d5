"""Budget sweeps: one pipeline config plus a ``sweep:`` section, run as Ray Tune trials with a Pareto front per model.

```yaml
# ... a whole pipeline config (the base of every trial), then:
sweep:
  models:                       # label -> overrides of the base; left out: the base config's model alone
    minilm: {}
    minilm-fast: {prune.method: fast}
  space:                        # dotted pipeline keys; grid: lists; random / optuna: lists or distributions
    prune.budget.params: [0.7, 0.5, 0.3]
    prune.vib.kl_weight: [0.01, 0.1]          # or {loguniform: [0.001, 0.1]}
  search: grid                  # grid | random | optuna (multi-objective on sweep.objectives)
  num_samples: 1                # grid: repeats of the grid; random / optuna: trials per model
```

Every trial runs the pipeline for its point; calibration sets and teachers come from the stage cache, computed once
per model before the trials start (the trials' keys for those stages are the same). The sweep is one MLflow parent
run; each trial is one nested run holding all its stages (metrics ``prune.loss``, ``evaluate.accuracy``, ...; the
evaluation's metrics also unprefixed). Everything in this module is checked before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines.config import (
    PipelineConfig,
    config_hash,
    from_dict,
    merge_overrides,
    parse_overrides,
    read_yaml,
)
from vtrans.errors import ConfigError
from vtrans.metrics import HIGHER_IS_BETTER, TASK_METRICS, direction, task_metric

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
"""Forms of a random / optuna search dimension: ``{uniform: [low, high]}``, ``{loguniform: [low, high]}``,
``{randint: [low, high]}`` (high exclusive) or ``{choice: [a, b, ...]}``; a plain list is a choice."""


@dataclass
class RegistryConfig:
    """Registering the Pareto-optimal models in the MLflow model registry."""

    register: bool = True
    """Register every model on a (quality, block params) front."""
    name: str = "{model}-{task}-vtrans"
    """Registered model name; ``{model}`` (the sweep's model label) and ``{task}`` are filled in."""


@dataclass
class AshaConfig:
    """ASHA early stopping (``sweep.early_stopping: asha``) on the fine-tune's held-out quality
    (:mod:`pipelines.early_stopping`); needs ``finetune.eval_every``."""

    reduction_factor: float = 2
    """At each rung a trial continues only within the best ``1 / reduction_factor`` of the trials there before it."""
    grace_period: int | None = None
    """Fine-tune steps before the first rung; None: the first held-out evaluation (``finetune.eval_every``)."""
    by_budget: bool = True
    """Compare a trial only with trials of the same budget (a 20% model does not lose to a 70% one); false: one
    ASHA over all of a model's trials."""


@dataclass
class SweepConfig:
    """The ``sweep:`` section."""

    space: dict[str, Any] = field(default_factory=dict)
    """Search space: dotted pipeline key -> list of values (grid) or a distribution (random / optuna)."""
    models: dict[str, dict[str, Any]] | None = None
    """Model label -> dotted overrides of the base config (``model.name``, ``data.*``, ...); None: the base alone,
    labelled by its model name."""
    search: Literal["grid", "random", "optuna"] = "grid"
    """``grid`` (every combination), ``random`` (``num_samples`` draws) or ``optuna`` (multi-objective TPE)."""
    num_samples: int = 1
    """grid: how many times the whole grid runs; random / optuna: trials per model."""
    objectives: list[str] | None = None
    """``key:max`` / ``key:min`` trial metrics the search optimises and the front is drawn over; None: the task's
    quality metric (accuracy: max, perplexity: min) and ``params_blocks:min``."""
    early_stopping: Literal["asha"] | None = None
    """``asha``: stop trials whose held-out quality trails the others' of their budget during fine-tuning
    (``sweep.asha``; needs ``finetune.eval_every``); None: every trial runs to the end."""
    asha: AshaConfig = field(default_factory=AshaConfig)
    """ASHA settings."""
    max_concurrent_trials: int | None = None
    """Trials at once; None: as many Train jobs as the cluster's CPUs (GPUs) hold."""
    reuse_posterior: bool = False
    """Train the masks once per (model, KL weight, method, ...) at the smallest budget swept and derive the other
    budgets from that posterior by re-thresholding it, then fine-tune each as usual: every trial's
    ``posterior_budget`` is its budget at the smallest value, so the trials sharing every other prune setting share
    one mask training (the first of them to start trains it; the stage cache hands it to the others)."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """Model registry settings."""
    seed: int = 0
    """Seed of the random / optuna search."""


def _tree(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"prune.budget.params": 0.3}`` -> ``{"prune": {"budget": {"params": 0.3}}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return out


def _values(key: str, spec: Any, search: str) -> list[Any]:
    """The values of a space dimension used to check it: a grid's list, a distribution's bounds."""
    where = f"sweep.space[{key!r}]"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where} is an empty list")
        return spec
    if isinstance(spec, dict):
        if search == "grid":
            raise ConfigError(f"{where}={spec!r} is a distribution, which sweep.search='grid' cannot enumerate; "
                              f"give a list or use sweep.search=random|optuna")
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where} must be a list or one of {{{'|'.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            return _values(key, args, "grid")
        if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) and not
                                                                      isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: {kind} needs [low, high], got {args!r}")
        low, high = args
        if not low < high or (kind == "loguniform" and low <= 0) or (kind == "randint" and not all(
                isinstance(a, int) for a in args)):
            raise ConfigError(f"{where}: {kind} needs {'0 < ' if kind == 'loguniform' else ''}low < high"
                              f"{' (ints)' if kind == 'randint' else ''}, got {args!r}")
        return [low, high - 1 if kind == "randint" else high]
    raise ConfigError(f"{where} must be a list of values or a distribution, got {spec!r}")


@dataclass
class Sweep:
    """A loaded, checked sweep: the base mapping, one checked base config per model, the search space."""

    name: str
    config: SweepConfig
    base: dict[str, Any]
    """The base pipeline config as a plain mapping (file + overrides)."""
    models: dict[str, dict[str, Any]]
    """Model label -> its base mapping."""
    model_configs: dict[str, PipelineConfig]

    def point_config(self, label: str, point: dict[str, Any]) -> PipelineConfig:
        """The pipeline config of one trial: model ``label`` at ``point`` (dotted keys). With ``reuse_posterior``
        its ``posterior_budget`` is its budget at the smallest value swept: one mask training per posterior."""
        raw = merge_overrides(self.models[label], _tree(point))
        raw["name"] = f"{self.name}-{label}"
        if self.config.reuse_posterior:
            key = budget_key(self.config)
            budget = dict((raw.get("prune") or {}).get("budget") or {})
            budget[key.rsplit(".", 1)[1]] = min(_values(key, self.config.space[key], self.config.search))
            raw["posterior_budget"] = budget
        return from_dict(PipelineConfig, raw)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the space's lists (for ``grid``; distributions contribute their bounds)."""
        keys = list(self.config.space)
        values = [_values(k, self.config.space[k], self.config.search) for k in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]

    def objectives(self, label: str) -> list[tuple[str, str]]:
        """``[(key, "max" | "min"), ...]`` for a model (the default quality metric follows its task)."""
        if self.config.objectives is not None:
            return [tuple(o.rsplit(":", 1)) for o in self.config.objectives]  # type: ignore[misc]
        cfg = self.model_configs[label]
        quality = task_metric(cfg.task)
        if "prune.budget.latency" in self.config.space or cfg.prune.budget.metric == "latency":
            # a latency sweep: the front against the latency measured at the budget's point (evaluate stage)
            return [(quality, direction(quality)), ("latency_measured_ms", "min"), ("params_blocks", "min")]
        return [(quality, direction(quality)), ("params_blocks", "min")]

    @property
    def key(self) -> str:
        """A hash of everything that defines the sweep's trials (its Tune experiment and MLflow parent)."""
        sweep = dataclasses.asdict(self.config)
        if sweep["early_stopping"] is None:  # unused: the same trials (and keys as before the setting existed)
            del sweep["asha"]
        return config_hash({"base": self.base, "sweep": sweep})


#: Metrics every trial reports (objectives may name these or any evaluation metric, ``lm_eval_<task>_<metric>`` of
#: ``evaluate.lm_eval_tasks`` included).
TRIAL_METRICS = (*HIGHER_IS_BETTER, "params_blocks", "params_total", "flops_blocks", "flops_total",
                 "params_blocks_ratio", "params_total_ratio", "flops_total_ratio")


BUDGET_KEYS = ("prune.budget.params", "prune.budget.flops", "prune.budget.latency")


def budget_key(config: SweepConfig) -> str:
    """The space's budget dimension (``prune.budget.params``, ``.flops`` or ``.latency``), which ``reuse_posterior``
    derives."""
    keys = [k for k in BUDGET_KEYS if k in config.space]
    if len(keys) != 1:
        raise ConfigError(f"sweep.reuse_posterior=true derives the budgets of one posterior: sweep.space needs "
                          f"exactly one of {list(BUDGET_KEYS)}, got {sorted(config.space)}")
    return keys[0]


def _check_reuse(sweep: Sweep) -> None:
    config = sweep.config
    if not config.reuse_posterior:
        return
    budget_key(config)
    if any(k == "prune.budget" or k.startswith("posterior_budget") for k in config.space):
        raise ConfigError("sweep.space may not set prune.budget or posterior_budget as a whole when "
                          "sweep.reuse_posterior=true; sweep prune.budget.params (or .flops, .latency) alone")
    for label, raw in sweep.models.items():
        if raw.get("posterior_budget") is not None:
            raise ConfigError(f"posterior_budget={raw['posterior_budget']!r} (model {label!r}) contradicts "
                              f"sweep.reuse_posterior=true, which sets it to the smallest budget swept; leave it out")


def _check_objectives(sweep: Sweep) -> None:
    objectives = sweep.config.objectives
    if objectives is None:
        return
    if not isinstance(objectives, list) or len(objectives) < 2:
        raise ConfigError(f"sweep.objectives needs a quality metric and at least one size, got {objectives!r}")
    for i, spec in enumerate(objectives):
        key, sep, goal = str(spec).rpartition(":")
        if not sep or goal not in ("max", "min") or not key:
            raise ConfigError(f"sweep.objectives[{i}] must look like 'accuracy:max' or 'params_blocks:min', got "
                              f"{spec!r}")
    quality = objectives[0].rpartition(":")[0]
    for label, cfg in sweep.model_configs.items():
        produced = [*TASK_METRICS[cfg.task], *lm_eval_objectives(cfg)]
        if quality not in produced and not _lm_eval_metric_of(quality, cfg):
            raise ConfigError(f"sweep.objectives[0]={objectives[0]!r}: {quality!r} is not produced for model "
                              f"{label!r} ({cfg.task}: {produced})")
        sizes = size_objectives(cfg)
        for i, spec in enumerate(objectives[1:], 1):
            key = spec.rpartition(":")[0]
            if key not in sizes:  # a misspelled size would give trials without it: no front, silently
                import difflib

                close = difflib.get_close_matches(key, sizes, n=1)
                raise ConfigError(f"sweep.objectives[{i}]={spec!r}: {key!r} is not a size the trials of model "
                                  f"{label!r} report" + (f"; did you mean {close[0]!r}?" if close else
                                                         f" (e.g. {list(sizes[:4])})"))
        if sweep.config.early_stopping is not None and quality != task_metric(cfg.task):
            raise ConfigError(f"sweep.objectives[0]={objectives[0]!r} with sweep.early_stopping="
                              f"{sweep.config.early_stopping!r}: ASHA stops trials on the fine-tune's held-out "
                              f"{task_metric(cfg.task)!r}, so the quality objective must be it")


def size_objectives(cfg: PipelineConfig) -> list[str]:
    """The size and cost metrics a trial of ``cfg`` reports (its evaluation's): counts and their ratios, model and
    memory sizes, and latency, throughput and speedup at every timed point (``latency_ms_b1_s128``, ...)."""
    from pipelines.stages.evaluate import grid, point

    names = [k for k in TRIAL_METRICS if k not in HIGHER_IS_BETTER]
    names += ["flops_blocks_ratio", "model_mb", "peak_rss_mb", "peak_rss_over_baseline_mb"]
    for b, s in grid(cfg):
        names += [f"{k}_{point(b, s)}" for k in ("latency_ms", "throughput", "speedup", "peak_gpu_mb")]
    if cfg.prune.budget.metric == "latency":
        names += ["latency_measured_ms", "latency_predicted_ms", "latency_measured_fraction"]
    return names


def lm_eval_objectives(cfg: PipelineConfig) -> list[str]:
    """The lm-eval metric names a pipeline logs that are known before it runs: every metric of its local tasks
    (``lm_eval_lambada_local_acc``, ...); other lm-eval tasks' names are known once their configs load."""
    from vtrans.lm_eval import LOCAL_TASKS, metric_name

    return [metric_name(t, m) for t in cfg.evaluate.lm_eval_tasks or [] for m in LOCAL_TASKS.get(t, ())]


def _lm_eval_metric_of(key: str, cfg: PipelineConfig) -> bool:
    """``key`` names a metric of one of the pipeline's lm-eval tasks that is not local (``lm_eval_<task>_<metric>``
    with any metric: which ones a hub task reports is known when it runs)."""
    from vtrans.lm_eval import LOCAL_TASKS, metric_name

    return any(key.startswith(metric_name(t, "")) and len(key) > len(metric_name(t, ""))
               for t in cfg.evaluate.lm_eval_tasks or [] if t not in LOCAL_TASKS)


def _absolute(raw: dict[str, Any]) -> dict[str, Any]:
    """Local paths of a config mapping made absolute: Tune runs each trial in a folder of its own."""
    from pipelines.config import is_uri
    from vtrans.assets import MODELS

    def resolve(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    model, data = raw.get("model") or {}, raw.get("data") or {}
    if isinstance(model.get("name"), str) and model["name"] not in MODELS and Path(model["name"]).expanduser().is_dir():
        model["name"] = resolve(model["name"])
    if isinstance(model.get("teacher"), str):
        model["teacher"] = resolve(model["teacher"])
    if isinstance(data.get("files"), list):
        data["files"] = [f if not isinstance(f, str) or is_uri(f) else resolve(f) for f in data["files"]]
    if isinstance(raw.get("output"), str):
        raw["output"] = resolve(raw["output"])
    return raw


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a sweep config (a pipeline config with a ``sweep:`` section), apply ``key=value`` overrides (``sweep.*``
    to the section, the rest to the base) and check every model and every grid point - before any Ray work."""
    raw = read_yaml(path)
    if "sweep" not in raw:
        raise ConfigError(f"config file {str(path)!r} has no sweep: section; run it with `vtrans run`")
    sweep_raw = raw.pop("sweep") or {}
    if not isinstance(sweep_raw, dict):
        raise ConfigError(f"sweep must be a mapping (space:, models:, ...), got {sweep_raw!r}")
    sweep_over = [o for o in overrides if o.split("=", 1)[0].startswith("sweep.")]
    base_over = [o for o in overrides if o not in sweep_over]
    tree = parse_overrides([o[len("sweep."):] for o in sweep_over])
    for key, value in tree.items():  # the space's keys are dotted: merge one level deep
        if isinstance(value, dict) and isinstance(sweep_raw.get(key), dict):
            sweep_raw[key] = {**sweep_raw[key], **value}
        else:
            sweep_raw[key] = value
    config = from_dict(SweepConfig, sweep_raw, prefix="sweep")
    if not config.space:
        raise ConfigError("sweep.space is empty: give at least one key to sweep, e.g. prune.budget.params: [0.5, 0.3]")
    if config.num_samples < 1:
        raise ConfigError(f"sweep.num_samples must be >= 1, got {config.num_samples!r}")
    if config.max_concurrent_trials is not None and config.max_concurrent_trials < 1:
        raise ConfigError(f"sweep.max_concurrent_trials must be >= 1, got {config.max_concurrent_trials!r}")
    base = merge_overrides(raw, base_over)
    base_cfg = from_dict(PipelineConfig, base)
    model_overrides = config.models if config.models is not None else {base_cfg.model.name: {}}
    if not model_overrides:
        raise ConfigError("sweep.models is empty: list at least one model, or leave it out to sweep the base model")
    models, model_configs, seen = {}, {}, {}
    for label, over in model_overrides.items():
        if not isinstance(over, dict):
            raise ConfigError(f"sweep.models[{label!r}] must be a mapping of dotted overrides, got {over!r}")
        try:
            models[label] = _absolute(merge_overrides(base, _tree(over)))
            model_configs[label] = from_dict(PipelineConfig, models[label])
        except ConfigError as e:
            raise ConfigError(f"sweep.models[{label!r}]: {e}") from None
        identity = (model_configs[label].model.name, config_hash(model_configs[label]))
        if identity in seen:
            raise ConfigError(f"sweep.models lists the same model twice: {seen[identity]!r} and {label!r} "
                              f"(model.name={identity[0]!r}, identical settings)")
        seen[identity] = label
    sweep = Sweep(name=str(base["name"]), config=config, base=base, models=models, model_configs=model_configs)
    for key, spec in config.space.items():
        if not isinstance(key, str) or not key or key.split(".")[0] in ("name", "sweep"):
            raise ConfigError(f"sweep.space key {key!r} must be a dotted pipeline key such as prune.budget.params")
        _values(key, spec, config.search)
    _check_reuse(sweep)
    for label in models:
        for point in sweep.grid_points():
            try:
                sweep.point_config(label, point)
            except ConfigError as e:
                message = str(e)
                if message.startswith("unknown key"):
                    raise ConfigError(f"sweep.space: {message}") from None
                raise ConfigError(f"sweep.space point {point} for model {label!r}: {message}") from None
    _check_objectives(sweep)
    _check_early_stopping(sweep)
    return sweep


def check_sweep(sweep: Sweep) -> dict[str, Any]:
    """Everything ``vtrans sweep`` checks before it touches the tracking store or starts Ray: every model's config and
    every grid point of it (distributions: their bounds) through :func:`pipelines.validate.preflight`. Returns each
    model label's :class:`~pipelines.validate.Preflight` (its model directory and stage keys)."""
    from pipelines.validate import preflight

    checked = {}
    for label in sweep.models:
        checked[label] = preflight(sweep.model_configs[label])
        for point in sweep.grid_points():
            preflight(sweep.point_config(label, point))
    return checked


def _check_early_stopping(sweep: Sweep) -> None:
    config, asha = sweep.config, sweep.config.asha
    if config.early_stopping is None:
        return
    if isinstance(asha.reduction_factor, bool) or not isinstance(asha.reduction_factor, (int, float)) or \
            not asha.reduction_factor > 1:
        raise ConfigError(f"sweep.asha.reduction_factor must be a number > 1, got {asha.reduction_factor!r}")
    if asha.grace_period is not None and (isinstance(asha.grace_period, bool) or
                                          not isinstance(asha.grace_period, int) or asha.grace_period < 1):
        raise ConfigError(f"sweep.asha.grace_period must be an integer >= 1 (fine-tune steps), got "
                          f"{asha.grace_period!r}")
    for key in ("finetune.steps", "finetune.eval_every"):
        if key in config.space:
            raise ConfigError(f"sweep.space may not sweep {key} with sweep.early_stopping='asha' (its rungs are "
                              f"fine-tune steps, the same for every trial)")
    for label, cfg in sweep.model_configs.items():
        ft = cfg.finetune
        if ft.steps == 0 or ft.eval_every == 0:
            raise ConfigError(f"sweep.early_stopping='asha' compares the held-out quality measured while fine-tuning, "
                              f"but model {label!r} has finetune.steps={ft.steps}, finetune.eval_every={ft.eval_every}"
                              f"; set finetune.eval_every (e.g. {max(1, ft.steps // 4)})")
        grace = asha_grace_period(sweep, label)
        if grace >= ft.steps:
            raise ConfigError(f"sweep.early_stopping='asha': the first rung (fine-tune step {grace}) must come before "
                              f"the last step (finetune.steps={ft.steps}) for model {label!r}; lower "
                              f"{'sweep.asha.grace_period' if asha.grace_period else 'finetune.eval_every'}")
    if asha.by_budget:
        for key in asha_group_keys(config):
            if isinstance(config.space[key], dict) and "choice" not in config.space[key]:
                raise ConfigError(f"sweep.asha.by_budget=true compares trials of the same budget, but "
                                  f"sweep.space[{key!r}]={config.space[key]!r} gives every trial a budget of its own; "
                                  f"list the budgets, or set sweep.asha.by_budget=false")


def asha_grace_period(sweep: Sweep, label: str) -> int:
    """Fine-tune steps before a trial of model ``label`` can be stopped."""
    return sweep.config.asha.grace_period or sweep.model_configs[label].finetune.eval_every


def asha_group_keys(config: SweepConfig) -> list[str]:
    """The space's budget keys: ASHA compares trials that agree on them (all trials when ``by_budget`` is off)."""
    if not config.asha.by_budget:
        return []
    return [k for k in config.space if k == "prune.budget" or k.startswith("prune.budget.")]


def max_concurrent(sweep: Sweep, cluster_cpus: float, cluster_gpus: float) -> int:
    """How many trials run at once: the configured number, or as many Train jobs as the cluster holds."""
    if sweep.config.max_concurrent_trials is not None:
        return sweep.config.max_concurrent_trials
    widths = [c.ray for c in sweep.model_configs.values()]
    if any(r.use_gpu for r in widths):
        per = max(r.num_workers for r in widths)
        return max(1, int(cluster_gpus // per))
    per = max(r.num_workers * r.cpus_per_worker for r in widths)
    return max(1, int(math.floor(cluster_cpus / per)))


"""VIB pruning: the objective, the schedule, one training step, and the training loop of every phase
(framework-agnostic). What pruning shares with fine-tuning (distillation, optimizer state) is :mod:`vtrans.distill`;
the fine-tune of a compressed model is :mod:`vtrans.finetune`.

The :class:`Pruner` is an ``nn.Module`` holding the model, its VIB masks and the Lagrange multipliers, so a
data-parallel wrapper (DDP, Ray Train's ``prepare_model``) all-reduces the gradients of weights, masks and lambdas
alike. A step is ``loss, metrics = module(batch, step)`` (through the wrapper) then ``pruner.optimize(loss, step)``.

Objective (METHOD.md): ``task_weight * task + logit_weight * KD(T) + hidden_weight * layer_distill + vib.kl()``, with
the expected kept fraction ``s`` of the budget's metric held at the target ``t`` - which moves linearly from the
previous round's target to this round's over the warm-up - by a projection after every step (``constraint:
projection``, the default) or by ``+ lambda1 * (s - t) + lambda2 * (s - t)^2`` with the lambdas trained by gradient
ascent (``constraint: lagrangian | upper``). After each round the masks are fixed to the round's budget exactly and the
kept weights are fine-tuned (masks frozen) with distillation.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from vtrans.budget import size
from vtrans.checks import check_choice, check_positive
from vtrans.config import Budget, VIBConfig
from vtrans.distill import (
    MAX_STEPS,
    TASKS,
    DistillConfig,
    Distiller,
    laid_out_as,
    load_optimizers,
    save_optimizers,
)
from vtrans.errors import BudgetError, ConfigError, quote
from vtrans.finetune import FINETUNE_METHODS, Finetuner
from vtrans.lora import LoraAdapters, LoraConfig, add_adapters, lora_targets, require_peft
from vtrans.masks import EPS
from vtrans.vib import VIB, attach

METHODS = ("vtrans", "fast", "faster")
MASK_LR_DECAYS = ("none", "linear")
INITS = ("constant", "fisher")
WARMUP_FROM = ("dense", "start")
CONSTRAINTS = ("lagrangian", "upper", "projection")
#: Prefix of the LoRA adapters' tensors in a checkpoint saved inside a fine-tune between rounds.
LORA_PREFIX = "lora."


@dataclass
class PruneConfig:
    """One VTrans pruning run: method, budget, schedule and learning rates."""

    method: str = "vtrans"
    """``vtrans`` (masks and weights jointly, then fine-tune), ``fast`` (the same on a stratified calibration subset)
    or ``faster`` (weights frozen: only masks and lambdas train; optional short fine-tune)."""
    budget: Budget = field(default_factory=lambda: Budget(params=0.5))
    vib: VIBConfig = field(default_factory=VIBConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    task: str = "seq-cls"
    """``seq-cls`` or ``causal-lm``."""
    steps: int = 200
    """Pruning steps per round (at most :data:`MAX_STEPS` = 1,000,000)."""
    rounds: int = 1
    """Rounds to reach the target (each: prune to an intermediate target, fix the masks, fine-tune)."""
    warmup: float = 0.5
    """Fraction of a round's pruning steps over which the size target moves to the round's target."""
    finetune_steps: int = 100
    """Fine-tuning steps between rounds (at most :data:`MAX_STEPS`; masks fixed to the round's budget; not for
    ``faster``). The fine-tune after the last round runs on the compressed model (:class:`Finetuner`)."""
    finetune_method: str = "full"
    """How the fine-tunes between rounds train. ``full``: every weight (a second AdamW over all of them: its two
    moments are 2 x the weights). ``lora``: the weights frozen, LoRA adapters (``lora``) on the blocks' Linear layers
    train - the masks act on the adapters' path as on the weights' - and are merged into the weights at the phase's
    end, so the next round prunes the fine-tuned weights; the optimizer holds the adapters' moments only. A pipeline
    sets it from ``finetune.method``."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapters of ``finetune_method: lora``; a pipeline sets them from ``finetune.lora``."""
    batch_size: int = 16
    """Per-step batch size over all workers (each of N workers takes batch_size / N)."""
    lr_weights: float = 3e-5
    lr_masks: float = 5e-2
    """Adam learning rate of the mask log-variances (and of the means when ``lr_mu`` is None)."""
    lr_mu: float | None = 5e-3
    """Adam learning rate of the mask means ``mu`` (None: ``lr_masks``). The means carry the task gradient's drift;
    the log-variances carry the budget's and the KL's pressure."""
    mask_lr_decay: str = "linear"
    """``none`` or ``linear``: the mask learning rates fall linearly to 0 over each round's pruning steps (the
    default, with ``constraint: projection`` and 200 steps: ablation row R15 in pipelines/BENCHMARKS.md, +1.7 / +2.4
    points at 50 / 20% over R14's constant rate at 100 steps; R11: 200 steps and linear decay under the Lagrangian)."""
    lr_lambdas: float = 0.5
    """Adam learning rate (ascent) of the Lagrange multipliers (``constraint: lagrangian | upper``): fast enough that
    the expected size follows the target within the run's few hundred steps."""
    finetune_lr: float = 3e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping of the weights (0 disables)."""
    calibration_fraction: float = 0.03
    """Share of the training set used by ``fast`` (stratified for classification)."""
    init: str = "fisher"
    """How the masks start. ``constant``: every unit alike (``vib.logvar_init``). ``fisher``: Kwon et al.'s
    retraining-free selection at the budget (diagonal Fisher of heads and neurons on ``calibration_samples`` training
    samples, :func:`vtrans.fisher.search_masks`) sets the start: its kept units at keep probability
    ``init_keep``, the others at 0.5, so training refines a good selection instead of discovering one
    (:meth:`Pruner.warm_start`, before the first step)."""
    warmup_from: str = "dense"
    """Where the first round's size target starts its warm-up: ``dense`` (1) or ``start`` (the expected size the masks
    start at, less than 1 after a ``fisher`` start). ``start`` tracks the budget more closely but moved the Fisher
    selection further and lost accuracy in the ablations (R12 in pipelines/BENCHMARKS.md)."""
    constraint: str = "projection"
    """How the expected size is held to the warmed-up target t during pruning. ``lagrangian``: ``lambda1 * (s - t) +
    lambda2 * (s - t)^2`` with both lambdas by gradient ascent (CoFi; lambda1 of either sign, so it also pulls the size
    up while the target is above it). ``upper``: the same with the budget as an upper bound - lambda1 projected onto
    ``>= 0`` after each step and the quadratic term only over the target - so no multiplier winds up while the
    target is still above the size. ``projection``: no Lagrangian; after every mask step, every unit's ``log_alpha``
    moves by the one common offset that brings the expected size back to t whenever it is above t, and, once the
    warm-up is over, below it too (:meth:`Pruner.project`): the task and the KL decide which units go, the projection
    how many. The default: the only one whose expected size ends on the budget (within 0.004 over three seeds, against
    0.12-0.14 above it for the Lagrangian; R4 / R15 in pipelines/BENCHMARKS.md), at accuracy within one standard
    deviation at 50% and +1.2 points at 20%."""
    init_keep: float = 0.95
    """Keep probability of the units a ``fisher`` start keeps (the others start at 0.5)."""
    reconstruct: bool = False
    """After the final selection, rescale the kept units' mask values by least squares so every sub-layer's output
    matches the dense model's on calibration data (Kwon et al.'s mask tuning, :func:`vtrans.fisher.tune_masks`);
    the pipeline runs :meth:`Pruner.reconstruct` on ``calibration_samples`` training samples."""
    calibration_samples: int = 128
    """Training samples of the Fisher warm start (``init: fisher``) and of the least-squares reconstruction
    (``reconstruct``): the first training batches (:meth:`calibration_steps`); not to be confused with
    ``calibration_fraction``, Fast-VTrans's subset."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"prune.method must be one of {list(METHODS)}, got {self.method!r}")
        if self.task not in TASKS:
            raise ConfigError(f"prune.task must be one of {list(TASKS)}, got {self.task!r}")
        if not isinstance(self.budget, Budget):
            raise ConfigError(f"prune.budget must be a vtrans.Budget, got {self.budget!r}")
        if not isinstance(self.budget.value, float):
            raise ConfigError(f"prune.budget must be a fraction for training, got {self.budget.value!r}")
        for key in ("steps", "rounds", "batch_size"):
            check_positive(f"prune.{key}", getattr(self, key), integer=True,
                           maximum=MAX_STEPS if key == "steps" else None)
        check_positive("prune.finetune_steps", self.finetune_steps, integer=True, zero_ok=True, maximum=MAX_STEPS)
        check_choice("prune.finetune_method", self.finetune_method, FINETUNE_METHODS)
        if not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"prune.lora must be a vtrans.lora.LoraConfig, got {quote(self.lora)}")
        for key in ("lr_weights", "lr_masks", "lr_lambdas", "finetune_lr"):
            check_positive(f"prune.{key}", getattr(self, key))
        if self.lr_mu is not None:
            check_positive("prune.lr_mu", self.lr_mu)
        if self.mask_lr_decay not in MASK_LR_DECAYS:
            raise ConfigError(f"prune.mask_lr_decay must be one of {list(MASK_LR_DECAYS)}, got {self.mask_lr_decay!r}")
        if self.warmup_from not in WARMUP_FROM:
            raise ConfigError(f"prune.warmup_from must be one of {list(WARMUP_FROM)}, got {self.warmup_from!r}")
        if self.constraint not in CONSTRAINTS:
            raise ConfigError(f"prune.constraint must be one of {list(CONSTRAINTS)}, got {quote(self.constraint)}")
        if self.init not in INITS:
            raise ConfigError(f"prune.init must be one of {list(INITS)}, got {self.init!r}")
        if isinstance(self.init_keep, bool) or not isinstance(self.init_keep, (int, float)) or \
                not 0.5 < self.init_keep < 1.0:
            raise ConfigError(f"prune.init_keep must be in (0.5, 1), got {self.init_keep!r}")
        if not isinstance(self.reconstruct, bool):
            raise ConfigError(f"prune.reconstruct must be true or false, got {self.reconstruct!r}")
        check_positive("prune.calibration_samples", self.calibration_samples, integer=True)
        for key in ("weight_decay", "max_grad_norm"):
            check_positive(f"prune.{key}", getattr(self, key), zero_ok=True)
        if not 0.0 <= self.warmup <= 1.0:
            raise ConfigError(f"prune.warmup must be in [0, 1], got {self.warmup!r}")
        if not 0.0 < self.calibration_fraction <= 1.0:
            raise ConfigError(f"prune.calibration_fraction must be in (0, 1], got {self.calibration_fraction!r}")

    @property
    def between_rounds_steps(self) -> int:
        return 0 if self.method == "faster" else self.finetune_steps

    @property
    def finetunes_between_rounds(self) -> bool:
        """Whether the weights are fine-tuned between rounds (more than one round, not ``faster``, steps > 0)."""
        return self.rounds > 1 and self.between_rounds_steps > 0

    @property
    def lora_between_rounds(self) -> bool:
        """Whether those fine-tunes train LoRA adapters (``finetune_method: lora``)."""
        return self.finetunes_between_rounds and self.finetune_method == "lora"

    @property
    def steps_per_round(self) -> int:
        return self.steps + self.between_rounds_steps

    @property
    def total_steps(self) -> int:
        """Pruning steps of all rounds plus the fine-tunes between them."""
        return self.rounds * self.steps + (self.rounds - 1) * self.between_rounds_steps

    def round_target(self, r: int) -> float:
        """Kept fraction targeted by round ``r`` (0-based): equal steps in sparsity from dense to the budget."""
        final = float(self.budget.value)
        return 1.0 - (1.0 - final) * (r + 1) / self.rounds

    def phase(self, step: int) -> tuple[int, str, int]:
        """``(round, "prune" | "finetune", step within the phase)`` of a global step."""
        r, k = divmod(step, self.steps_per_round)
        return (r, "prune", k) if k < self.steps else (r, "finetune", k - self.steps)

    def calibration_steps(self) -> range:
        """The global steps whose batches are the calibration data of the Fisher warm start and the least-squares
        reconstruction: the first ``ceil(calibration_samples / batch_size)`` training batches."""
        return range(math.ceil(self.calibration_samples / self.batch_size))

    def mask_lr_factor(self, step: int) -> float:
        """Multiplier of the mask learning rates at a pruning step (``mask_lr_decay``)."""
        if self.mask_lr_decay == "none":
            return 1.0
        _, _, k = self.phase(step)
        return max(0.0, 1.0 - k / self.steps)

    def warmup_end(self) -> int:
        """The last step of the first round's warm-up."""
        return max(1, round(self.warmup * self.steps)) - 1

    def target_at(self, step: int, start_fraction: float = 1.0) -> float:
        """The size target t of a pruning step: linear warm-up from the previous round's target (the first round: from
        ``start_fraction``, the expected size the masks start at - 1 for a uniform start, less after a Fisher one)."""
        r, _, k = self.phase(step)
        start = start_fraction if r == 0 else self.round_target(r - 1)
        end = self.round_target(r)
        warm = max(1, round(self.warmup * self.steps))
        return start + (end - start) * min(1.0, (k + 1) / warm)


def final_prune_metrics(history: list[dict]) -> dict[str, float]:
    """``final_expected_size`` and ``final_kl`` of a pruning run's history: the expected size after its last mask
    update (and projection) - what the exact-budget selection starts from - not the size its last step's loss saw
    (one update earlier: a one-step run would report its start). ``{}`` without a pruning step."""
    last = [h for h in history if "expected_size" in h]
    if not last:
        return {}
    h = last[-1]
    return {"final_expected_size": h.get("expected_size_after_step", h["expected_size"]), "final_kl": h["kl"]}


def stall_message(metrics: dict) -> str:
    """The one-line warning of a pruning run whose expected size had not moved by the end of the warm-up (the step's
    metrics, flagged ``stalled``). Under ``constraint: projection`` the expected size follows the target by
    construction, so only the Lagrangian constraints can stall."""
    return (f"expected size {metrics['expected_size']:.4f} has not moved towards the target {metrics['target']:.4f} "
            f"by the end of the warm-up (step {metrics['step'] + 1}): the budget is met only by the final "
            f"selection; raise prune.lr_masks / prune.lr_lambdas or the steps, or start the masks live "
            f"(vib.logvar_init, vib.keep_sharpness)")


class Lagrangian(nn.Module):
    """``lambda1 * (s - t) + lambda2 * (s - t)^2`` with the lambdas trained by gradient ascent; with ``upper`` the
    budget is an upper bound: only ``s > t`` enters the quadratic term and lambda1 stays ``>= 0``
    (:meth:`project_lambdas`)."""

    def __init__(self, upper: bool = False) -> None:
        super().__init__()
        self.upper = upper
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected: torch.Tensor, target: float) -> torch.Tensor:
        gap = expected - target
        over = gap.clamp_min(0) if self.upper else gap
        return self.lambda1 * gap + self.lambda2 * over * over

    @torch.no_grad()
    def project_lambdas(self) -> None:
        """After an ascent step: the multiplier of an upper bound is never negative."""
        if self.upper:
            self.lambda1.clamp_(min=0.0)


class Pruner(Distiller):
    """Model + masks + lambdas + teacher, with the optimizers of every phase."""

    def __init__(self, model: PreTrainedModel, config: PruneConfig, teacher: PreTrainedModel | None = None) -> None:
        super().__init__()
        self.config = config
        if config.method == "faster":
            for p in model.parameters():
                p.requires_grad_(False)
        # the dense teacher: with frozen weights the student without masks is the teacher (no copy)
        needs_teacher = config.distill.logit_weight > 0 or config.distill.hidden_weight > 0
        if teacher is None and needs_teacher and config.method != "faster":
            teacher = copy.deepcopy(model)
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        self._lora_targets: list[str] = []
        """The full names of the Linear layers the LoRA fine-tunes between rounds adapt (found here, before the model
        may be sharded: no peft or a target that matches nothing fails here, not rounds later)."""
        if config.lora_between_rounds:
            require_peft()
            self._lora_targets = lora_targets(model, config.lora)
        self.model = model
        self.vib: VIB = attach(model, config.vib)
        self.lagrangian = Lagrangian(upper=config.constraint == "upper").to(next(model.parameters()).device)
        if config.constraint == "projection":  # no multiplier in the loss: frozen, so DDP expects no gradient for it
            self.lagrangian.requires_grad_(False)
        b = config.budget
        if b.metric == "latency":  # the expected latency of the table measured on this device (vtrans.latency_table)
            from vtrans import latency_table

            self.vib.latency_table = latency_table.table_for_budget(model, b)
            latency_table.check_reachable(self.vib.geometry, b, self.vib.latency_table)
            self.dense_size = self.vib.latency_table.dense_ms
        else:
            self.dense_size = float(size(self.vib.geometry, self.vib.geometry.dense_keep(), b.metric, b.scope,
                                         b.seq_len))
        self._teacher_cache: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizers = self._make_optimizers()
        self._mask_lrs = [group["lr"] for group in self.optimizers["masks"].param_groups]
        self._phase: tuple[int, str] | None = None
        self.start_fraction = 1.0
        """Expected size the masks start at (set by :meth:`warm_start`): where the first round's target warms up from
        with ``warmup_from: start``."""
        self.last_offset = 0.0
        """``constraint: projection``: the ``log_alpha`` offset the last pruning step applied (:meth:`project`)."""
        self.stalled: str | None = None
        """Set at the end of the warm-up when the expected size has not moved towards the target (one line)."""
        self.adapters: LoraAdapters | None = None
        """The LoRA adapters of the fine-tune between rounds under way (``finetune_method: lora``), else None."""

    def replicated_parameters(self) -> list[nn.Parameter]:
        return self.vib.mask_parameters() + [p for p in self.lagrangian.parameters() if p.requires_grad]

    def reset_optimizers(self) -> None:
        self.optimizers = self._make_optimizers()

    def rebind(self, model: PreTrainedModel) -> None:
        """Go on with ``model``, an unsharded copy of :attr:`model` with the same weights: the masks are attached to it
        anew, with their trained state and latency table (the old model's hooks are removed)."""
        if self.adapters is not None:
            raise RuntimeError("merge the LoRA adapters (merge_adapters) before moving to another copy of the model")
        state, table = self.vib.state_dict(), self.vib.latency_table
        self.vib.remove()
        self.model = model
        self.vib = attach(model, self.config.vib)
        self.vib.load_state_dict(state)
        self.vib.latency_table = table

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        mus = [m.mu for _, m in self.vib.masks()]
        logvars = [m.logvar for _, m in self.vib.masks()]
        opts: dict[str, torch.optim.Optimizer] = {
            "masks": torch.optim.Adam([{"params": logvars, "lr": c.lr_masks},
                                       {"params": mus, "lr": c.lr_mu if c.lr_mu is not None else c.lr_masks}]),
            "lambdas": torch.optim.Adam(self.lagrangian.parameters(), lr=c.lr_lambdas, maximize=True),
        }
        weights = [p for p in self.model.parameters() if p.requires_grad]
        if c.method != "faster":
            opts["weights"] = torch.optim.AdamW(weights, lr=c.lr_weights, weight_decay=c.weight_decay)
        if c.finetunes_between_rounds and not c.lora_between_rounds:  # LoRA's: made with its adapters each round
            opts["finetune"] = torch.optim.AdamW(weights, lr=c.finetune_lr, weight_decay=c.weight_decay)
        return opts

    def _add_adapters(self, r: int) -> None:
        """Enter round ``r``'s LoRA fine-tune: adapters on the model (seeded as the phase's first step: every worker
        starts them alike), the masks' hooks moved onto peft's wrapper modules, a fresh optimizer over the adapters."""
        c = self.config
        self.adapters = add_adapters(self.model, c.lora, seed=step_seed(c.seed, r * c.steps_per_round + c.steps),
                                     targets=self._lora_targets)
        self.vib.reinstall()
        self.optimizers["finetune"] = torch.optim.AdamW(self.adapters.parameters(), lr=c.finetune_lr,
                                                        weight_decay=c.weight_decay)

    def merge_adapters(self) -> None:
        """Leave a LoRA fine-tune: the adapters merged into the weights and removed (the weights train again), the
        masks' hooks back on the model's own modules, the adapters' optimizer dropped. Sharded: every worker calls it
        (:meth:`vtrans.lora.LoraAdapters.merge`)."""
        if self.adapters is None:
            return
        self.adapters.merge()
        self.adapters = None
        self.vib.reinstall()
        del self.optimizers["finetune"]

    # --- schedule ------------------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> tuple[int, str, int]:
        """Enter the phase of a global step: fix the round's budget before fine-tuning, release it after."""
        r, phase, k = self.config.phase(step)
        self.model.train()
        if self._phase != (r, phase):
            if phase == "finetune":
                self.fix_round_budget(r)
                self.vib.eval()
                if self.config.lora_between_rounds and self.adapters is None:
                    self._add_adapters(r)
            else:
                self.merge_adapters()
                if self.vib.budget is not None:
                    self.vib.release_budget()
                self.vib.train()
            self._phase = (r, phase)
        return r, phase, k

    def fix_round_budget(self, r: int) -> None:
        b = self.config.budget
        self.vib.apply_budget(Budget(**{b.metric: self.config.round_target(r)}, scope=b.scope, seq_len=b.seq_len,
                                     tolerance=b.tolerance, uniform=b.uniform, align=b.align,
                                     batch_size=b.batch_size))

    def finish(self) -> None:
        """Fix the final budget exactly (the state compression uses). With ``config.reconstruct`` call
        :meth:`reconstruct` next (after saving the posterior: the rescaled means are no longer the trained ones). A
        training stopped inside a LoRA fine-tune has its adapters merged first."""
        self.merge_adapters()
        self.vib.apply_budget(self.config.budget, method=self.config.method)

    @torch.no_grad()
    def warm_start(self, calibration) -> None:
        """``init: fisher``: start the masks from Kwon's selection at the budget on ``calibration`` batches - its kept
        heads and neurons at keep probability ``init_keep``, the pruned ones at 0.5 (hidden dimensions and block gates,
        which Kwon never prunes, at ``init_keep``). Only the log-variances change: ``log_alpha`` is set to the value
        whose keep probability is wanted."""
        from vtrans.fisher import fisher_information, search_masks

        was = self.model.training
        self.model.eval()
        with self.vib.disabled():
            fisher = fisher_information(self.model, calibration, blocks=False)
        self.model.train(was)
        b = self.config.budget
        # a start, not the final selection: any fill within half the target will do (tiny models have coarse units)
        try:
            if b.metric == "latency":
                from vtrans.latency_table import select_latency

                sel = select_latency(self.vib.geometry, fisher.scores(), b, self.vib.latency_table)
            else:
                sel = search_masks(self.vib.geometry, fisher.scores(),
                                   Budget(**{b.metric: b.value}, scope=b.scope, seq_len=b.seq_len, tolerance=0.5))
        except BudgetError as e:  # Kwon never prunes the hidden dimension; the VIB can still reach the budget
            warnings.warn(f"prune.init=fisher: Kwon's selection cannot start this budget ({e}); the masks start "
                          f"uniform (init=constant)", UserWarning, stacklevel=2)
            return
        k, t = self.vib.config.keep_sharpness, self.vib.config.threshold
        keep_la = t - math.log(self.config.init_keep / (1 - self.config.init_keep)) / k  # log_alpha of p = init_keep

        def start(m, keep: torch.Tensor | None) -> None:
            la = torch.full_like(m.logvar, keep_la)
            if keep is not None:
                la[~keep.to(la.device)] = t  # keep probability 0.5
            m.logvar.copy_(la + torch.log(m.mu.pow(2) + EPS))

        for name, m in self.vib.masks():
            if name in ("hidden", "mha", "ffn"):
                start(m, None)
        for i in range(self.vib.geometry.n_layers):
            if self.vib.heads is not None:
                start(self.vib.heads[i], sel.groups[i])
            if self.vib.neurons is not None:
                start(self.vib.neurons[i], sel.neurons[i])
        self.start_fraction = min(1.0, float(self.expected_fraction()))

    def reconstruct(self, calibration) -> None:
        """Rescale the kept units' mask values by least squares on ``calibration`` (batches like the training
        batches) so every sub-layer's output matches the dense model's (:func:`vtrans.fisher.tune_masks`)."""
        from vtrans.fisher import tune_masks

        was = self.model.training
        tune_masks(self.vib, calibration)
        self.model.train(was)

    # --- the objective ----------------------------------------------------------------------------------------------
    def expected_fraction(self) -> torch.Tensor:
        b = self.config.budget
        return self.vib.expected_size(b.metric, b.scope, b.seq_len) / self.dense_size

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch at a global step (call :meth:`begin_step` first)."""
        c, d = self.config, self.config.distill
        _, phase, _ = c.phase(step)
        sample_ids = batch.get("sample_id")
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = d.hidden_weight > 0
        self.vib.set_noise_keys(sample_ids, step)
        try:
            out = self.model(**inputs, labels=batch["labels"], output_hidden_states=hidden)
        finally:
            self.vib.set_noise_keys(None)
        metrics: dict[str, float] = {"task_loss": float(out.loss.detach())}
        loss = d.task_weight * out.loss
        if d.logit_weight > 0 or hidden:
            teacher = self._teacher_outputs(inputs, sample_ids, hidden)
            if d.logit_weight > 0:
                lm_mask = inputs.get("attention_mask") if c.task == "causal-lm" else None
                kd = self._kd(out.logits, teacher["logits"], lm_mask)
                loss = loss + d.logit_weight * kd
                metrics["kd_loss"] = float(kd.detach())
            if hidden:
                keep = self.vib.selection().hidden.to(out.logits.device)
                s_h = torch.stack(out.hidden_states).transpose(0, 1)[..., keep]  # (batch, layers+1, seq, kept)
                t_h = teacher["hidden"][..., keep]
                m = inputs.get("attention_mask", torch.ones(s_h.shape[0], s_h.shape[2], device=s_h.device))
                m = m[:, None, :, None].to(s_h.dtype)  # (batch, 1, seq, 1): real tokens only
                err = ((s_h - t_h).pow(2) * m).sum((0, 2, 3))  # (layers+1,)
                ref = (t_h.pow(2) * m).sum((0, 2, 3)).clamp_min(1e-12)
                hl = (err / ref).mean()
                loss = loss + d.hidden_weight * hl
                metrics["hidden_loss"] = float(hl.detach())
        if phase == "prune":
            kl = self.vib.kl()
            s = self.expected_fraction()
            start = self.start_fraction if c.warmup_from == "start" else 1.0
            t = c.target_at(step, start)
            penalty = self.lagrangian(s, t) if c.constraint != "projection" else torch.zeros((), device=s.device)
            loss = loss + kl + penalty
            metrics.update(kl=float(kl.detach()), expected_size=float(s.detach()), target=t,
                           objective=float((loss - penalty).detach()),
                           lagrangian=float(penalty.detach()), lambda1=float(self.lagrangian.lambda1.detach()),
                           lambda2=float(self.lagrangian.lambda2.detach()),
                           active_fraction=self.vib.active_fraction(),
                           **{f"kl_{k}": v for k, v in self.vib.kl_by_type().items()})
            if step == c.warmup_end() and self.stalled is None:
                gap = start - t  # how far the warm-up asked the masks to move
                moved = (start - metrics["expected_size"]) / gap if gap > 0.02 else 1.0
                if moved < 0.1:
                    metrics["stalled"] = 1.0
                    self.stalled = stall_message(dict(metrics, step=step))
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def optimize(self, loss: torch.Tensor, step: int) -> None:
        """Backward and one step of the optimizers of this step's phase."""
        _, phase, _ = self.config.phase(step)
        names = ["finetune"] if phase == "finetune" else ["masks"] + (
            ["lambdas"] if self.config.constraint != "projection" else []) + (
            ["weights"] if "weights" in self.optimizers else [])
        opts = [self.optimizers[n] for n in names]
        if phase == "prune":
            factor = self.config.mask_lr_factor(step)
            for group, lr in zip(self.optimizers["masks"].param_groups, self._mask_lrs):
                group["lr"] = lr * factor
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        self._backward(loss)
        if self.config.max_grad_norm > 0 and {"weights", "finetune"} & set(names):
            params = [p for p in self.model.parameters() if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        for o in opts:
            o.step()
        if phase == "prune":
            self.lagrangian.project_lambdas()
            if self.config.constraint == "projection":
                c = self.config
                start = self.start_fraction if c.warmup_from == "start" else 1.0
                _, _, k = c.phase(step)
                self.last_offset = self.project(c.target_at(step, start),
                                                both_ways=k + 1 >= max(1, round(c.warmup * c.steps)))

    def _backward(self, loss: torch.Tensor) -> None:
        super()._backward(loss)
        if self.adapters is not None:  # made after the data-parallel wrapper: their gradients are averaged here
            from vtrans.sharding import average_grads

            average_grads(self.adapters.parameters())

    @torch.no_grad()
    def project(self, target: float, both_ways: bool = False) -> float:
        """``constraint: projection``: when the expected kept fraction is above ``target`` (or, with ``both_ways``,
        anywhere off it), move every unit's ``log_alpha`` by the one common offset that brings it to ``target``
        (bisection; the expected size falls monotonically in the offset). During a round's warm-up the target is an
        upper bound (a Fisher start below it is not pulled back up); once the target stops moving it is held both ways,
        so the KL's pull on every keep probability decides which units go, never how many. Returns the offset applied
        (0 when the size was already where it should be)."""
        b = self.config.budget

        def fraction(offset: float) -> float:
            return float(self.vib.expected_size(b.metric, b.scope, b.seq_len, offset=offset)) / self.dense_size

        now = fraction(0.0)
        if now <= target and not (both_ways and now < target):
            return 0.0
        sign = 1.0 if now > target else -1.0  # positive offsets shrink the size
        lo, hi = 0.0, 1.0  # magnitudes of the offset: |lo| on the current side of the target, |hi| across it
        while (fraction(sign * hi) - target) * sign > 0 and hi < 64.0:  # 64: every keep probability is ~0 or ~1
            lo, hi = hi, 2 * hi
        for _ in range(40):
            mid = (lo + hi) / 2
            if (fraction(sign * mid) - target) * sign > 0:
                lo = mid
            else:
                hi = mid
        self.vib.shift_log_alpha(sign * hi)
        return sign * hi

    # --- checkpointing ----------------------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every tensor of the training state (weights, masks, lambdas, optimizer states, RNG) and its JSON part."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {}
        if self.config.method != "faster":  # faster never changes the weights
            # inside a LoRA fine-tune: the weights under their own keys, the adapters apart (a fresh model loads them)
            weights, adapters = self.adapters.split_state() if self.adapters is not None else \
                (self.model.state_dict(), {})
            tensors.update({f"model.{k}": v for k, v in weights.items()})
            tensors.update({f"{LORA_PREFIX}{k}": v for k, v in adapters.items()})
        tensors.update({f"vib.{k}": v for k, v in self.vib.state_dict().items()})
        tensors.update({f"lagrangian.{k}": v for k, v in self.lagrangian.state_dict().items()})
        meta["optimizers"] = save_optimizers(self.optimizers, tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        meta["phase"] = list(self._phase) if self._phase else None
        meta["start_fraction"] = self.start_fraction
        meta["between_rounds"] = self.config.finetune_method if self.config.finetunes_between_rounds else None
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        c = self.config
        saved = meta.get("between_rounds", "full" if c.finetunes_between_rounds else None)  # older: always full
        here = c.finetune_method if c.finetunes_between_rounds else None
        if saved != here:
            raise ConfigError(f"prune.finetune_method={c.finetune_method!r} (between rounds: {here!r}) cannot resume a "
                              f"checkpoint whose fine-tunes between rounds were {saved!r}; start the pruning over (a "
                              f"new run name or storage path)")
        self.merge_adapters()  # the saved weights are the whole state: no adapters of this pruner's own are kept
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        if model_sd:
            self.model.load_state_dict(laid_out_as(self.model, model_sd), strict=False)
        self.vib.load_state_dict({k[len("vib."):]: v for k, v in tensors.items() if k.startswith("vib.")})
        self.lagrangian.load_state_dict({k[len("lagrangian."):]: v for k, v in tensors.items()
                                         if k.startswith("lagrangian.")})
        self.start_fraction = float(meta.get("start_fraction", 1.0))
        self._phase = tuple(meta["phase"]) if meta.get("phase") else None
        if self._phase is not None:
            r, phase = self._phase
            self._phase = None
            self.begin_step(r * self.config.steps_per_round + (self.config.steps if phase == "finetune" else 0))
            # begin_step re-fixed the round budget from the masks (the restored buffers hold the same selection) and,
            # inside a LoRA fine-tune, made its adapters and their optimizer: they take the saved values now
        if self.adapters is not None:
            self.adapters.load_adapters({k[len(LORA_PREFIX):]: v for k, v in tensors.items()
                                         if k.startswith(LORA_PREFIX)})
        load_optimizers(self.optimizers, tensors, meta)
        torch.set_rng_state(tensors["rng.torch"])


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The RNG seed of a training step (dropout etc.): a function of (seed, step, rank), so resuming is exact."""
    return seed * 1_000_003 + step * 101 + rank


def fit(module: Pruner | Finetuner, batches, start_step: int = 0, end_step: int | None = None,
        on_step=None, *, forward=None, rank: int = 0, warm_start: bool = True,
        before_step=None) -> list[dict[str, float]]:
    """The training loop: steps ``[start_step, end_step)``, in one process or on one data-parallel worker (Ray Train's
    worker runs this very loop). ``batches(step)`` returns the batch of a global step (a worker's share of it);
    ``on_step(step, metrics)`` is called after each step (a worker reports and checkpoints there), ``before_step(step)``
    before it. ``forward`` computes ``loss, metrics`` (default: the module; on a worker its data-parallel wrapper);
    ``rank`` keys the step's RNG seed. Returns the metrics of every step (with the learning rate of every optimizer
    as ``lr_<name>``). A pruning run with ``init: fisher`` starting at step 0 is warm-started first
    (:meth:`Pruner.warm_start` on the batches of :meth:`PruneConfig.calibration_steps`) unless ``warm_start`` is
    False (a worker warm-starts before wrapping the module)."""
    end = module.config.total_steps if end_step is None else end_step
    if warm_start and start_step == 0 and isinstance(module, Pruner) and module.config.init == "fisher":
        module.warm_start([batches(s) for s in module.config.calibration_steps()])
    forward = module if forward is None else forward
    history = []
    for step in range(start_step, end):
        if before_step is not None:
            before_step(step)
        torch.manual_seed(step_seed(module.config.seed, step, rank))
        module.begin_step(step)
        loss, metrics = forward(batches(step), step)
        module.optimize(loss, step)
        if isinstance(module, Pruner) and "expected_size" in metrics:  # the step's own: before its update
            with torch.no_grad():
                metrics["expected_size_after_step"] = float(module.expected_fraction())
        metrics.update({f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in module.optimizers.items()})
        metrics["step"] = step
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    return history

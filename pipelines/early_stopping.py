"""ASHA early stopping of sweep trials, on the fine-tune's held-out quality and, by default, per budget.

A trial's fine-tune measures ``val_accuracy`` / ``val_perplexity`` on held-out training samples every
``finetune.eval_every`` steps (:mod:`pipelines.stages.finetune`); its Ray Train job hands those reports to the trial
(``TuneReportCallback``), tagged with ``finetune_step``. ASHA (asynchronous successive halving, Li et al. 2020)
compares each trial, at rungs ``grace_period * reduction_factor**k`` fine-tune steps, with the trials that reached the
rung before it and stops it outside the best ``1 / reduction_factor``.

A budget sweep wants a front, not a winner: a 20% model is worse than a 70% one and that says nothing about whether
it is worth finishing. :class:`BudgetASHA` therefore keeps one ASHA per budget (``sweep.asha.by_budget``), so a trial
only competes with trials of its own budget (other KL weights, methods, learning rates). No rung sits at the last
fine-tune step: a trial that finished fine-tuning is always evaluated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from pipelines.train_jobs import FINETUNE_STEP as TIME_ATTR

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


class BudgetASHA(FIFOScheduler):
    """One :class:`~ray.tune.schedulers.AsyncHyperBandScheduler` per value of ``group_keys`` in a trial's config."""

    def __init__(self, metric: str, mode: str, steps: int, grace_period: int, reduction_factor: float,
                 group_keys: list[str]) -> None:
        super().__init__()
        if not 0 < grace_period < steps:
            raise ValueError(f"ASHA needs 0 < grace_period < fine-tune steps, got {grace_period} and {steps}")
        # not `_metric`: Tune then insists every result carries it, and the trial's prune job and final evaluation
        # report without it
        self.val_metric, self.mode, self.steps = metric, mode, steps
        # the largest rung lies below `steps` (rungs reach max_t), and a trial past its last rung is never stopped
        self._asha = {"time_attr": TIME_ATTR, "metric": metric, "mode": mode, "max_t": steps - 1,
                      "grace_period": grace_period, "reduction_factor": reduction_factor,
                      "stop_last_trials": False}
        self.group_keys = list(group_keys)
        self.groups: dict[tuple, AsyncHyperBandScheduler] = {}
        self._group_of: dict[str, tuple] = {}
        self.stopped: list[str] = []
        """Ids of the trials this scheduler stopped."""

    def group(self, config: dict) -> tuple:
        return tuple(config.get(k) for k in self.group_keys)

    def _scheduler(self, trial: Trial) -> AsyncHyperBandScheduler:
        key = self._group_of.setdefault(trial.trial_id, self.group(trial.config))
        if key not in self.groups:
            self.groups[key] = AsyncHyperBandScheduler(**self._asha)
        return self.groups[key]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return metric in (None, self.val_metric) and mode in (None, self.mode)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._scheduler(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if result.get(TIME_ATTR, 0) >= self.steps:  # done fine-tuning: evaluated, whatever its held-out quality
            return TrialScheduler.CONTINUE
        action = self._scheduler(trial).on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self.stopped.append(trial.trial_id)
            value = result.get(self.val_metric)
            print(f"[sweep] ASHA stops trial {trial.trial_id} ({_describe(self.group_keys, trial.config)}) at "
                  f"fine-tune step {result.get(TIME_ATTR)}: {self.val_metric}={value:.4g} is outside the best "
                  f"1/{self._asha['reduction_factor']:g} of its rung", flush=True)
        return action

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._scheduler(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._scheduler(trial).on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._scheduler(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA on {self.val_metric} per {self.group_keys or 'sweep'}: {len(self.stopped)} trial(s) stopped"


def _describe(keys: list[str], config: dict) -> str:
    return ", ".join(f"{k}={config.get(k)}" for k in keys) or "one group"

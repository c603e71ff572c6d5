"""ASHA per budget (no Ray cluster): trials compete only within their budget, never at their last fine-tune step; a
stopped trial's MLflow run ends KILLED."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipelines.early_stopping import TIME_ATTR, BudgetASHA

CONTINUE, STOP = "CONTINUE", "STOP"


def _trial(i: int, budget: float, kl: float = 0.01) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i}", config={"model": "m", "prune.budget.params": budget,
                                                     "prune.vib.kl_weight": kl})


def _asha(**kw) -> BudgetASHA:
    args = dict(metric="val_accuracy", mode="max", steps=40, grace_period=10, reduction_factor=2,
                group_keys=["prune.budget.params"])
    args.update(kw)
    return BudgetASHA(**args)


def _report(s: BudgetASHA, trial, step: int, value: float) -> str:
    return s.on_trial_result(None, trial, {TIME_ATTR: step, "val_accuracy": value})


def test_trials_compete_within_their_budget_only() -> None:
    s = _asha()
    big, big_worse, small, small_worse = _trial(0, 0.7), _trial(1, 0.7, 0.1), _trial(2, 0.2), _trial(3, 0.2, 0.1)
    for t in (big, big_worse, small, small_worse):
        s.on_trial_add(None, t)
    assert _report(s, big, 10, 0.80) == CONTINUE  # first at its rung
    assert _report(s, big_worse, 10, 0.70) == STOP  # below the best half of the 0.7 budget's rung
    assert _report(s, small, 10, 0.60) == CONTINUE  # far below the 0.7 trials, but first of the 0.2 budget
    assert _report(s, small_worse, 10, 0.60) == CONTINUE  # a tie is not below the cutoff
    assert s.stopped == ["t1"] and set(s.groups) == {(0.7,), (0.2,)}


def test_one_group_without_budget_keys() -> None:
    s = _asha(group_keys=[])
    big, small = _trial(0, 0.7), _trial(1, 0.2)
    s.on_trial_add(None, big)
    s.on_trial_add(None, small)
    assert _report(s, big, 10, 0.80) == CONTINUE
    assert _report(s, small, 10, 0.60) == STOP


def test_rungs_grow_by_the_reduction_factor_and_spare_the_last_step() -> None:
    s = _asha(steps=40, grace_period=10)  # rungs at 10 and 20 fine-tune steps; 40 is the last step
    a, b = _trial(0, 0.5), _trial(1, 0.5, 0.1)
    for t in (a, b):
        s.on_trial_add(None, t)
    assert _report(s, a, 10, 0.9) == CONTINUE
    assert _report(s, b, 10, 0.95) == CONTINUE
    assert _report(s, b, 15, 0.10) == CONTINUE  # between rungs: never judged
    assert _report(s, a, 20, 0.9) == CONTINUE
    assert _report(s, b, 20, 0.5) == STOP  # the second rung
    c = _trial(2, 0.5, 1.0)
    s.on_trial_add(None, c)
    assert _report(s, c, 40, 0.0) == CONTINUE  # its first report is its last step: it gets evaluated
    # a result without the metric (the trial's prune job, its final evaluation) is not judged
    assert s.on_trial_result(None, c, {TIME_ATTR: 10, "loss": 9.0}) == CONTINUE
    assert s.on_trial_result(None, c, {"accuracy": 0.0}) == CONTINUE


def test_lower_is_better_for_perplexity() -> None:
    s = _asha(metric="val_perplexity", mode="min")
    a, b, c = _trial(0, 0.5), _trial(1, 0.5, 0.1), _trial(2, 0.5, 1.0)
    for t in (a, b, c):
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, a, {TIME_ATTR: 10, "val_perplexity": 30.0}) == CONTINUE
    assert s.on_trial_result(None, b, {TIME_ATTR: 10, "val_perplexity": 20.0}) == CONTINUE
    assert s.on_trial_result(None, c, {TIME_ATTR: 10, "val_perplexity": float("inf")}) == STOP  # diverged


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="grace_period < fine-tune steps"):
        _asha(steps=10, grace_period=10)
    s = _asha()
    assert s.set_search_properties(None, None) and s.set_search_properties("val_accuracy", "max")
    assert not s.set_search_properties("loss", "min")  # Tune must not re-aim it at another metric
    assert s.metric is None  # else Tune requires the metric in every result (the prune job's, the evaluation's)


@pytest.mark.parametrize("ended_as", ["RUNNING", "FAILED"])
def test_a_stopped_trials_run_ends_killed_whatever_its_job_did_first(tmp_path, ended_as: str) -> None:
    """Tune ends a stopped trial's process mid fine-tune: killed outright its run is still RUNNING; if its Train job
    raised first, the trial already ended it FAILED. Either way the driver ends it KILLED and tags the step; a finished
    trial of the same sweep is left alone."""
    from pipelines.sweep_runner import TAG_EARLY_STOPPED, TAG_TRIAL, _early_stopped
    from pipelines.tracking import Tracker
    from pipelines.train_jobs import FINETUNE_STEP

    t = Tracker.connect(f"sqlite:///{tmp_path}/mlflow.db", "sweep")
    parent = t.start_run("sweep")
    stopped = t.start_run("a", parent, tags={TAG_TRIAL: "t1"})
    done = t.start_run("b", parent, tags={TAG_TRIAL: "t2"})
    t.end_run(done)
    if ended_as != "RUNNING":
        t.end_run(stopped, ended_as)
    _early_stopped(t, parent, {"trial_id": "t1", FINETUNE_STEP: 4})
    run = t.client.get_run(stopped)
    assert (run.info.status, run.data.tags[TAG_EARLY_STOPPED]) == ("KILLED", "fine-tune step 4")
    finished = t.client.get_run(done)
    assert finished.info.status == "FINISHED" and TAG_EARLY_STOPPED not in finished.data.tags

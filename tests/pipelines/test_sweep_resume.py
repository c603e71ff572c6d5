"""``vtrans sweep`` as a user runs it: ``--resume`` after the driver was killed (kill -9) mid-way through a trial's
pruning job continues the same Tune experiment and MLflow parent run (finished trials are not run again, the
interrupted trial's Train job resumes from its checkpoint, no duplicate runs); and ``sweep.search: optuna`` samples
its multi-objective trials inside the space's bounds, each meeting its sampled budget, with the logged Pareto front
equal to a recomputation from the trial runs.

Both sweeps run as ``python -m pipelines.cli sweep`` subprocesses in sessions of their own (a local Ray started by
the driver lives in the driver's session), so the test can kill exactly the processes the driver started.

The driver writes Tune's experiment state at most every 10 s, so a trial that finished just before the kill may be
started again on resume: it finds its MLflow run FINISHED and reports what that run logged, running nothing. The kill
here comes as soon as the next trial has a checkpoint, whether or not Tune recorded the first one's end."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.pareto import Objective, pareto_front

pytestmark = pytest.mark.integration

BASE = {
    "model": {"name": "tiny-a", "task": "seq-cls"},
    "data": {"name": "rotten_tomatoes", "test_fraction": 0.02, "max_length": 32, "max_train_samples": 64},
    "calibration": {"fraction": 0.5},
    "teacher": {"steps": 0},  # the dense model is the teacher: no Train job before the trials
    "finetune": {"steps": 0, "batch_size": 8},
    "evaluate": {"latency_batch_sizes": [2], "latency_seq_lens": [32], "latency_repeats": 2, "warmup": 1},
    "ray": {"num_workers": 1},
}
TOLERANCE = 0.05
PRUNE_STEPS = 80  # the prune job checkpoints every 80 // 4 = 20 steps: the kill has a window of several seconds
BUDGETS = [0.6, 0.4]  # trial 0 finishes, trial 1 is killed mid-prune

RESUME = {
    **BASE, "name": "resume-sweep",
    "prune": {"method": "faster", "budget": {"params": 0.5, "seq_len": 32, "tolerance": TOLERANCE},
              "steps": PRUNE_STEPS, "batch_size": 8},
    "tracking": {"experiment": "sweep-resume"},
    "sweep": {"space": {"prune.budget.params": BUDGETS}, "max_concurrent_trials": 1},
}
LOW, HIGH = 0.3, 0.7
SAMPLES = 2
OPTUNA = {
    **BASE, "name": "optuna-sweep",
    "prune": {"method": "faster", "budget": {"params": 0.5, "seq_len": 32, "tolerance": TOLERANCE}, "steps": 2,
              "batch_size": 8},
    "tracking": {"experiment": "sweep-optuna"},
    "sweep": {"space": {"prune.budget.params": {"uniform": [LOW, HIGH]}}, "search": "optuna", "num_samples": SAMPLES,
              "objectives": ["accuracy:max", "params_blocks:min"], "seed": 7},
}
TRIAL_TAG, KEY_TAG = "vtrans.trial", "vtrans.sweep_key"
TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------------------------------------
# helpers: a sweep folder, the CLI in a session of its own, and the processes of that session
# ---------------------------------------------------------------------------------------------------------------------


def _sweep_dir(d: Path, config: dict) -> Path:
    from transformers import BertForSequenceClassification

    from tests.tiny import tiny
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_tokenizer

    tiny("bert", BertForSequenceClassification, seed=0, vocab_size=30522).save_pretrained(d / "tiny-a")
    load_tokenizer(resolve_model("minilm")).save_pretrained(d / "tiny-a")
    (d / "sweep.yaml").write_text(yaml.safe_dump(config))
    return d


def _start(d: Path, *args: str, log: str) -> subprocess.Popen:
    """``vtrans sweep sweep.yaml ARGS`` in ``d`` (the embedded MLflow store ``d/mlflow.db``), in a new session."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(VTRANS_PROGRESS="lines", PYTHONUNBUFFERED="1")
    with open(d / log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "sweep", "sweep.yaml", *args], cwd=d, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _session(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid`` (the driver and every Ray process it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _end_session(proc: subprocess.Popen, timeout: float = 60.0) -> list[int]:
    """SIGKILL the driver's process group, then any process left in its session; returns the pids that outlived the
    driver (Ray's processes are bound to it and should go by themselves; they are killed here by pid if not)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + 10
    while _session(proc.pid) and time.monotonic() < deadline:  # Ray's own fate-sharing, given a moment
        time.sleep(0.2)
    survivors = _session(proc.pid)
    deadline = time.monotonic() + timeout
    while (left := _session(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not _session(proc.pid), f"processes of the sweep's session survive SIGKILL: {_session(proc.pid)}"
    return survivors


def _tail(d: Path, log: str, n: int = 6000) -> str:
    return (d / log).read_text(errors="replace")[-n:]


def _finish(d: Path, proc: subprocess.Popen, log: str) -> str:
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    finally:
        _end_session(proc)
    text = (d / log).read_text(errors="replace")
    assert rc == 0, text[-6000:]
    return text


def _client(d: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{d / 'mlflow.db'}")


def _runs(client, experiment: str, filter_string: str = "") -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string, max_results=1000)


def _trials(client, experiment: str, parent: str) -> list:
    return _runs(client, experiment, f"tags.mlflow.parentRunId = '{parent}'")


def _prune_dirs(d: Path) -> list[Path]:
    root = d / "runs" / "stages" / "prune"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _last_checkpoint_step(prune_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train registered for the stage's job (None: none yet)."""
    snap = prune_dir / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except (OSError, json.JSONDecodeError):
        return None  # not written yet, or caught mid-write
    return None if not latest else int(latest["metrics"]["step"])


def _tune_statuses(d: Path) -> dict[str, str]:
    """Trial id -> status in the Tune experiment state the driver last wrote (empty: none readable yet)."""
    files = sorted((d / "runs" / "sweeps").glob("*/experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    try:
        state = json.loads(files[-1].read_text()) if files else {"trial_data": []}
        trials = [json.loads(t[0]) for t in state["trial_data"]]
    except (OSError, json.JSONDecodeError, KeyError, IndexError):
        return {}  # caught mid-write
    return {t["trial_id"]: t["status"] for t in trials}


def _record(prune_dir: Path) -> dict | None:
    f = prune_dir / "stage.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _check_front(client, d: Path, parent: str, rows: list[dict]) -> list[int]:
    """The logged (accuracy, params_blocks) front of ``tiny-a`` equals ``pareto_front`` over the trial runs' metrics
    (``rows``); returns the front's indices into ``rows``."""
    expected = pareto_front(rows, [Objective("accuracy", "max"), Objective("params_blocks", "min")])
    assert expected  # never empty for >= 1 row
    path = client.download_artifacts(parent, "pareto/tiny-a-accuracy-vs-params_blocks.json", str(d / "dl"))
    table = json.loads(Path(path).read_text())
    columns = ("run_id", "accuracy", "params_blocks", "params_blocks_ratio", "prune.budget.params")
    key = lambda r: tuple(float(r[c]) if c != "run_id" else r[c] for c in columns if c in rows[0])
    # the same points (ties in accuracy are ordered by the sweep's row order, which the store need not share)
    assert sorted(map(key, table)) == sorted(key(rows[i]) for i in expected)
    assert [r["accuracy"] for r in table] == sorted((r["accuracy"] for r in table), reverse=True)
    return expected


# ---------------------------------------------------------------------------------------------------------------------
# --resume after kill -9 of the driver
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_after_the_driver_is_killed_continues_the_same_experiment(tmp_path: Path) -> None:
    d = _sweep_dir(tmp_path, RESUME)
    proc = _start(d, log="first.log")
    try:
        # wait for: a trial finished and a later trial's prune job checkpointed
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, f"the sweep ended (rc {proc.returncode}) before it was killed:\n" \
                                        f"{_tail(d, 'first.log')}"
            dirs = _prune_dirs(d)
            done = [p for p in dirs if _record(p) is not None]
            running = [p for p in dirs if _record(p) is None and _last_checkpoint_step(p) is not None]
            if done and running:
                break
            assert time.monotonic() < deadline, f"no interrupted trial to catch:\n{_tail(d, 'first.log')}"
            time.sleep(0.1)
        t_kill = time.time()
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        survivors = _end_session(proc)
    # what the killed sweep left behind
    assert _record(running[0]) is None, "the prune stage finished before the kill; nothing was interrupted"
    interrupted = running[0]
    ckpt = _last_checkpoint_step(interrupted)
    assert ckpt is not None and 0 <= ckpt < PRUNE_STEPS - 1 and (ckpt + 1) % (PRUNE_STEPS // 4) == 0, ckpt
    client = _client(d)
    parents = _runs(client, "sweep-resume", f"tags.`{KEY_TAG}` != ''")
    assert len(parents) == 1 and parents[0].info.status == "RUNNING"
    parent = parents[0].info.run_id
    before = {t.info.run_id: t for t in _trials(client, "sweep-resume", parent)}
    statuses = sorted(t.info.status for t in before.values())
    assert statuses == ["FINISHED", "RUNNING"], statuses  # one trial done, the next one killed mid-prune
    (done_run,) = [t for t in before.values() if t.info.status == "FINISHED"]
    (killed_run,) = [t for t in before.values() if t.info.status == "RUNNING"]
    assert killed_run.data.tags["vtrans.key.prune"] == interrupted.name
    done_prune = d / "runs" / "stages" / "prune" / done_run.data.tags["vtrans.key.prune"]
    done_record = _record(done_prune)
    assert done_record["finished_at"] < t_kill
    done_eval = json.loads((d / "runs" / "stages" / "evaluate" / done_run.data.tags["vtrans.key.evaluate"]
                            / "stage.json").read_text())
    tune_state = _tune_statuses(d)  # any other trial has not started; the finished one may not be recorded yet
    assert tune_state.pop(done_run.data.tags[TRIAL_TAG]) in ("TERMINATED", "RUNNING")
    assert tune_state.pop(killed_run.data.tags[TRIAL_TAG]) == "RUNNING"
    assert set(tune_state.values()) <= {"PENDING"}, tune_state
    killed_loss = client.get_metric_history(killed_run.info.run_id, "prune.loss")
    assert {m.step for m in killed_loss} >= set(range(ckpt + 1))  # the curve up to the checkpoint was streamed

    # --resume runs to the end
    proc = _start(d, "--resume", log="resume.log")
    text = _finish(d, proc, "resume.log")
    print(f"\nkilled at prune step {ckpt} of trial {killed_run.data.tags[TRIAL_TAG]}, "
          f"{t_kill - done_eval['finished_at']:.1f}s after the first trial finished; "
          f"{len(survivors)} processes outlived the driver")
    assert "resuming the Tune experiment" in text
    assert f"sweep resume-sweep: {len(BUDGETS)} trials finished, 0 failed" in text

    parents = _runs(client, "sweep-resume", f"tags.`{KEY_TAG}` != ''")
    assert [p.info.run_id for p in parents] == [parent]  # the same parent run, no second one
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials"] == len(BUDGETS) and parents[0].data.metrics["failed_trials"] == 0
    trials = _trials(client, "sweep-resume", parent)
    assert len(_runs(client, "sweep-resume")) == 1 + len(BUDGETS)  # nothing else in the experiment
    assert len(trials) == len(BUDGETS) and all(t.info.status == "FINISHED" for t in trials)
    assert sorted(float(t.data.params["prune.budget.params"]) for t in trials) == sorted(BUDGETS)
    assert len({t.data.tags[TRIAL_TAG] for t in trials}) == len(BUDGETS)
    by_id = {t.info.run_id: t for t in trials}
    assert set(before) == set(by_id)  # both runs of the killed sweep were continued, not replaced

    # the finished trial was not run again: untouched run, stage records and no trace of it in the resumed log
    again = by_id[done_run.info.run_id]
    assert again.info.end_time == done_run.info.end_time
    assert again.data.tags["vtrans.status.prune"] == "ran" and again.data.metrics == done_run.data.metrics
    assert _record(done_prune) == done_record
    assert json.loads((d / "runs" / "stages" / "evaluate" / done_run.data.tags["vtrans.key.evaluate"]
                       / "stage.json").read_text()) == done_eval
    assert done_prune.name not in text and done_run.data.tags["vtrans.key.evaluate"] not in text

    # the interrupted trial's prune job resumed from its checkpoint: its log says so, the curve up to the checkpoint
    # step was not computed twice, the job's history is complete
    resumed = by_id[killed_run.info.run_id]
    assert resumed.data.tags["vtrans.status.prune"] == "ran"
    assert f"prune (resumed at step {ckpt + 1})" in text
    assert f"[prune] running into {interrupted.resolve()}" in text
    record = _record(interrupted)
    assert record is not None and record["started_at"] > t_kill and record["run_id"] == killed_run.info.run_id
    loss = client.get_metric_history(resumed.info.run_id, "prune.loss")
    steps = [m.step for m in loss]
    assert set(steps) == set(range(PRUNE_STEPS))
    assert all(steps.count(s) == 1 for s in range(ckpt + 1)), "steps before the checkpoint were trained again"
    # and the steps after it, streamed before the kill and computed again after it, are logged once
    assert sorted(steps) == list(range(PRUNE_STEPS)), steps
    history = json.loads((interrupted / "train" / "output" / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(PRUNE_STEPS))
    ratio = resumed.data.metrics["params_blocks_ratio"]
    budget = float(resumed.data.params["prune.budget.params"])
    assert budget - TOLERANCE <= ratio <= budget

    # the front and the registry are computed over every trial
    rows = [{"run_id": t.info.run_id, **t.data.metrics} for t in trials]
    expected = _check_front(client, d, parent, rows)
    versions = client.search_model_versions("name = 'tiny-a-seq-cls-vtrans'")
    assert len(versions) == len(expected)
    assert {v.tags["source_run"] for v in versions} == {rows[i]["run_id"] for i in expected}


# ---------------------------------------------------------------------------------------------------------------------
# search: optuna
# ---------------------------------------------------------------------------------------------------------------------


def test_optuna_search_samples_inside_the_space_and_logs_the_recomputed_front(tmp_path: Path) -> None:
    d = _sweep_dir(tmp_path, OPTUNA)
    text = _finish(d, _start(d, log="optuna.log"), "optuna.log")
    assert f"sweep optuna-sweep: {SAMPLES} trials finished, 0 failed" in text
    client = _client(d)
    (parent,) = _runs(client, "sweep-optuna", f"tags.`{KEY_TAG}` != ''")
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.search"] == "optuna"
    trials = _trials(client, "sweep-optuna", parent.info.run_id)
    assert len(trials) == SAMPLES and all(t.info.status == "FINISHED" for t in trials)
    budgets = [float(t.data.params["prune.budget.params"]) for t in trials]
    assert all(LOW <= b <= HIGH for b in budgets) and len(set(budgets)) == SAMPLES, budgets  # sampled, not the bounds
    for t, budget in zip(trials, budgets):
        ratio = t.data.metrics["params_blocks_ratio"]
        assert budget - TOLERANCE <= ratio <= budget, (budget, ratio)
        assert t.data.metrics["prune.params_blocks_ratio"] == pytest.approx(ratio, rel=1e-12)  # prune = evaluate
    # the Optuna study behind the search: multi-objective over sweep.objectives, told every trial's two values
    import optuna

    (state,) = (d / "runs" / "sweeps").glob("optuna-sweep-tiny-a-*/searcher-state-*.pkl")
    searcher = pickle.loads(state.read_bytes())  # what OptunaSearch.save_to_dir wrote for this experiment
    study = searcher["_ot_study"]
    assert searcher["_metric"] == ["accuracy", "params_blocks"] and searcher["_mode"] == ["max", "min"]
    assert searcher["_seed"] == 7
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    told = sorted((t.params["prune.budget.params"], *t.values) for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE)
    assert len(study.trials) == SAMPLES
    assert told == sorted((b, t.data.metrics["accuracy"], t.data.metrics["params_blocks"])
                          for t, b in zip(trials, budgets))

    rows = [{"run_id": t.info.run_id, "prune.budget.params": b, **t.data.metrics} for t, b in zip(trials, budgets)]
    _check_front(client, d, parent.info.run_id, rows)

"""The quiet console of ``vtrans run`` / ``sweep``: Ray's, transformers' and MLflow's lines (as a real run prints
them) leave the console but stay in the log file; vtrans's progress, results and errors stay on the console."""

from __future__ import annotations

import io
import itertools
import sys

from pipelines.console import ConsoleFilter, ConsoleLog, QuietConsole, is_chatter

C, R = "\x1b[36m", "\x1b[0m"
CHATTER = [
    "2026/12/02 14:16:36 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    "2026-12-02 14:16:43,201\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
    "2026-12-02 14:16:50,953\tINFO worker.py:2029 -- Started a local Ray instance. View the dashboard at http://x",
    f"{C}(TrainController pid=15195){R} Requesting resources: {{'CPU': 1.0}} * 2",
    f"{C}(TrainController pid=15195){R} [2026-12-02 14:17:26,595 E 15195 15223] core_worker.cc:2465: Actor with class "
    "name: 'PreemptionWatcher' and ID: '2fa1' has constructor arguments in the object store and max_restarts > 0",
    f"{C}(TrainController pid=15195){R} - (ip=192.0.2.2, pid=15321) world_rank=0, local_rank=0, node_rank=0",
    f"{C}(RayTrainWorker pid=15321){R} Setting up process group for: env:// [rank=0, world_size=2]",
    f"{C}(RayTrainWorker pid=15321){R} Moving model to device: cpu",
    f"{C}(RayTrainWorker pid=15321){R} Wrapping provided model in DistributedDataParallel.",
    f"{C}(RayTrainWorker pid=1){R} \x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m from: /tmp/x",
    f"{C}(vtrans-evaluate pid=1){R} /venv/mlflow/pyfunc/__init__.py:3344: UserWarning: \x1b[1;33mAn input example "
    "was not provided when logging the model.\x1b[0m",
    f"{C}(vtrans-evaluate pid=1){R}   color_warning(",
]
KEPT = [
    "[pipeline] before: MLflow run e6e7 in sqlite:////tmp/mlflow.db (experiment 'pipeline-test')",
    f"{C}(vtrans-calibrate pid=15137){R} [calibrate] train 240, test 60, calibration 60",
    f"{C}(RayTrainWorker pid=15321){R} teacher: 1/4 step (25%) 0.5s elapsed, eta 1.5s, 2.00 step/s, loss=0.6837",
    f"{C}(measure pid=16211){R} [evaluate] compressed batch 1 seq 32: 1.69 ms, 591.7 seq/s",
    f"{C}(TrainController pid=15195){R} TrainingFailedError: worker 1 failed",
    "2026-12-02 14:16:50,953\tERROR worker.py:2029 -- a real Ray error",
    "calibrate     ran  14073ac4ea641472    0s   train 240, test 60, calibration 60",
    "  indented line of a report table",
    "vtrans: error: prune.steps must be an int, got 'many'",
]


def test_chatter_is_recognised_line_by_line() -> None:
    after = False
    for line in CHATTER:
        assert is_chatter(line, after), line
        after = "Warning: " in line
    for line in KEPT:
        assert not is_chatter(line), line


def test_filter_keeps_the_console_quiet_and_the_log_complete(tmp_path) -> None:
    console, log = io.StringIO(), ConsoleLog()
    stream = ConsoleFilter(console, log)
    lines = [x for pair in itertools.zip_longest(CHATTER, KEPT) for x in pair if x is not None]
    text = "\n".join(lines) + "\n"
    for i in range(0, len(text), 7):  # written in pieces, as print() and Ray's log forwarding do
        stream.write(text[i:i + 7])
    log.open(tmp_path / "run" / "vtrans.log", tmp_path / "runs")  # lines before the file is known are kept
    stream.write("x\n")
    assert not (tmp_path / "run").exists()  # not before the run's output root exists (its checks passed)
    (tmp_path / "runs").mkdir()
    stream.write("last line without newline")
    stream.flush()
    assert console.getvalue().splitlines() == [*KEPT, "x", "last line without newline"]
    assert (tmp_path / "run" / "vtrans.log").read_text().splitlines() == [*text.splitlines(), "x",
                                                                          "last line without newline"]


def test_quiet_console_restores_the_streams_and_verbose_shows_everything(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    with QuietConsole(verbose=True) as console:
        console.log_to(tmp_path / "verbose.log", tmp_path)
        print(CHATTER[3])
    assert sys.stdout is out and CHATTER[3] in out.getvalue()
    assert CHATTER[3] in (tmp_path / "verbose.log").read_text()
    assert "TRANSFORMERS_VERBOSITY" not in __import__("os").environ  # verbose: the libraries' own levels
    with QuietConsole(verbose=False):
        print(CHATTER[3])
        assert __import__("os").environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert "TRANSFORMERS_VERBOSITY" not in __import__("os").environ
    assert out.getvalue().count(CHATTER[3]) == 1

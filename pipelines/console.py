"""A quiet console for ``vtrans run`` / ``vtrans sweep``: progress lines, stage results and errors.

Ray (its driver, Train controller and core worker), transformers and MLflow write bookkeeping between vtrans's own
lines: resource requests, process groups, C++ ``core_worker.cc`` lines, database migrations, load reports. By default
the console shows none of it; ``--verbose`` (or ``VTRANS_LOG=debug``) shows everything. Nothing is lost: every line
the driver prints, chatter included, goes to ``<output>/<name>/vtrans.log``, and Ray keeps each worker's full output
under its session folder (``/tmp/ray/session_latest/logs``).

Two levers, both set up before Ray, transformers or MLflow are imported:

* :func:`quiet_env` - environment variables that lower transformers' and MLflow's log levels in this process and in
  every Ray worker (:func:`pipelines.ray_runtime.worker_env` passes them on through the job's runtime_env);
* :class:`ConsoleFilter` - ``sys.stdout`` / ``sys.stderr`` wrapped, so the lines Ray forwards from its workers
  (``(TrainController pid=...) ...``) are sorted into console and log file by :func:`is_chatter`.
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from typing import TextIO

#: Environment of a quiet run, in the driver and (through the runtime_env) in every worker; a value the user set wins.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "MLFLOW_LOGGING_LEVEL": "WARNING"}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: ``(ActorOrTaskName pid=123)`` / ``(pid=123, ip=...)``: the prefix Ray puts on a line forwarded from a worker.
_WORKER = re.compile(r"^\((?P<name>[^()]*?)\s*pid=[^)]*\)\s?")
_CHATTER = [re.compile(p) for p in (
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] \S+\.(cc|h):\d+:",  # Ray's C++ log (F, fatal, is shown)
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING) \S+\.py:\d+ -- ",  # Ray's Python log format
    r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING) (mlflow|alembic)",  # MLflow's log format
    r"^(INFO|WARNING) +\[alembic",
    r"^\S+:\d+: \w*Warning: ",  # warnings.warn from a library (the next, indented line is its source)
    r"^Setting up process group for: ",  # Ray Train worker bookkeeping
    r"^Moving model to device: ",
    r"^Wrapping provided model in DistributedDataParallel",
    r"LOAD REPORT",
)]
#: Ray Train's controller only reports scheduling (requests, worker groups); a failure reaches the driver as an error.
_CHATTY_ACTORS = ("TrainController",)
_KEEP = re.compile(r"Error|Traceback|error:|failed|FAILED")


def verbose_requested(flag: bool = False) -> bool:
    """``--verbose`` given, or ``VTRANS_LOG=debug``."""
    return flag or os.environ.get("VTRANS_LOG", "").strip().lower() == "debug"


def quiet_env() -> dict[str, str]:
    """:data:`QUIET_ENV`, less what the environment sets already."""
    return {k: v for k, v in QUIET_ENV.items() if k not in os.environ}


def is_chatter(line: str, after_warning: bool = False) -> bool:
    """Whether a printed line is Ray's, transformers' or MLflow's bookkeeping rather than vtrans's progress, a
    stage's result or an error. ``after_warning``: the line before was a library warning (its source line follows)."""
    text = _ANSI.sub("", line).rstrip("\n")
    worker = _WORKER.match(text)
    message = text[worker.end():] if worker else text
    if after_warning and message.startswith("  "):
        return True
    if worker and worker.group("name").split(" ")[0] in _CHATTY_ACTORS and not _KEEP.search(message):
        return True
    return any(p.search(message) for p in _CHATTER)


class ConsoleFilter(io.TextIOBase):
    """A text stream in front of ``stream``: every complete line goes to the log file (once one is set; lines before
    that are kept and written then), and to ``stream`` unless it is chatter (:func:`is_chatter`)."""

    def __init__(self, stream: TextIO, log: ConsoleLog) -> None:
        self.stream, self.log = stream, log
        self._partial = ""
        self._after_warning = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line + "\n")
        if self._partial and "\r" in self._partial:  # a carriage-return progress bar: nothing to sort, pass it on
            self.stream.write(self._partial)
            self._partial = ""
        return len(text)

    def _line(self, line: str) -> None:
        self.log.write(line)
        chatter = is_chatter(line, self._after_warning)
        self._after_warning = chatter and re.search(r"\w*Warning: ", _ANSI.sub("", line)) is not None
        if not chatter:
            self.stream.write(line)

    def flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:  # faulthandler, subprocesses: the real stream
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


class ConsoleLog:
    """The driver's full log: lines are held until :meth:`open` names the file and the run's output root exists (a
    run that fails its checks writes nothing), then appended to it."""

    def __init__(self) -> None:
        self._held: list[str] = []
        self._file: TextIO | None = None
        self.path: Path | None = None
        self._root: Path | None = None

    def open(self, path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
        """Log to ``path`` from when ``root`` (default: its parent) exists."""
        if self.path is None:
            self.path, self._root = Path(path), Path(root) if root is not None else Path(path).parent
            self._start()

    def _start(self) -> bool:
        if self._file is None and self.path is not None and self._root is not None and self._root.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._file.writelines(self._held)
            self._held.clear()
        return self._file is not None

    def write(self, line: str) -> None:
        if self._file is None and not self._start():
            self._held.append(line)
        else:
            self._file.write(line)

    def flush(self) -> None:
        if self._file is not None or self._start():
            self._file.flush()

    def close(self) -> None:
        self._start()
        if self._file is not None:
            self._file.close()
            self._file = None


class QuietConsole:
    """Installed by the CLI for ``run`` / ``sweep``: the quiet environment and the filtered ``sys.stdout`` /
    ``sys.stderr`` (only when not verbose), and the full log file either way (:meth:`log_to`)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.log = ConsoleLog()
        self._saved: tuple[TextIO, TextIO] | None = None

    def __enter__(self) -> QuietConsole:
        self._env = quiet_env() if not self.verbose else {}
        os.environ.update(self._env)
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = ConsoleFilter(sys.stdout, self.log) if not self.verbose else _Tee(sys.stdout, self.log)
        sys.stderr = ConsoleFilter(sys.stderr, self.log) if not self.verbose else _Tee(sys.stderr, self.log)
        return self

    def log_to(self, path: str | os.PathLike, root: str | os.PathLike) -> None:
        """Write the full log (from the start) to ``path`` once the run's output ``root`` exists."""
        self.log.open(path, root)

    def __exit__(self, *exc) -> None:
        assert self._saved is not None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = self._saved
        self.log.close()
        for key in self._env:  # a CLI process ends here; a caller of main() gets its environment back
            os.environ.pop(key, None)


class _Tee(ConsoleFilter):
    """Verbose: every line to the console and the log file."""

    def _line(self, line: str) -> None:
        self.log.write(line)
        self.stream.write(line)

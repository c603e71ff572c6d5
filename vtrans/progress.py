"""Progress reporting for long loops that stays readable in log files.

```python
with Progress(total=100, desc="prune", unit="step") as p:
    for step in range(100):
        ...
        p.update(1, loss=loss)
for batch in progress(loader, desc="calibrate", unit="batch"):
    ...
```

On an interactive terminal this is a ``tqdm`` bar. Anywhere else (a log file, Ray worker output, CI) it prints whole
lines and never a carriage return::

    prune: 0/100 step (0%) 0.0s elapsed
    prune: 10/100 step (10%) 3.1s elapsed, eta 27.9s, 3.23 step/s, loss=0.4127
    ...
    prune: 100/100 step (100%) done in 30.5s, 3.28 step/s, loss=0.2011

Line rule (lines mode): one line when the loop starts; then a line at the first update that reaches a new tenth of
the total (10%, 20%, ... 90%; at most 9 such lines); also a line at any update at least ``interval`` seconds after
the previous line; and one final line when closed (``done in`` when the total was reached or is unknown,
``stopped after`` when closed early). A loop therefore prints at most ``11 + elapsed / interval`` lines, whatever its
length. With an unknown total only the start, time-based and final lines appear, without percentage or eta.

Environment:
- ``VTRANS_PROGRESS``: ``auto`` (default: tqdm on a TTY, lines otherwise), ``lines`` (always lines), ``off`` (silent).
- ``VTRANS_PROGRESS_INTERVAL``: seconds between time-based lines (default 30) when ``interval`` is not given.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

from vtrans.errors import ConfigError

T = TypeVar("T")

#: Values of ``VTRANS_PROGRESS``.
MODES: tuple[str, ...] = ("auto", "lines", "off")
DEFAULT_INTERVAL = 30.0


def _mode() -> str:
    mode = os.environ.get("VTRANS_PROGRESS", "").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"VTRANS_PROGRESS must be one of {list(MODES)}, got {os.environ['VTRANS_PROGRESS']!r}")
    return mode


def _interval(interval: float | None) -> float:
    key, value = "interval", interval
    if value is None:
        raw = os.environ.get("VTRANS_PROGRESS_INTERVAL", "").strip()
        if not raw:
            return DEFAULT_INTERVAL
        key = "VTRANS_PROGRESS_INTERVAL"
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"VTRANS_PROGRESS_INTERVAL must be a number of seconds > 0, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _isatty(file: IO[str]) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def format_value(value: Any) -> str:
    """A postfix value as text: floats with 4 significant digits, tensor/numpy scalars unwrapped, others ``str``."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # not a single-element tensor/array: show it as it is
            pass
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_seconds(seconds: float) -> str:
    """``12.3s`` under a minute, ``5m07s`` under an hour, ``2h05m07s`` beyond."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_rate(rate: float) -> str:
    """About 3 significant digits without exponents: ``3.25``, ``12.3``, ``456``, ``12345``."""
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.2f}"


class Progress:
    """Progress of a loop of ``total`` units (None: unknown), reported as a tqdm bar on a TTY, else as log lines.

    ``update(n, **postfix)`` advances by ``n`` units and merges ``postfix`` (e.g. ``loss=0.41``) into the values shown.
    ``file`` defaults to ``sys.stderr`` at construction; ``clock`` (default ``time.monotonic``) lets tests drive time.
    The start line is printed at construction; the final line by :meth:`close` (or leaving the ``with`` block).
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *, file: IO[str] | None = None,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ConfigError(f"total must be an int >= 0 or None, got {total!r}")
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.file: IO[str] = sys.stderr if file is None else file
        self.interval = _interval(interval)
        self._clock = clock
        self._closed = False
        self._bar: Any = None
        mode = _mode()
        self.mode = "off" if mode == "off" else ("tqdm" if mode == "auto" and _isatty(self.file) else "lines")
        self._start = clock()
        self._last_time = self._start
        self._last_tenth = 0
        if self.mode == "tqdm":
            from tqdm import tqdm  # a transformers dependency; imported only when a bar is shown

            self._bar = tqdm(total=total, desc=desc or None, unit=unit, file=self.file)
        elif self.mode == "lines":
            self._emit(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 0

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` units; ``postfix`` values are shown after the counts until replaced."""
        self.n += n
        self.postfix.update(postfix)
        if self.mode == "tqdm":
            if postfix:
                self._bar.set_postfix({k: format_value(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines" and not self._closed:
            now = self._clock()
            tenth = self._tenth(self.n)
            new_tenth = self.total is not None and self.n < self.total and tenth > self._last_tenth
            if new_tenth or now - self._last_time >= self.interval:
                self._emit(self.line(now))
                self._last_time = now
                self._last_tenth = max(self._last_tenth, tenth)

    def close(self) -> None:
        """Print the final line (total elapsed time) or close the bar; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "tqdm":
            self._bar.close()
        elif self.mode == "lines":
            self._emit(self.line(final=True))

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The text of one progress line at time ``now`` (default: the clock's current time)."""
        elapsed = max(0.0, (self._clock() if now is None else now) - self._start)
        head = f"{self.desc}: " if self.desc else ""
        if self.total is None:
            parts = [f"{head}{self.n} {self.unit}"]
        else:
            pct = 100 * self.n // self.total if self.total else 100
            parts = [f"{head}{self.n}/{self.total} {self.unit} ({pct}%)"]
        rate = self.n / elapsed if elapsed > 0 else None
        if final:
            finished = self.total is None or self.n >= self.total
            parts[0] += f" {'done in' if finished else 'stopped after'} {format_seconds(elapsed)}"
        else:
            parts[0] += f" {format_seconds(elapsed)} elapsed"
            if self.total is not None and rate:
                parts.append(f"eta {format_seconds(max(0, self.total - self.n) / rate)}")
        if rate is not None and self.n > 0:
            parts.append(f"{format_rate(rate)} {self.unit}/s")
        parts.extend(f"{k}={format_value(v)}" for k, v in self.postfix.items())
        return ", ".join(parts)

    def _emit(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", *,
             file: IO[str] | None = None, interval: float | None = None,
             clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """Yield the items of ``iterable`` while reporting progress (``total`` defaults to ``len(iterable)`` if any)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total=total, desc=desc, unit=unit, file=file, interval=interval, clock=clock) as p:
        for item in iterable:
            yield item
            p.update(1)

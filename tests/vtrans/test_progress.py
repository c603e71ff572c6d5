"""Progress reporting: exact log lines under a driven clock, the line budget, tqdm on TTYs only, env switches."""

from __future__ import annotations

import io

import pytest

from vtrans.errors import ConfigError
from vtrans.progress import Progress, format_seconds, format_value, progress


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VTRANS_PROGRESS", raising=False)
    monkeypatch.delenv("VTRANS_PROGRESS_INTERVAL", raising=False)


def test_lines_exact_text() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress(total=100, desc="prune", unit="step", file=out, clock=clock) as p:
        for i in range(1, 101):
            clock.t = i * 0.25
            p.update(1, loss=1 / i)
    lines = out.getvalue().splitlines()
    assert lines[0] == "prune: 0/100 step (0%) 0.0s elapsed"
    assert lines[1] == "prune: 10/100 step (10%) 2.5s elapsed, eta 22.5s, 4.00 step/s, loss=0.1"
    assert lines[3] == "prune: 30/100 step (30%) 7.5s elapsed, eta 17.5s, 4.00 step/s, loss=0.03333"
    assert lines[9] == "prune: 90/100 step (90%) 22.5s elapsed, eta 2.5s, 4.00 step/s, loss=0.01111"
    assert lines[-1] == "prune: 100/100 step (100%) done in 25.0s, 4.00 step/s, loss=0.01"
    assert len(lines) == 11  # start + 9 tenths + final; 25 s stays under the 30 s interval
    assert "\r" not in out.getvalue()


def test_line_count_bounded_for_long_loops() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress(total=10_000, desc="x", file=out, clock=clock) as p:
        for _ in range(10_000):
            clock.t += 0.001  # 10 s in all: no time-based lines
            p.update(1, loss=0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11
    assert [line.split()[1] for line in lines[1:10]] == [f"{k * 1000}/10000" for k in range(1, 10)]
    assert lines[-1] == "x: 10000/10000 it (100%) done in 10.0s, 1000 it/s, loss=0.5"


def test_time_based_lines_add_to_the_tenths() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress(total=10_000, file=out, clock=clock, interval=10) as p:
        for i in range(1, 10_001):
            clock.t = i / 32  # 312.5 s in all, exact in binary: a time-based line every 320 updates
            p.update(1)
    lines = out.getvalue().splitlines()
    assert 11 < len(lines) <= 11 + 312.5 / 10
    assert lines[1] == "320/10000 it (3%) 10.0s elapsed, eta 5m02s, 32.0 it/s"
    assert lines[3] == "960/10000 it (9%) 30.0s elapsed, eta 4m42s, 32.0 it/s"
    assert lines[4] == "1000/10000 it (10%) 31.2s elapsed, eta 4m41s, 32.0 it/s"  # the tenth, 40 updates later
    assert lines[-1] == "10000/10000 it (100%) done in 5m12s, 32.0 it/s"


def test_interval_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTRANS_PROGRESS_INTERVAL", "5")
    out, clock = io.StringIO(), Clock()
    with Progress(desc="scan", file=out, clock=clock) as p:
        assert p.interval == 5.0
        for _ in range(20):
            clock.t += 1.0
            p.update(2)
    assert out.getvalue().splitlines() == [
        "scan: 0 it 0.0s elapsed",
        "scan: 10 it 5.0s elapsed, 2.00 it/s",
        "scan: 20 it 10.0s elapsed, 2.00 it/s",
        "scan: 30 it 15.0s elapsed, 2.00 it/s",
        "scan: 40 it 20.0s elapsed, 2.00 it/s",
        "scan: 40 it done in 20.0s, 2.00 it/s",
    ]


def test_bad_env_values_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTRANS_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ConfigError, match="VTRANS_PROGRESS_INTERVAL.*'soon'"):
        Progress(total=3, file=io.StringIO())
    monkeypatch.delenv("VTRANS_PROGRESS_INTERVAL")
    monkeypatch.setenv("VTRANS_PROGRESS", "bars")
    with pytest.raises(ConfigError, match=r"VTRANS_PROGRESS must be one of \['auto', 'lines', 'off'\], got 'bars'"):
        Progress(total=3, file=io.StringIO())
    with pytest.raises(ConfigError, match="interval.*-1"):
        Progress(total=3, file=io.StringIO(), interval=-1)
    with pytest.raises(ConfigError, match="total.*-5"):
        Progress(total=-5, file=io.StringIO())


def test_closed_early_says_stopped() -> None:
    out, clock = io.StringIO(), Clock()
    with pytest.raises(KeyError), Progress(total=8, desc="d", unit="batch", file=out, clock=clock) as p:
        clock.t = 2.0
        p.update(4)
        raise KeyError("boom")
    assert out.getvalue().splitlines()[-1] == "d: 4/8 batch (50%) stopped after 2.0s, 2.00 batch/s"


def test_progress_generator_wraps_iterable() -> None:
    out, clock = io.StringIO(), Clock()
    seen = []
    for x in progress(range(5), desc="gen", file=out, clock=clock):
        clock.t += 1.0
        seen.append(x)
    assert seen == [0, 1, 2, 3, 4]
    lines = out.getvalue().splitlines()
    assert lines[0] == "gen: 0/5 it (0%) 0.0s elapsed"
    assert lines[-1] == "gen: 5/5 it (100%) done in 5.0s, 1.00 it/s"
    assert len(lines) == 2 + 4  # 20%, 40%, 60%, 80% each cross a new tenth


def test_off_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTRANS_PROGRESS", "off")
    out = FakeTTY()
    with Progress(total=10, file=out) as p:
        p.update(10, loss=1.0)
    assert list(progress([1, 2], file=out)) == [1, 2]
    assert out.getvalue() == ""


def test_stringio_never_uses_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("tqdm must not be used on a non-TTY stream")

    monkeypatch.setattr(tqdm, "tqdm", boom)
    out = io.StringIO()
    with Progress(total=2, file=out) as p:
        p.update(2)
        assert p.mode == "lines"


def test_tty_uses_tqdm_unless_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    out = FakeTTY()
    with Progress(total=4, desc="bar", file=out) as p:
        assert p.mode == "tqdm"
        p.update(4, loss=0.123456)
    assert "loss=0.1235" in out.getvalue()
    assert "4/4" in out.getvalue()
    monkeypatch.setenv("VTRANS_PROGRESS", "lines")
    out = FakeTTY()
    with Progress(total=4, file=out) as p:
        assert p.mode == "lines"
    assert "\r" not in out.getvalue()


def test_flushes_each_line() -> None:
    class Counting(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    out = Counting()
    with Progress(total=2, file=out, clock=Clock()) as p:
        assert out.flushes == 1
        p.update(1)
        assert out.flushes == 2
    assert out.flushes == 3


def test_format_helpers() -> None:
    import torch

    assert format_value(0.123456) == "0.1235"
    assert format_value(12345.678) == "1.235e+04"
    assert format_value(torch.tensor(2.5)) == "2.5"
    assert format_value(3) == "3"
    assert format_value("adam") == "adam"
    assert format_seconds(12.34) == "12.3s"
    assert format_seconds(307) == "5m07s"
    assert format_seconds(7507) == "2h05m07s"

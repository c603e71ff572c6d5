"""The shared value checks: what passes (and is returned), and the exact one-line message of each failure."""

from __future__ import annotations

import math
import re

import pytest

from vtrans.checks import check_choice, check_int, check_int_list, check_number, check_text
from vtrans.errors import ConfigError


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_passing_values_are_returned() -> None:
    assert check_int("k", 3, 1, 3) == 3
    assert check_number("k", 1, 0.0, 1.0, low_open=True) == 1.0 and type(check_number("k", 1)) is float
    assert check_text("k", "a") == "a"
    assert check_choice("k", "b", ("a", "b")) == "b"
    assert check_int_list("k", [1, 2], 1) == [1, 2]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: check_int("a.n", "3"), "a.n must be an int, got '3'"),
    (lambda: check_int("a.n", True, 0), "a.n must be an int, got True"),
    (lambda: check_int("a.n", 0, 1), "a.n must be an int >= 1, got 0"),
    (lambda: check_int("a.n", 4097, 1, 4096), "a.n must be at most 4,096, got 4097"),
    (lambda: check_int("a.n", 2.5, 1, what="an int >= 1"), "a.n must be an int >= 1, got 2.5"),
    (lambda: check_int("a.n", 0, 1, what="an integer > 0"), "a.n must be an integer > 0, got 0"),
    (lambda: check_int("a.n", 10**7, 0, 10**6, what="an integer >= 0"), "a.n must be at most 1,000,000, got 10000000"),
    (lambda: check_number("a.x", "1"), "a.x must be a finite number, got '1'"),
    (lambda: check_number("a.x", math.nan, 0.0, 1.0), "a.x must be a finite number, got nan"),
    (lambda: check_number("a.x", False), "a.x must be a finite number, got False"),
    (lambda: check_number("a.x", 0.0, 0.0, 1.0, low_open=True), "a.x must be in (0, 1], got 0.0"),
    (lambda: check_number("a.x", 1.0, 0.0, 1.0, high_open=True), "a.x must be in [0, 1), got 1.0"),
    (lambda: check_number("a.x", 0, 0.0, math.inf, low_open=True, high_open=True), "a.x must be in (0, inf), got 0"),
    (lambda: check_number("a.x", -0.5, 0), "a.x must be >= 0, got -0.5"),
    (lambda: check_number("a.x", 0, 0, low_open=True), "a.x must be > 0, got 0"),
    (lambda: check_number("a.x", 2, high=1), "a.x must be <= 1, got 2"),
    (lambda: check_number("a.x", math.inf, 0, low_open=True, what="a number > 0"), "a.x must be a number > 0, got inf"),
    (lambda: check_number("a.x", -1.0, 0, low_open=True, what="a number > 0"), "a.x must be a number > 0, got -1.0"),
    (lambda: check_text("a.s", "  "), "a.s must be a non-empty string, got '  '"),
    (lambda: check_text("a.s", None), "a.s must be a non-empty string, got None"),
    (lambda: check_choice("a.c", "pyarow", ["auto", "pyarrow"]),
     "a.c must be one of ['auto', 'pyarrow'], got 'pyarow'; did you mean 'pyarrow'?"),
    (lambda: check_choice("a.c", "x", ["auto", "pyarrow"]), "a.c must be one of ['auto', 'pyarrow'], got 'x'"),
    (lambda: check_int_list("a.l", [], 1), "a.l must be a non-empty list of ints, got []"),
    (lambda: check_int_list("a.l", [1, 0], 1), "a.l[1] must be an int >= 1, got 0"),
    (lambda: check_int_list("a.l", [1, 1], 1), "a.l lists a value twice: [1, 1]"),
])
def test_messages(call, message: str) -> None:
    assert _message(call) == message


def test_a_long_value_is_cut_in_the_message() -> None:
    msg = _message(check_int, "a.n", "x" * 1000)
    assert len(msg) < 300 and re.search(r"… \(1,002 characters\)$", msg)

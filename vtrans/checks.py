"""Value checks shared by every config and entry point of vtrans and its pipelines: one place for the wording.

Each check raises a one-line :class:`~vtrans.errors.ConfigError` that names the key and the value
(``prune.steps must be an int >= 1, got 0``) and returns the value when it passes::

    check_int("evaluate.batch_size", 32, 1, 4096)                    # 32
    check_number("data.test_fraction", 0.1, 0.0, 1.0, low_open=True)  # 0.1
    check_choice("data.reader", "pyarow", ("auto", "pyarrow", "ray"))
    # ConfigError: data.reader must be one of ['auto', 'pyarrow', 'ray'], got 'pyarow'; did you mean 'pyarrow'?

``what`` replaces the standard phrase of a message where a caller words it its own way (``an integer > 0``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

from vtrans.errors import ConfigError, quote

__all__ = ["check_choice", "check_int", "check_int_list", "check_number", "check_positive", "check_text"]


def check_int(key: str, value: object, minimum: int | None = None, maximum: int | None = None, *,
              what: str | None = None) -> int:
    """``value`` is an int (not a bool) in ``[minimum, maximum]``.

    Messages: ``{key} must be an int`` (wrong type), ``... an int >= {minimum}`` (too small), ``{key} must be at most
    {maximum:,}`` (too large). ``what`` words the wrong-type and too-small messages alike (``an integer > 0``).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be {what or 'an int'}, got {quote(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be {what or f'an int >= {minimum}'}, got {quote(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be at most {maximum:,}, got {quote(value)}")
    return value


def check_number(key: str, value: object, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, what: str | None = None) -> float:
    """``value`` is a finite int or float (not a bool) between ``low`` and ``high`` (each closed unless ``*_open``);
    returns it as a float.

    Messages: ``{key} must be a finite number`` (wrong type, nan, inf), ``{key} must be in (low, high]`` (out of
    range; ``> low`` / ``>= low`` / ``<= high`` with one bound). ``what`` words both alike (``a number > 0``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be {what or 'a finite number'}, got {quote(value)}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if what is None:
            if low is not None and high is not None:
                what = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            elif low is not None:
                what = f"{'>' if low_open else '>='} {low:g}"
            else:
                what = f"{'<' if high_open else '<='} {high:g}"
        raise ConfigError(f"{key} must be {what}, got {quote(value)}")
    return float(value)


def check_positive(key: str, value: object, *, integer: bool = False, zero_ok: bool = False,
                   maximum: int | None = None) -> int | float:
    """``value`` is a number (``integer``: an int) ``> 0`` (``zero_ok``: ``>= 0``), at most ``maximum``; the
    training configs' wording: ``prune.steps must be an integer > 0, got 0``."""
    what = f"{'an integer' if integer else 'a number'} {'>= 0' if zero_ok else '> 0'}"
    if integer:
        return check_int(key, value, 0 if zero_ok else 1, maximum, what=what)
    return check_number(key, value, 0, maximum, low_open=not zero_ok, what=what)


def check_text(key: str, value: object) -> str:
    """``value`` is a string with something other than whitespace."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string, got {quote(value)}")
    return value


def check_choice(key: str, value: object, choices: Iterable[str]) -> str:
    """``value`` is one of ``choices``; the message lists them and suggests the closest one."""
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} must be one of {choices}, got {quote(value)}{hint}")
    return value  # type: ignore[return-value]


def check_int_list(key: str, values: object, minimum: int, maximum: int | None = None) -> list[int]:
    """``values`` is a non-empty list of distinct ints, each checked by :func:`check_int` as ``key[i]``."""
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{key} must be a non-empty list of ints, got {quote(values)}")
    for i, v in enumerate(values):
        check_int(f"{key}[{i}]", v, minimum, maximum)
    if len(set(values)) != len(values):
        raise ConfigError(f"{key} lists a value twice: {values!r}")
    return values

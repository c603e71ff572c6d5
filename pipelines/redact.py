"""Credentials out of everything vtrans shows or writes: one pure function used at every output boundary.

A tracking URI ``postgresql://user:PASSWORD@host/db`` or ``http://user:token@host``, a data URI
``s3://KEY:SECRET@bucket/x.csv`` or a Ray address with a password connect with the real value, but every copy that
leaves the process (MLflow params and tags, ``summary.json``, ``config.yaml``, stage records, printed lines, error
messages) goes through :func:`redact` first::

    redact("postgresql://vt:hunter2@db:5432/mlflow")   # 'postgresql://vt:***@db:5432/mlflow'
    redact("https://ghp_abc@host/x")                   # 'https://***@host/x'  (a lone user is often a token)
    redact("s3://b/x.csv?X-Amz-Signature=abc&v=1")     # 's3://b/x.csv?X-Amz-Signature=***&v=1'

The preferred way to give an MLflow server credentials is outside the URI: ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``), which MLflow's client reads and nothing records.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://userinfo@ - the userinfo runs to the last "@" before the host's "/", "?", "#", a blank or a quote, so a
# password holding a raw "@" is masked whole
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/?#\s'\"<>]*)@")
# a password holding a raw "/" (AWS secret keys do; a valid URI would have %2F): user:pass/word@ - may over-mask a
# "host:port/path@x", never under-mask
_SLASHED = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/?#\s'\"<>:@]+):[^\s'\"<>@]*/[^\s'\"<>@]*@")
# query parameters that carry credentials (libpq's password=, presigned S3 / Azure SAS / GCS signatures, tokens)
_SECRET_PARAMS = re.compile(
    r"(?i)(?P<key>[?&;](?:password|passwd|pwd|secret|client_secret|token|access_token|auth|api[_-]?key|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential)=)"
    r"(?P<value>[^&;#\s'\"<>]*)")


def _mask_userinfo(m: re.Match) -> str:
    info = m.group("info")
    if not info:
        return m.group(0)
    user, sep, _ = info.partition(":")
    return f"{m.group('scheme')}{user}:{MASK}@" if sep else f"{m.group('scheme')}{MASK}@"


def redact(text: str) -> str:
    """``text`` with the password (or lone user) of every ``scheme://user:password@host`` it contains, and the
    value of every credential query parameter, replaced by ``***``; everything else unchanged."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    text = _SLASHED.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", text)
    return _SECRET_PARAMS.sub(lambda m: m.group("key") + (MASK if m.group("value") else ""), text)


def redact_data(value: Any) -> Any:
    """:func:`redact` applied to every string in nested dicts, lists and tuples (keys included)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(v) for v in value)
    return value


def is_redacted(text: str) -> bool:
    """Whether ``text`` carries a masked credential (a URI read back from a record, unusable for connecting)."""
    return f":{MASK}@" in text or f"://{MASK}@" in text or f"={MASK}" in text


def without_userinfo(uri: str) -> str:
    """``uri`` with its ``user:password@`` removed (for a request that must not carry it in the URL)."""
    return _USERINFO.sub(lambda m: m.group("scheme"), uri, count=1)


__all__ = ["MASK", "is_redacted", "redact", "redact_data", "without_userinfo"]

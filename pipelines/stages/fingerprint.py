"""Identities of the things a stage reads from outside the config: model directories and data files.

A cache key must change when the model or the data behind an unchanged name changes. Small files (configs,
tokenizers) are hashed by content; large ones (weights, data) by name, size and modification time, which is cheap and
changes whenever the file is rewritten.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CONTENT_LIMIT = 16 * 1024 * 1024
"""Files up to this size are hashed by content."""


def _file_id(path: Path) -> str:
    st = path.stat()
    if st.st_size <= CONTENT_LIMIT:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"{st.st_size}:{st.st_mtime_ns}"


def directory_identity(path: str | Path) -> dict[str, str]:
    """``{relative file: id}`` of every file of a directory (hidden files and folders excluded)."""
    root = Path(path)
    return {str(p.relative_to(root)): _file_id(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def model_identity(name: str) -> dict:
    """A built-in model by its wheel pin, a local directory by its files, a hub id by its name."""
    from vtrans.assets import MODELS

    if name in MODELS:
        return {"builtin": name, "pin": MODELS[name].pin}
    path = Path(name).expanduser()
    if path.is_dir():
        return {"path": str(path.resolve()), "files": directory_identity(path)}
    return {"hub": name}


def data_identity(files: list[str] | None) -> list[dict] | None:
    if files is None:
        return None
    from pipelines.config import is_uri

    # a remote file is identified by its URI only: re-reading it to hash would defeat the point of reading it remotely
    return [{"uri": f} if is_uri(f) else {"path": str(Path(f).expanduser().resolve()),
                                          "id": _file_id(Path(f).expanduser())} for f in files]

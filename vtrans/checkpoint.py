"""Loading Hugging Face checkpoints safely and writing compressed ones atomically.

User checkpoints load as safetensors only (no pickle). ``trust_remote_code`` is used only for checkpoints vtrans
wrote itself: their ``modeling_vtrans.py`` must hash to the ``modeling_sha256`` recorded in compression.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load, save
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from vtrans.errors import ConfigError, OutputError, UnknownModelError
from vtrans.modeling_vtrans import COMPRESSION_FILE, MODELING_FILE

TASKS = ("auto", "base", "seq-cls", "causal-lm")
AUTO_CLASSES = {"base": AutoModel, "seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}


def infer_task(config) -> str:
    """``seq-cls``, ``causal-lm`` or ``base`` from the checkpoint's ``architectures``."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForSequenceClassification" in archs:
        return "seq-cls"
    if "ForCausalLM" in archs or "LMHeadModel" in archs:
        return "causal-lm"
    return "base"


def is_vtrans_checkpoint(path: str | Path) -> bool:
    return (Path(path) / COMPRESSION_FILE).is_file() and (Path(path) / MODELING_FILE).is_file()


def verify_vtrans_checkpoint(path: str | Path) -> None:
    """Check that the modeling code next to a vtrans checkpoint is the code vtrans recorded when writing it."""
    path = Path(path)
    try:
        recorded = json.loads((path / COMPRESSION_FILE).read_text()).get("modeling_sha256")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path / COMPRESSION_FILE} cannot be read: {e}") from None
    actual = hashlib.sha256((path / MODELING_FILE).read_bytes()).hexdigest()
    if recorded != actual:
        raise ConfigError(
            f"{path / MODELING_FILE} has sha256 {actual[:12]}… but compression.json records {str(recorded)[:12]}…; "
            "refusing to run modified remote code"
        )


def read_config(path: str | Path):
    """The config of a local checkpoint (vtrans checkpoints verified first)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UnknownModelError(f"model directory {str(path)!r} has no config.json")
    remote = is_vtrans_checkpoint(path)
    if remote:
        verify_vtrans_checkpoint(path)
    return AutoConfig.from_pretrained(path, trust_remote_code=remote)


def load_pretrained(path: str | Path, task: str = "auto", num_labels: int | None = None,
                    **kwargs) -> PreTrainedModel:
    """Load a local Hugging Face checkpoint (safetensors only) for ``task`` (``auto`` reads ``architectures``)."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
    path = Path(path)
    config = read_config(path)
    remote = is_vtrans_checkpoint(path)
    task = infer_task(config) if task == "auto" else task
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    return AUTO_CLASSES[task].from_pretrained(path, trust_remote_code=remote, use_safetensors=True, **kwargs)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model directory, or None when there is none."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    remote = is_vtrans_checkpoint(path)
    if remote:
        verify_vtrans_checkpoint(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=remote)


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Validate an output directory before any work: its parent exists and is writable; it is new or empty."""
    out = Path(out).expanduser().absolute()
    if not out.parent.is_dir():
        raise OutputError(f"--out parent directory {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"--out parent directory {str(out.parent)!r} is not writable")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    return out


def write_atomically(out: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` into a temporary directory beside ``out``, then move it into place.

    If ``write`` fails nothing is left at ``out`` (and an existing ``out`` is untouched).
    """
    out = check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"


class CheckpointError(ConfigError):
    """A training-state checkpoint is missing, truncated or corrupted."""


def save_state(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a training state as ``state.safetensors`` + ``state.json`` (with the tensors' SHA-256)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unique, aliases = _dedupe_shared(tensors)
    data = save({k: v.detach().cpu().contiguous() for k, v in unique.items()})  # serialised once: written and hashed
    (directory / STATE_TENSORS).write_bytes(data)
    meta = dict(meta, tensors_sha256=hashlib.sha256(data).hexdigest())
    if aliases:
        meta["tensor_aliases"] = aliases
    tmp = directory / (STATE_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, directory / STATE_META)  # the JSON is written last: its presence marks a complete state
    return directory


def load_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a training state, verifying the tensors against the recorded SHA-256."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / STATE_META).read_text())
        data = (directory / STATE_TENSORS).read_bytes()
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete or unreadable: {e}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.get("tensors_sha256"):
        raise CheckpointError(f"checkpoint {str(directory)!r} is corrupted: {STATE_TENSORS} has sha256 "
                              f"{actual[:12]}…, state.json records {str(meta.get('tensors_sha256'))[:12]}…")
    tensors = load(data)
    for name, source in meta.get("tensor_aliases", {}).items():
        tensors[name] = tensors[source]
    return tensors, meta


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors without repeats, {repeat name: kept name})``: tied weights (a causal LM's embedding and LM head)
    appear in a state dict under two names with one storage, which safetensors refuses to write twice."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in seen:
            aliases[name] = seen[view]
            continue
        seen.setdefault(view, name)
        unique[name] = t
    return unique, aliases

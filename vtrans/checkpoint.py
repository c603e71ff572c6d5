"""Loading Hugging Face checkpoints safely and writing compressed ones atomically.

User checkpoints load as safetensors only (no pickle), checked to be complete before anything reads them
(:func:`verify_weights`). ``trust_remote_code`` is used only for checkpoints vtrans wrote itself: their
``modeling_vtrans.py`` must hash to the ``modeling_sha256`` recorded in compression.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
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

from vtrans.errors import CheckpointError, ConfigError, OutputError, UnknownModelError
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
        raise CheckpointError(f"{path / COMPRESSION_FILE} cannot be read: {e}") from None
    actual = hashlib.sha256((path / MODELING_FILE).read_bytes()).hexdigest()
    if recorded != actual:
        raise CheckpointError(
            f"{path / MODELING_FILE} has sha256 {actual[:12]}… but compression.json records {str(recorded)[:12]}…; "
            "refusing to run modified remote code"
        )


SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: Weight files vtrans refuses to load: pickle (arbitrary code on load) and formats of other frameworks.
REFUSED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack")


def _check_safetensors_file(file: Path) -> None:
    """A safetensors file whose header parses and whose tensors all lie inside the file (a truncated download or
    copy fails here, before a loader reads garbage or crashes)."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"its header claims {n:,} bytes, the file has {size - 8:,} after the length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file ({e}); the checkpoint is "
                              f"corrupted or incomplete: copy or save it again") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{str(file)!r} is truncated or corrupted: its header needs {8 + n + end:,} bytes, "
                              f"the file has {size:,}; copy or save the checkpoint again")


def verify_weights(path: str | Path) -> None:
    """Check that a checkpoint directory holds complete safetensors weights (``model.safetensors`` or the shards of
    ``model.safetensors.index.json``), raising :class:`CheckpointError` naming the file otherwise - a pickle-only
    checkpoint (``pytorch_model.bin``) is refused, never loaded."""
    path = Path(path)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{str(index)!r} cannot be read as a safetensors index ({e})") from None
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{str(path)!r} lacks the safetensors shard(s) {missing} listed in "
                                  f"{SAFETENSORS_INDEX}; the checkpoint is incomplete")
    elif (path / SAFETENSORS).is_file():
        files = [path / SAFETENSORS]
    else:
        refused = sorted({f.name for pattern in REFUSED_WEIGHTS for f in path.glob(pattern)})
        if refused:
            raise CheckpointError(f"{str(path)!r} holds {refused} but no {SAFETENSORS}: vtrans loads safetensors "
                                  f"only, never pickle; load it where you trust it and save it with "
                                  f"save_pretrained(dir), which writes {SAFETENSORS}")
        raise CheckpointError(f"{str(path)!r} has no model weights ({SAFETENSORS} or {SAFETENSORS_INDEX})")
    for file in files:
        _check_safetensors_file(file)


def read_config(path: str | Path):
    """The config of a local checkpoint, after checking that it loads safely: a vtrans checkpoint's code hash
    (:func:`verify_vtrans_checkpoint`) and complete safetensors weights (:func:`verify_weights`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UnknownModelError(f"model directory {str(path)!r} has no config.json")
    remote = is_vtrans_checkpoint(path)
    if remote:
        verify_vtrans_checkpoint(path)
    verify_weights(path)
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


#: Files of which a model directory holding a tokenizer has at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def has_tokenizer(path: str | Path) -> bool:
    """Whether a model directory holds tokenizer files (:data:`TOKENIZER_FILES`)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model directory, or None when there is none."""
    path = Path(path)
    if not has_tokenizer(path):
        return None
    remote = is_vtrans_checkpoint(path)
    if remote:
        verify_vtrans_checkpoint(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=remote)


def protected_dir(out: str | os.PathLike, key: str, sources: Sequence[str | os.PathLike] = ()) -> Path:
    """``out`` resolved (symlinks followed), after refusing a folder whose replacement or filling would destroy or
    mix with something else: the current directory or one of its ancestors, ``$HOME``, or a source (the model being
    read) or one of its ancestors. An :class:`OutputError` naming ``key`` and the path."""
    given = str(out)
    resolved = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        what = "the current directory"
    elif cwd.is_relative_to(resolved):
        what = f"an ancestor of the current directory {str(cwd)!r}"
    elif resolved == Path.home().resolve():
        what = "$HOME"
    else:
        what = ""
        for src in sources:
            src = Path(src).expanduser().resolve()
            if src.is_relative_to(resolved):
                what = "the source model directory" if src == resolved else f"an ancestor of the source {str(src)!r}"
                break
    if what:
        where = "" if given == str(resolved) else f" ({str(resolved)!r})"
        raise OutputError(f"{key}={given!r}{where} is {what}; give a new folder for the output (e.g. {key}=runs/out)")
    return resolved


def check_output_dir(out: str | Path, overwrite: bool = False, key: str = "--out",
                     sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Validate an output directory before any work (nothing is written): not a protected folder
    (:func:`protected_dir`: the current directory, its ancestors, ``$HOME``, a source); its nearest existing ancestor
    is a writable directory (missing parents are created when it is written); it is new or empty, or ``overwrite``."""
    out = protected_dir(out, key, sources)
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{key} parent {str(existing)!r} exists and is not a directory")
    if not os.access(existing, os.W_OK):
        raise OutputError(f"{key} parent directory {str(existing)!r} is not writable")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{key} {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{key} {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    return out


def write_atomically(out: str | Path, write: Callable[[Path], None], overwrite: bool = False, key: str = "--out",
                     sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Run ``write(tmp_dir)`` into a temporary directory beside ``out`` (its missing parents created, as
    ``save_pretrained`` does), then move it into place. ``out`` is checked first (:func:`check_output_dir`).

    If ``write`` fails nothing is left at ``out`` (and an existing ``out`` is untouched)."""
    out = check_output_dir(out, overwrite, key, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
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

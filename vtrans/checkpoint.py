"""Loading Hugging Face checkpoints safely and writing compressed ones atomically.

User checkpoints load as safetensors only (no pickle), checked to be complete before anything reads them
(:func:`verify_weights`). No code stored with a checkpoint is ever run: everything loads with
``trust_remote_code=False``; a vtrans-compressed checkpoint loads with the classes of the installed vtrans, which
:func:`register_auto_classes` maps into transformers' Auto classes when vtrans is imported (so
``AutoModel.from_pretrained(dir)`` needs no flag either); the ``modeling_vtrans.py`` a checkpoint carries (for people
without vtrans) is never imported, and an ``auto_map`` naming any other code is refused (:func:`check_no_remote_code`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import warnings
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

from vtrans import modeling_vtrans
from vtrans.arch import for_model
from vtrans.budget import Geometry
from vtrans.config import Budget
from vtrans.errors import CheckpointError, ConfigError, OutputError, UnknownModelError, quote
from vtrans.modeling_vtrans import AUTO_MAP, COMPRESSION_FILE, CONFIGS, MODELING_FILE

TASKS = ("auto", "base", "seq-cls", "causal-lm")
AUTO_CLASSES = {"base": AutoModel, "seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}
_AUTO_BY_NAME = {cls.__name__: cls for cls in AUTO_CLASSES.values()}
#: model_type of a vtrans-compressed config -> its architecture (a key of ``AUTO_MAP``)
VTRANS_MODEL_TYPES = {cfg.model_type: arch for arch, cfg in CONFIGS.items()}


def register_auto_classes() -> None:
    """Map every vtrans model type to the installed vtrans classes in transformers' Auto classes (idempotent).

    transformers then resolves a compressed checkpoint's ``model_type`` (``vtrans_bert``, ...) to these classes and,
    since they are registered locally, never imports the ``modeling_vtrans.py`` stored in the checkpoint, with or
    without ``trust_remote_code`` (``resolve_trust_remote_code`` returns False for local code; with True the
    registered class still wins because it does not live in ``transformers.``)."""
    for arch, cfg_cls in CONFIGS.items():
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        for auto_name, ref in AUTO_MAP[arch].items():
            if auto_name != "AutoConfig":
                model_cls = getattr(modeling_vtrans, ref.split(".", 1)[1])
                _AUTO_BY_NAME[auto_name].register(cfg_cls, model_cls, exist_ok=True)


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


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(file)!r} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(file)!r} is not a JSON object, got {type(data).__name__}")
    return data


def check_no_remote_code(path: str | Path) -> None:
    """Refuse a checkpoint that asks for code stored with it, raising :class:`CheckpointError` naming the file, the
    key and the value: an ``auto_map`` in config.json other than vtrans's own classes for a vtrans model type
    (``modeling_vtrans.VtransXxx``, run from the installed vtrans, never from the directory), any ``auto_map`` in
    tokenizer_config.json, or a ``tokenizer_class`` the installed transformers does not have. The checkpoint's
    ``modeling_vtrans.py`` is never imported; one that is a symlink or differs from the installed file is warned
    about (anyone loading the directory with ``trust_remote_code=True`` without vtrans would run it)."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    path = Path(path)
    config_file = path / "config.json"
    if config_file.is_file():
        config = _read_json(config_file)
        auto_map = config.get("auto_map")
        model_type = config.get("model_type")
        allowed = AUTO_MAP.get(VTRANS_MODEL_TYPES.get(model_type, ""), {})
        if auto_map is not None and not isinstance(auto_map, dict):
            raise CheckpointError(f"{str(config_file)!r}: auto_map={auto_map!r} is not a mapping; vtrans never runs "
                                  f"code stored with a checkpoint: remove auto_map")
        for key, value in (auto_map or {}).items():
            if allowed.get(key) != value:
                ours = (f"model_type {model_type!r} allows only {allowed}" if allowed else
                        f"model_type {model_type!r} is not a vtrans one")
                raise CheckpointError(f"{str(config_file)!r}: auto_map.{key}={value!r} would run code stored with the "
                                      f"checkpoint, which vtrans never does ({ours}); remove the entry")
    tok_file = path / "tokenizer_config.json"
    if tok_file.is_file():
        tok = _read_json(tok_file)
        if "auto_map" in tok:
            raise CheckpointError(f"{str(tok_file)!r}: auto_map={tok['auto_map']!r} would run tokenizer code stored "
                                  f"with the checkpoint, which vtrans never does; remove auto_map")
        name = tok.get("tokenizer_class")
        if name is not None and (not isinstance(name, str) or (tokenizer_class_from_name(name) is None and
                                                              tokenizer_class_from_name(f"{name}Fast") is None)):
            raise CheckpointError(f"{str(tok_file)!r}: tokenizer_class={name!r} is not a tokenizer of the installed "
                                  f"transformers; vtrans never loads tokenizer code stored with a checkpoint")
    _warn_foreign_modeling_file(path)


def _warn_foreign_modeling_file(path: Path) -> None:
    file = path / MODELING_FILE
    if file.is_symlink():
        why = "is a symlink"
    elif file.is_file() and file.read_bytes() != Path(modeling_vtrans.__file__).read_bytes():
        why = "differs from the installed vtrans's (another vtrans version wrote it, or it was modified)"
    else:
        return
    warnings.warn(f"{str(file)!r} {why}; it is not run (vtrans loads its installed classes), but do not load this "
                  f"directory with trust_remote_code=True where vtrans is not installed", UserWarning, stacklevel=3)


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


#: Bytes per element of each safetensors dtype (the format's list).
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                      "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors file's header alone (no tensor data is read), each entry checked as
    the safetensors reader will (a known dtype, a shape whose bytes are its span): a one-line CheckpointError here
    rather than a ``SafetensorError`` traceback from the loader. The file has passed :func:`_check_safetensors_file`."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    shapes = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = v["dtype"], [int(d) for d in v["shape"]], v["data_offsets"]
            width = SAFETENSORS_DTYPES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{str(file)!r} is corrupted: tensor {quote(name)} has the header entry {quote(v)} "
                                  f"(dtype one of {sorted(SAFETENSORS_DTYPES)}, shape, data_offsets)") from None
        if any(d < 0 for d in shape) or math.prod(shape) * width != end - start:
            raise CheckpointError(f"{str(file)!r} is corrupted: tensor {quote(name)} of dtype {dtype} and shape "
                                  f"{shape} needs {math.prod(shape) * width:,} bytes, its data_offsets span "
                                  f"{end - start:,}")
        shapes[name] = shape
    return shapes


def _weight_files(path: Path) -> list[Path]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return [path / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / SAFETENSORS]


def meta_model(path: str | Path) -> PreTrainedModel:
    """The model a checkpoint's ``config.json`` describes, built on the meta device (no memory, no weights read): the
    class its ``architectures`` name, for a vtrans checkpoint vtrans's own copy of the modeling code (never the
    directory's). Its state dict has every tensor's name and shape; :func:`vtrans.count` counts it."""
    path = Path(path)
    import transformers

    raw = json.loads((path / "config.json").read_text())
    model_type = raw.get("model_type")
    vtrans_configs = {c.model_type: c for c in modeling_vtrans.CONFIGS.values()}
    if model_type in vtrans_configs:
        config = vtrans_configs[model_type].from_pretrained(path)
        arch = (raw.get("architectures") or [""])[0]
        cls = getattr(modeling_vtrans, arch, None)
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise CheckpointError(f"{str(path / 'config.json')!r} names architecture {quote(arch)}, which is no "
                                  f"vtrans model class; the checkpoint was not written by vtrans compress")
        with torch.device("meta"):
            return cls(config)
    config = transformers.CONFIG_MAPPING[model_type].from_pretrained(path)
    with torch.device("meta"):
        return AUTO_CLASSES[infer_task(config)].from_config(config)


def check_weights_match_config(path: str | Path) -> None:
    """Check that a checkpoint's safetensors weights are the tensors its ``config.json`` declares - from the files'
    headers and a model built on the meta device, so no tensor is read and nothing is allocated.

    Raises :class:`CheckpointError` naming the file and the tensor for: weights without any tensor; a tensor the
    config declares but the weights lack (a layer more in ``num_hidden_layers`` than was saved); a layer the weights
    hold beyond the config's count; a tensor whose shape differs from the config's (``hidden_size``,
    ``intermediate_size``, ``vocab_size``...). Keys are matched as transformers loads them: its renamings of legacy
    names (``LayerNorm.gamma``), the base-model prefix added or stripped, tied weights (``lm_head.weight`` of
    ``tie_word_embeddings``), the class's ``_keys_to_ignore_on_load_missing`` / ``_unexpected`` and old buffers
    (``position_ids``, ``rotary_emb.inv_freq``). Modules the weights lack altogether (a new classification head, a
    pooler) are left to transformers, which initialises them, as loading a base model for a task must. Call it after
    :func:`verify_weights`, on a directory whose architecture is supported.
    """
    import re

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    path = Path(path)
    files = _weight_files(path)
    shapes: dict[str, list[int]] = {}
    where: dict[str, Path] = {}
    for file in files:
        for name, shape in _safetensors_shapes(file).items():
            shapes[name], where[name] = shape, file
    if not shapes:
        raise CheckpointError(f"{str(files[0] if len(files) == 1 else path)!r} holds no tensors; the checkpoint is "
                              f"empty: save the model again with save_pretrained(dir)")
    try:
        model = meta_model(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build a model from
        raise CheckpointError(f"{str(path / 'config.json')!r} does not describe a model transformers can build: "
                              f"{quote(' '.join(str(e).split()))}") from None
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    transforms = get_model_conversion_mapping(model)
    if any(isinstance(t, WeightConverter) for t in transforms):
        return  # tensors merged or split on load: their shapes cannot be compared from the header
    loaded: dict[str, str] = {}  # model key -> checkpoint key
    for name in shapes:
        key, _ = rename_source_key(name, transforms, [], model.base_model_prefix, expected)
        loaded[key] = name
    ignore_missing = [re.compile(p) for p in model._keys_to_ignore_on_load_missing or ()]
    ignore_unexpected = [re.compile(p) for p in model._keys_to_ignore_on_load_unexpected or ()]
    ignore_unexpected += [re.compile(r"(^|\.)position_ids$"), re.compile(r"rotary_emb\.inv_freq")]
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    prefix = f"{model.base_model_prefix}."

    def module(key: str) -> str:  # the top module under the base model: embeddings, encoder, layers, lm_head...
        return key.removeprefix(prefix).split(".", 1)[0]

    present = {module(k) for k in loaded}
    for key, shape in expected.items():
        if key in loaded:
            have = shapes[loaded[key]]
            if have != shape:
                raise CheckpointError(f"{str(where[loaded[key]])!r} does not match its config.json: tensor "
                                      f"{quote(loaded[key])} has shape {have}, the config declares {shape}; the "
                                      f"weights belong to another model or config.json was edited")
            continue
        if (key in tied and tied[key] in expected) or any(t in loaded for t, src in tied.items() if src == key):
            continue  # one of a tied pair (input embeddings and LM head): transformers fills it from the other
        if any(p.search(key) for p in ignore_missing) or module(key) not in present:
            continue  # a module the checkpoint does not have at all: a new head, initialised by transformers
        missing = [k for k in expected if k not in loaded and k not in tied and module(k) in present]
        raise CheckpointError(f"{str(path)!r} does not match its config.json: the weights lack {len(missing)} "
                              f"tensor(s) it declares, e.g. {quote(key)}; was num_hidden_layers or another size "
                              f"edited, or is a shard missing?")
    stacks = {m.group(1) for k in expected if (m := re.match(r"^(.*?)\.\d+\.", k))}  # encoder.layer, model.layers
    for key, name in loaded.items():
        m = re.match(r"^(.*?)\.(\d+)\.", key)
        if key in expected or not m or m.group(1) not in stacks or any(p.search(key) for p in ignore_unexpected):
            continue
        count = len({k.split(".")[len(m.group(1).split("."))] for k in expected if k.startswith(m.group(1) + ".")})
        raise CheckpointError(f"{str(where[name])!r} does not match its config.json: it holds {quote(name)}, layer "
                              f"{m.group(2)} of {m.group(1)}, but the config declares {count} layer(s); was "
                              f"num_hidden_layers edited?")


def read_config(path: str | Path):
    """The config of a local checkpoint, after checking that it loads safely: no code stored with it would run
    (:func:`check_no_remote_code`) and its safetensors weights are complete (:func:`verify_weights`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UnknownModelError(f"model directory {str(path)!r} has no config.json")
    check_no_remote_code(path)
    verify_weights(path)
    return AutoConfig.from_pretrained(path, trust_remote_code=False)


def load_pretrained(path: str | Path, task: str = "auto", num_labels: int | None = None,
                    **kwargs) -> PreTrainedModel:
    """Load a local Hugging Face checkpoint (safetensors only) for ``task`` (``auto`` reads ``architectures``)."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
    path = Path(path)
    if kwargs.pop("trust_remote_code", False):
        raise ConfigError("trust_remote_code=True is not accepted: vtrans loads its installed classes, never code "
                          "stored with a checkpoint")
    config = read_config(path)
    task = infer_task(config) if task == "auto" else task
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    return AUTO_CLASSES[task].from_pretrained(path, trust_remote_code=False, use_safetensors=True, **kwargs)


def _meta_for_task(path: str | Path, task: str, num_labels: int | None) -> PreTrainedModel:
    config = read_config(path)
    if num_labels is not None:
        config.num_labels = num_labels
    with torch.device("meta"):
        return AUTO_CLASSES.get(task, AUTO_CLASSES["base"]).from_config(config)


def geometry_of(path: str | Path, task: str, num_labels: int | None = None) -> Geometry:
    """The :class:`~vtrans.budget.Geometry` of a local checkpoint for ``task``, from its config alone: the model is
    built on the meta device, no weights are read."""
    model = _meta_for_task(path, task, num_labels)
    return for_model(model).geometry(model)


def check_reachable_at(path: str | Path, task: str, budget: Budget, num_labels: int | None = None) -> Geometry:
    """Raise :class:`~vtrans.errors.BudgetError` when no selection of the checkpoint at ``path`` meets ``budget`` - for
    a uniform budget, no shape its stock config expresses (:func:`vtrans.uniform.check_reachable`) - from its config
    alone; returns its geometry."""
    from vtrans.budget import check_budget_reachable
    from vtrans.uniform import check_reachable

    model = _meta_for_task(path, task, num_labels)
    adapter = for_model(model)
    g = adapter.geometry(model)
    if budget.uniform:
        check_reachable(g, budget, adapter.stock_rules(model))
    else:
        check_budget_reachable(g, budget)
    return g


#: Files of which a model directory holding a tokenizer has at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def has_tokenizer(path: str | Path) -> bool:
    """Whether a model directory holds tokenizer files (:data:`TOKENIZER_FILES`)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model directory, or None when there is none; one that asks for code stored with it
    is refused (:func:`check_no_remote_code`)."""
    path = Path(path)
    if not has_tokenizer(path):
        return None
    check_no_remote_code(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


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

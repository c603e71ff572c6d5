"""Strict YAML / dict -> dataclass loading: the generic machinery under :mod:`pipelines.config` (and the bench's
profiles). Nothing here knows the pipeline's sections.

```python
raw = read_yaml("pipelines/configs/minilm-rotten-tomatoes.yaml")     # YAML 1.2 scalars, repeated keys refused
raw = merge_overrides(raw, ["prune.steps=100"], PipelineConfig)      # keys checked against the dataclasses
cfg = from_dict(PipelineConfig, raw)                                 # every key and type checked, messages name it
flatten(cfg), config_hash(cfg.prune), to_dict(cfg)                   # MLflow params, cache key, plain data
```

- :func:`from_dict` checks every key and type against the dataclass annotations: an unknown key is an error that names
  the full dotted key and suggests the closest valid one; ``int`` takes integers only (not ``true``), ``float`` takes
  integers too, ``bool`` only ``true`` / ``false``. Every message names the full key and the value; a message raised
  by a section's own checks is rewritten to name the full key. A class's ``_post_load(data, prefix)`` runs after it is
  built from a mapping (checks that need to know what the file wrote, not only the values).
- YAML is read with YAML 1.2 scalars: ``1e-4`` is a float (PyYAML's YAML 1.1 reads it as a string), and only
  ``true`` / ``false`` are booleans (``yes`` / ``no`` / ``on`` / ``off`` stay strings). A key repeated in one
  mapping is an error.
- Overrides (``a.b=0.3``, ``a.files=[a.csv,b.csv]``, ``a.uri=`` for null) are parsed as YAML and merged into the
  mapping before anything is built; the last override of a key wins; keys of one section that exclude each other
  (``exclusive``) replace each other.
- Imports neither Ray nor MLflow.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from vtrans.errors import KIND_WORDS, ConfigError, path_kind, quote

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "Exclusive",
    "config_hash",
    "field_default",
    "flatten",
    "from_dict",
    "join_key",
    "merge_overrides",
    "parse_overrides",
    "read_yaml",
    "to_dict",
]

T = TypeVar("T")

#: Keys of one section (by class) that exclude each other: an override of one drops the others the file gave.
Exclusive = Mapping[type, tuple[frozenset[str], ...]]


def field_default(cls: type, name: str) -> object:
    """The default of dataclass ``cls``'s field ``name`` (its factory called)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# ---------------------------------------------------------------------------------------------------------------------
# generic structured loading
# ---------------------------------------------------------------------------------------------------------------------


def join_key(prefix: str, key: object) -> str:
    """``prefix.key``, or ``key`` at the top level (``prefix == ""``)."""
    return f"{prefix}.{key}" if prefix else str(key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: object, choices: Iterable[str], prefix: str) -> str:
    choices = sorted(choices)
    full = join_key(prefix, key)
    full = full if len(full) <= 200 else quote(full)[1:]  # a pasted blob as a key: cut, without a second quote
    close = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
    if close:
        return f"unknown key '{full}'; did you mean '{join_key(prefix, close[0])}'?"
    return f"unknown key '{full}'; valid keys{' of ' + prefix if prefix else ''}: {choices}"


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _name(tp: Any) -> str:
    names = {bool: "bool", int: "int", float: "number", str: "string"}
    if tp in names:
        return names[tp]
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _describe(tp: Any) -> str:
    """How a type reads in an error message: ``an int``, ``a number or null``, ``a list of ints``."""
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if float in args and int in args:
            args.remove(int)
        parts = [_describe(a) for a in args] + (["null"] if type(None) in get_args(tp) else [])
        return " or ".join(parts)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple) or tp in (list, tuple):
        elem = args[0] if args else Any
        return f"a list of {_name(elem)}s"
    if origin is dict or tp is dict:
        return f"a mapping of {_name(args[0])} to {_name(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping (section {tp.__name__})"
    return {bool: "a bool (true or false)", int: "an int", float: "a number", str: "a string"}.get(tp, f"a {_name(tp)}")


def _exact(tp: Any, value: object) -> bool:
    """Whether ``value`` already has type ``tp`` (picks the member of a union such as ``float | int``)."""
    if tp is int:
        return type(value) is int
    if tp in (float, str, bool):
        return type(value) is tp
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (Mapping, tp))
    origin = get_origin(tp) or tp
    return isinstance(origin, type) and isinstance(value, origin)


def _convert(tp: Any, value: Any, key: str, what: str | None = None) -> Any:
    """``value`` checked against (and converted to) type ``tp``; ``key`` is the full dotted key for messages."""
    what = what or _describe(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must be {what}, got None")
        members = [a for a in args if a is not type(None)]
        candidates = [a for a in members if _exact(a, value)] or members
        if len(candidates) == 1:
            return _convert(candidates[0], value, key, what)
        for a in candidates:
            try:
                return _convert(a, value, key, what)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {what}, got {quote(value)}")
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1) if isinstance(value, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} must be one of {list(args)}, got {quote(value)}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if type(value) is int:
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {quote(value)}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple
                if len(value) != len(args):
                    raise ConfigError(f"{key} must be a list of {len(args)} items, got {quote(value)}")
                return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
            elem = args[0] if args else Any
            items = [_convert(elem, v, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if (origin or tp) is tuple else items
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping):
            kt, vt = args if args else (Any, Any)
            out = {}
            for k, v in value.items():
                if kt is not Any and not _exact(kt, k):
                    raise ConfigError(f"{key} keys must be {_describe(kt)}, got {quote(k)}")
                out[k] = _convert(vt, v, join_key(key, k))
            return out
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping) or value is None:  # an empty section (``teacher:``) takes its defaults
            return from_dict(tp, value or {}, key)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key} must be {what}, got {quote(value)}")


def _qualify(message: str, prefix: str) -> str:
    """Rewrite a nested section's message (``budget.params ...``) to name the full key (``prune.budget.params``)."""
    if not prefix:
        return message
    last = prefix.rsplit(".", 1)[-1]
    if last != prefix:
        message = re.sub(rf"(?<![\w.]){re.escape(last)}(?=[.\s\[=])", prefix, message)
    if not re.search(rf"(?<![\w.]){re.escape(prefix)}(?!\w)", message):
        message = f"{prefix}: {message}"
    return message


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, checking every key and type recursively.

    ``prefix`` is the dotted key of ``data`` itself (``""`` for the top level) and starts every message: an unknown
    key is ``unknown key 'prune.setps'; did you mean 'prune.steps'?``, a wrong type ``prune.steps must be an int, got
    'ten'``; errors raised by a section's own checks are rewritten to name the full key. Missing keys take the
    dataclass defaults; a field without a default is required.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass, got {quote(cls)}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys to values, got {quote(data)}")
    fields = _init_fields(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key(key, fields, prefix))
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], join_key(prefix, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{join_key(prefix, name)} is required, but missing")
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_qualify(str(e), prefix)) from None
    post_load = getattr(obj, "_post_load", None)
    if post_load is not None:
        post_load(data, prefix)
    return obj


def _section_type(tp: Any) -> type | None:
    """The dataclass of a field typed ``Section`` or ``Section | None``, else None."""
    if _is_union(tp):
        found = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def _merge(raw: dict, tree: Mapping[str, Any], cls: type, prefix: str, exclusive: Exclusive) -> None:
    fields = _init_fields(cls)
    hints = _hints(cls)
    groups = exclusive.get(cls, ())
    for key, value in tree.items():
        if key not in fields:
            raise ConfigError(_unknown_key(key, fields, prefix))
        for group in groups:
            if key in group:
                for other in group - {key} - set(tree):
                    raw.pop(other, None)
        section = _section_type(hints[key])
        current = raw.get(key)
        if isinstance(value, Mapping) and section is not None and (current is None or isinstance(current, Mapping)):
            merged = dict(current or {})
            _merge(merged, value, section, join_key(prefix, key), exclusive)
            raw[key] = merged
        elif isinstance(value, Mapping) and isinstance(current, Mapping):  # a dict-valued field: merge its keys
            raw[key] = {**current, **value}
        else:
            raw[key] = value


# ---------------------------------------------------------------------------------------------------------------------
# YAML and overrides
# ---------------------------------------------------------------------------------------------------------------------


#: Most YAML nodes a config may expand to, aliases counted at every use (the shipped configs have ~150): a "billion
#: laughs" file of nested aliases fails at once instead of exhausting time and memory.
MAX_YAML_NODES = 100_000
#: Deepest nesting of YAML collections in a config (the shipped configs nest 4 deep).
MAX_YAML_DEPTH = 50
#: Largest config file read (the shipped configs have ~3 kB).
MAX_CONFIG_BYTES = 1 << 20


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (``1e-4``) and booleans (``true`` / ``false`` only); no repeated keys; at
    most :data:`MAX_YAML_NODES` nodes with aliases expanded and :data:`MAX_YAML_DEPTH` levels of nesting."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        depth = getattr(self, "_vtrans_depth", 0) + 1
        if depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels",
                                              self.peek_event().start_mark)
        self._vtrans_depth = depth
        try:
            node = super().compose_node(parent, index)
        finally:
            self._vtrans_depth = depth - 1
        sizes: dict[int, int] = self.__dict__.setdefault("_vtrans_sizes", {})
        if id(node) not in sizes:  # an alias returns its anchor's node, already counted: its size is reused
            children = node.value if isinstance(node, yaml.SequenceNode) else [
                n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES:,} values once its "
                                                  f"aliases (*name) are expanded", node.start_mark)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # a list as key: the base constructor reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"found key {key!r} twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


_KEY = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["prune.budget.params=0.3", "data.files=[a.csv,b.csv]"]`` -> ``{"prune": {"budget": {"params": 0.3}}, ...}``.

    Values are YAML (numbers, ``true`` / ``false``, ``null`` or nothing for None, ``[a, b]`` lists, ``{k: v}``
    mappings); a later override of the same key wins. Keys are checked against the config by :func:`merge_overrides`.
    """
    tree: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {quote(item)} must look like key=value, e.g. prune.steps=100")
        key, _, text = item.partition("=")
        key = key.strip()
        if not _KEY.match(key):
            raise ConfigError(f"override {quote(item)}: {quote(key)} is not a dotted key like prune.budget.params")
        try:
            value = yaml.load(text, Loader=_Loader)
        except RecursionError:
            raise ConfigError(f"override {quote(item)}: the value is nested too deeply") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {quote(item)}: the value {quote(text)} is not valid YAML ({_yaml_problem(e)})"
                              ) from None
        *parents, leaf = key.split(".")
        node = tree
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                above = ".".join(parents[: depth + 1])
                raise ConfigError(f"override {item!r} sets a key inside {above}, which an earlier override set to "
                                  f"{child!r}")
            node = child
        node[leaf] = value
    return tree


def merge_overrides(raw: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any], cls: type,
                    exclusive: Exclusive | None = None) -> dict[str, Any]:
    """A copy of the plain mapping ``raw`` with ``overrides`` (``key=value`` strings or a nested mapping) merged in.

    Every overridden key must exist in dataclass ``cls`` (else the unknown-key error with a suggestion). Mappings merge
    key by key; an override of one of a section's mutually exclusive keys (``exclusive``) drops the others.
    """
    tree = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    merged = copy.deepcopy(dict(raw))
    _merge(merged, tree, cls, "", exclusive or {})
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a plain mapping (YAML 1.2 scalars, repeated keys refused), ``name`` defaulted to the stem."""
    path = Path(path)
    kind = path_kind("config file", str(path))
    if kind is None:
        raise ConfigError(f"config file {quote(str(path))} not found (relative to {Path.cwd()})")
    if kind != "file":
        raise ConfigError(f"config file {quote(str(path))} is {KIND_WORDS[kind]}, not a YAML file")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {quote(str(path))} has {path.stat().st_size:,} bytes, more than a "
                              f"config's {MAX_CONFIG_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {quote(str(path))} cannot be read: {quote(str(e))}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise ConfigError(f"config file {quote(str(path))} is not valid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {quote(str(path))} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {quote(str(path))} must hold a mapping of sections (model:, data:, ...), "
                          f"got {quote(raw)}")
    raw.setdefault("name", path.stem)
    return raw


# ---------------------------------------------------------------------------------------------------------------------
# serialising
# ---------------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot serialise {value!r} of type {type(value).__name__}")


def to_dict(config: Any) -> dict[str, Any]:
    """A config (or section) as plain JSON-able data; ``from_dict(type(c), to_dict(c)) == c``."""
    out = _plain(config)
    if not isinstance(out, dict):
        raise TypeError(f"to_dict needs a dataclass instance or a mapping, got {quote(config)}")
    return out


def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        try:
            if yaml.load(value, Loader=_Loader) == value:
                return value
        except yaml.YAMLError:
            pass
        return json.dumps(value)  # quoted: a string YAML would read as something else ("true", "1", "a: b")
    return json.dumps(value)  # null, true / false, numbers, [lists], {mappings}: all YAML as well


def flatten(config: Any) -> dict[str, str]:
    """Dotted keys to text values, e.g. ``{"prune.budget.params": "0.5", "evaluate.latency_seq_lens": "[128]"}``.

    Made for MLflow params; every item written as ``key=value`` is an override that reproduces the value.
    """
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, join_key(key, k))
        else:
            out[key] = _scalar_text(value)

    walk(to_dict(config), "")
    return out


def config_hash(config: Any) -> str:
    """First 16 hex digits of the SHA-256 of the canonical JSON of a config, a section or a mapping (stage caching).
    Credentials in URIs are redacted first: a hash is recorded (tags, stage folders), and a short password could be
    found from it by trying; the same data with other credentials is the same data."""
    from pipelines.redact import redact_data

    text = json.dumps(redact_data(_plain(config)), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

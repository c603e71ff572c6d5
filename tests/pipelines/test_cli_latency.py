"""``vtrans compress --budget latency=F``: compression.json records the table's key, the prediction and the measured
latency; bad latency budgets are one-line errors leaving no output. The tiny model's table comes from a fake clock
(cached beforehand under the same key); the real MiniLM run measures its own and asserts structure, never timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertModel

from pipelines.cli import main
from tests.tiny import tiny
from tests.vtrans.test_latency_table import FakeClock
from vtrans import latency_table as lt
from vtrans.checkpoint import load_pretrained

SEQ = 8


@pytest.fixture(scope="module")
def _tiny_bert_and_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("latency-cli")
    d, cache = root / "tiny-bert", root / "cache"
    tiny("bert", BertModel).save_pretrained(d)
    clock = FakeClock()
    handle = torch.nn.modules.module.register_module_forward_hook(clock.hook)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the unit tests run with (tests/conftest.py)
    try:
        model = load_pretrained(d, task="auto", dtype=torch.float32).eval()  # as the CLI loads it: the same key
        lt.table_for(model, 1, SEQ, clock=clock, repeats=1, warmup=0, cache_dir=cache)
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    return d, cache


@pytest.fixture
def tiny_bert_with_table(_tiny_bert_and_cache: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny BERT directory whose latency table (batch 1 x seq 8, 1 thread, a fake clock) is in the cache."""
    d, cache = _tiny_bert_and_cache
    monkeypatch.setenv("VTRANS_CACHE", str(cache))
    return d


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()  # after the weights loaded: their progress bar comes first
    assert code == 2
    errors = [line for line in err if "vtrans: error: " in line]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def test_compress_to_a_latency_budget(tiny_bert_with_table: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "small"
    assert main(["compress", "--model", str(tiny_bert_with_table), "--budget", "latency=0.6", "--seq-len", str(SEQ),
                 "--latency-repeats", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "latency table: cache hit" in text and "latency: predicted" in text and "measured" in text
    report = json.loads((out / "compression.json").read_text())
    assert report["budget"]["metric"] == "latency" and report["budget"]["value"] == 0.6
    assert report["budget"]["batch_size"] == 1 and report["budget"]["seq_len"] == SEQ
    lat = report["latency"]
    assert lat["predicted_ms"] <= lat["target_ms"] == pytest.approx(0.6 * lat["dense_predicted_ms"])
    assert lat["measured_ms"] > 0 and lat["table_key"]["seq_len"] == SEQ
    assert lat["table_key"]["threads"] == torch.get_num_threads()
    assert "--latency-batch 1" in report["command"]
    assert main(["inspect", str(out)]) == 0


@pytest.mark.parametrize(("budget", "extra", "needles"), [
    ("latency=1.5", [], ["budget.latency", "1.5"]),
    ("latency=0.5,params=0.5", [], ["exactly one of params, flops or latency"]),
    ("latency=0.5", ["--uniform"], ["budget.uniform", "budget.latency"]),
    ("latency=0.5", ["--latency-batch", "0"], ["--latency-batch", "0"]),
    ("latency=0.5", ["--align", "neurons=64"], ["budget.align.neurons=64", "48"]),
    ("latency=0.01", [], ["latency=0.01", "below the smallest predicted latency"]),  # after the cached table
])
def test_bad_latency_budgets(budget: str, extra: list[str], needles: list[str], tiny_bert_with_table: Path,
                             tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    err = _bad(["compress", "--model", str(tiny_bert_with_table), "--budget", budget, "--seq-len", str(SEQ),
                *extra, "--out", str(out)], capsys)
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


@pytest.mark.integration
def test_minilm_latency_budget(tmp_path: Path, tmp_cache: Path, capsys) -> None:
    """The real MiniLM to 60% of its predicted latency on this machine: the prediction is under the target, the
    compressed model runs, compression.json records predicted and measured numbers (printed, not asserted)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bounded on a shared CI machine; the table's key records it
    try:
        _minilm_latency_budget(tmp_path, tmp_cache, capsys)
    finally:
        torch.set_num_threads(threads)


def _minilm_latency_budget(tmp_path: Path, tmp_cache: Path, capsys) -> None:
    out = tmp_path / "minilm-lat60"
    argv = ["compress", "--model", "minilm", "--budget", "latency=0.6", "--latency-repeats", "3", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "latency table: measured" in text
    lat = json.loads((out / "compression.json").read_text())["latency"]
    assert lat["predicted_ms"] <= lat["target_ms"] and lat["measured_ms"] > 0
    assert list(tmp_cache.glob("latency/bert-*.json"))
    with capsys.disabled():
        print(f"\nMiniLM latency=0.6: predicted {lat['predicted_ms']:.2f} ms (target {lat['target_ms']:.2f}, dense "
              f"{lat['dense_predicted_ms']:.2f} predicted / {lat['dense_measured_ms']:.2f} measured), measured "
              f"{lat['measured_ms']:.2f} ms")
    model = load_pretrained(out, task="auto", dtype=torch.float32).eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 1000, (1, 16)))
    assert main(["compress", "--model", "minilm", "--budget", "latency=0.5", "--latency-repeats", "3", "--out",
                 str(tmp_path / "minilm-lat50")]) == 0
    assert "latency table: cache hit" in capsys.readouterr().out  # the same machine, threads and shape

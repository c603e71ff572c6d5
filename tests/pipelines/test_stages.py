"""Pieces of the stages that need no Ray: the calibrate stage's token streams and test cap."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.stages import calibrate
from vtrans.assets import resolve_model
from vtrans.checkpoint import load_tokenizer
from vtrans.data import CausalLMDataset, wikipedia_documents


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("minilm"))


def test_lm_chunks_equal_the_library_dataset(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibrate, "TOKENIZE_BATCH", 5)  # several tokenizer calls must give the single-call stream
    tokenizer.eos_token = "[SEP]"  # an eos after every document, as SmolLM2 has
    docs = wikipedia_documents()[:12]
    ours = calibrate._chunks(docs, tokenizer, 64, "test")
    assert ours == CausalLMDataset(docs, tokenizer, seq_len=64).chunks.tolist()
    assert len(ours) > 100 and all(len(c) == 64 for c in ours)


def test_tokenize_in_batches_equals_one_call(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibrate, "TOKENIZE_BATCH", 3)
    texts = [f"review number {i} was {'great' if i % 2 else 'dull'}" for i in range(10)]
    one = tokenizer(texts, truncation=True, max_length=6)["input_ids"]
    assert calibrate._tokenize(tokenizer, texts, "t", truncation=True, max_length=6) == one


def test_test_cap_is_stratified_and_keeps_order() -> None:
    labels = [0] * 30 + [1] * 70
    table = pa.table({"sample_id": list(range(100, 200)), "label": labels})
    capped = calibrate._cap_test(table, 10, seed=0)
    ids = capped.column("sample_id").to_pylist()
    assert len(ids) == 10 and ids == sorted(ids)
    assert capped.column("label").to_pylist().count(0) == 3
    assert calibrate._cap_test(table, 10, seed=0).equals(capped)  # deterministic
    assert calibrate._cap_test(table, None, seed=0) is table and calibrate._cap_test(table, 500, 0) is table
    chunks = pa.table({"sample_id": list(range(50))})
    assert calibrate._cap_test(chunks, 7, seed=1).num_rows == 7

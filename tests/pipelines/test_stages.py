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


def test_fine_tune_hold_out_is_stratified_disjoint_and_seeded(tmp_path) -> None:
    from pipelines import sources
    from pipelines.config import load_config
    from pipelines.stages.finetune import hold_out
    from tests.pipelines.test_config import MINILM
    from vtrans.errors import ConfigError

    labels = [0] * 60 + [1] * 40
    table = pa.table({"sample_id": list(range(1000, 1100)), "input_ids": [[i % 50 + 3] * 4 for i in range(100)],
                      "label": labels})
    sources.write_parquet(table, tmp_path / "train.parquet")
    train = calibrate.TokenizedDataset(tmp_path / "train.parquet", "seq-cls")
    cfg = load_config(MINILM, ["finetune.eval_every=10", "finetune.eval_samples=20", "finetune.batch_size=16"])
    keep, held = hold_out(train, cfg)
    kept_ids = {int(keep[i]["sample_id"]) for i in range(len(keep))}
    held_ids = {int(held[i]["sample_id"]) for i in range(len(held))}
    assert (len(keep), len(held)) == (80, 20) and not kept_ids & held_ids and len(kept_ids | held_ids) == 100
    assert sum(int(held[i]["labels"]) for i in range(20)) == 8  # 40% positives, as in the split
    again = hold_out(train, cfg)[1]
    assert [int(again[i]["sample_id"]) for i in range(20)] == [int(held[i]["sample_id"]) for i in range(20)]
    other = hold_out(train, load_config(MINILM, ["finetune.eval_every=10", "finetune.eval_samples=20",
                                                 "finetune.batch_size=16", "finetune.seed=1"]))[1]
    assert {int(other[i]["sample_id"]) for i in range(20)} != held_ids
    with pytest.raises(ConfigError, match=r"finetune.eval_samples=90 leaves 10 of the 100 training samples"):
        hold_out(train, load_config(MINILM, ["finetune.eval_every=10", "finetune.eval_samples=90",
                                             "finetune.batch_size=16"]))


def test_fine_tune_key_depends_on_the_hold_out_only_when_there_is_one() -> None:
    from pipelines.config import load_config
    from pipelines.validate import plan
    from tests.pipelines.test_config import MINILM

    base = plan(load_config(MINILM))["finetune"]
    assert plan(load_config(MINILM, ["finetune.eval_samples=64"]))["finetune"] == base  # no eval_every: unused
    held = plan(load_config(MINILM, ["finetune.eval_every=50"]))["finetune"]
    assert held != base  # 256 samples no longer fine-tuned on
    assert plan(load_config(MINILM, ["finetune.eval_every=50", "finetune.eval_samples=64"]))["finetune"] != held


def test_fine_tune_key_depends_on_the_adapters_only_with_lora() -> None:
    from pipelines.config import load_config
    from pipelines.validate import plan
    from tests.pipelines.test_config import MINILM

    base = plan(load_config(MINILM))["finetune"]
    assert plan(load_config(MINILM, ["finetune.lora.rank=4"]))["finetune"] == base  # full: the adapters are unused
    lora = plan(load_config(MINILM, ["finetune.method=lora"]))["finetune"]
    assert lora != base
    assert plan(load_config(MINILM, ["finetune.method=lora", "finetune.lora.rank=4"]))["finetune"] != lora


def test_a_stalled_prune_job_is_tagged_and_said_once(capsys) -> None:
    from pipelines.stages.prune import stall_tags

    history = [{"step": 0, "expected_size": 1.0, "target": 0.9},
               {"step": 49, "expected_size": 0.9999, "target": 0.5, "stalled": 1.0},
               {"step": 99, "expected_size": 0.9998, "target": 0.5}]
    tags = stall_tags(history)
    assert tags["vtrans.stalled"].startswith("expected size 0.9999 has not moved towards the target 0.5000 by the "
                                             "end of the warm-up (step 50)")
    assert capsys.readouterr().out.count("[prune] warning: expected size 0.9999") == 1
    assert stall_tags(history[:1] + history[2:]) == {}


def test_the_dense_measurement_is_kept_across_a_new_optional_evaluate_setting(tmp_path, monkeypatch) -> None:
    """A setting added to the evaluate stage, null by default, changes no stage key and keeps the dense measurement
    (measured once per teacher, test split and hardware)."""
    from pipelines.config import PipelineConfig, from_dict
    from pipelines.stages import evaluate
    from pipelines.stages.base import StageContext

    cfg = from_dict(PipelineConfig, {"name": "t", "model": {"name": "minilm", "task": "seq-cls"},
                                     "data": {"name": "rotten_tomatoes"}, "output": str(tmp_path)})
    ctx = StageContext(config=cfg, root=str(tmp_path), keys={"teacher": "t1", "calibrate": "c1"})
    comp = {"device_name": "cpu", "threads": 1}
    before = evaluate._dense_file(ctx, comp)
    real = evaluate.material
    monkeypatch.setattr(evaluate, "material", lambda c: {**real(c), "evaluate": {**real(c)["evaluate"], "new": None}})
    assert evaluate._dense_file(ctx, comp) == before
    monkeypatch.setattr(evaluate, "material", lambda c: {**real(c), "evaluate": {**real(c)["evaluate"], "new": 1}})
    assert evaluate._dense_file(ctx, comp) != before  # a set value is a different measurement


def test_prune_key_depends_on_the_fine_tune_method_only_where_rounds_fine_tune_with_lora() -> None:
    """``finetune.method`` also decides the fine-tunes between pruning rounds: the prune stage's key changes with it
    (and the adapters) only where those run - more than one round and weights that train - so every other pruning
    keeps the key it had before the keys existed (its cached result is reused)."""
    from pipelines.config import load_config
    from pipelines.validate import plan
    from tests.pipelines.test_config import SMOLLM2

    def key(*overrides: str) -> str:
        return plan(load_config(SMOLLM2, ["prune.method=vtrans", *overrides]))["prune"]

    one, two = key(), key("prune.rounds=2")
    assert key("finetune.method=lora") == one  # one round: no fine-tune between rounds
    assert key("finetune.method=lora", "prune.rounds=2", "prune.method=faster") == key("prune.rounds=2",
                                                                                      "prune.method=faster")
    assert key("finetune.method=lora", "prune.rounds=2", "prune.finetune_steps=0") == key("prune.rounds=2",
                                                                                         "prune.finetune_steps=0")
    assert key("finetune.lora.rank=4", "prune.rounds=2") == two  # full: the adapters are unused
    lora = key("finetune.method=lora", "prune.rounds=2")
    assert lora != two and key("finetune.method=lora", "finetune.lora.rank=4", "prune.rounds=2") != lora
    cfg = load_config(SMOLLM2, ["prune.method=vtrans", "prune.rounds=2", "finetune.method=lora",
                                "finetune.lora.rank=4"])
    assert cfg.prune.finetune_method == "lora" and cfg.prune.lora == cfg.finetune.lora and cfg.prune.lora.rank == 4

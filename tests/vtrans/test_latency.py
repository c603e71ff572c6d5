"""Measured inference cost: forward timing on a tiny model, argument checks, peak memory and model bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from vtrans.errors import ConfigError
from vtrans.latency import Timing, categorise, measure_peak_memory, model_bytes, op_times, time_forward


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertForSequenceClassification(config)


def test_time_forward_values() -> None:
    model = tiny_bert()
    t = time_forward(model, batch_size=4, seq_len=16, repeats=5, warmup=1)
    assert isinstance(t, Timing)
    assert (t.batch_size, t.seq_len, t.repeats) == (4, 16, 5)
    assert 0 < t.median_ms <= t.p90_ms
    assert t.throughput == pytest.approx(4 / (t.median_ms / 1000), rel=1e-9)
    assert t.tokens_per_s == pytest.approx(t.throughput * 16, rel=1e-9)


def test_time_forward_restores_every_module_mode() -> None:
    model = tiny_bert()
    model.train()
    model.bert.encoder.layer[0].eval()  # a mixed state must come back as it was, not as all-train
    before = [m.training for m in model.modules()]
    time_forward(model, batch_size=1, seq_len=8, repeats=1, warmup=0)
    assert [m.training for m in model.modules()] == before
    model.eval()
    time_forward(model, batch_size=1, seq_len=8, repeats=1, warmup=0)
    assert not any(m.training for m in model.modules())


def test_time_forward_runs_in_eval_and_inference_mode() -> None:
    model = tiny_bert()
    model.train()
    seen: list[tuple[bool, bool, tuple[int, ...], int]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs["input_ids"]
        seen.append((module.training, torch.is_inference_mode_enabled(), tuple(ids.shape), int(ids.max())))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    time_forward(model, batch_size=3, seq_len=10, repeats=2, warmup=1, vocab_size=7)
    assert len(seen) == 3  # warm-up + repeats
    assert all(s[:3] == (False, True, (3, 10)) for s in seen)
    assert max(s[3] for s in seen) < 7
    assert model.training


@pytest.mark.parametrize(("key", "value", "kwargs"), [
    ("batch_size", 0, {"batch_size": 0}),
    ("batch_size", 2.0, {"batch_size": 2.0}),
    ("seq_len", -3, {"seq_len": -3}),
    ("repeats", 0, {"repeats": 0}),
    ("warmup", -1, {"warmup": -1}),
    ("vocab_size", 0, {"vocab_size": 0}),
    ("batch_size", True, {"batch_size": True}),
])
def test_bad_arguments_name_key_and_value(key: str, value: object, kwargs: dict) -> None:
    args = {"batch_size": 1, "seq_len": 4, **kwargs}
    with pytest.raises(ConfigError) as err:
        time_forward(tiny_bert(), **args)
    message = str(err.value)
    assert key in message and repr(value) in message
    assert "\n" not in message


def test_seq_len_beyond_max_positions() -> None:
    model = tiny_bert()
    with pytest.raises(ConfigError, match=r"seq_len=65 exceeds the model's max_position_embeddings=64"):
        time_forward(model, batch_size=1, seq_len=65)
    assert time_forward(model, batch_size=1, seq_len=64, repeats=1, warmup=0).seq_len == 64


def test_measure_peak_memory_on_cpu_is_none() -> None:
    result, peak = measure_peak_memory(lambda: torch.ones(1000).sum().item(), "cpu")
    assert result == 1000.0
    assert peak is None


@pytest.mark.gpu
def test_measure_peak_memory_on_cuda() -> None:
    _, peak = measure_peak_memory(lambda: torch.empty(1024 * 1024, dtype=torch.float32, device="cuda"), "cuda")
    assert peak is not None and peak >= 4 * 1024 * 1024


def test_model_bytes_by_hand() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    # Linear: 3 * 4 weights + 4 biases, float32; BatchNorm: weight, bias, running mean and var of 4 (float32)
    # plus num_batches_tracked, one int64
    assert model_bytes(model) == (12 + 4) * 4 + 4 * 4 * 4 + 8
    model.half()  # floating tensors halve; the int64 counter stays
    assert model_bytes(model) == (12 + 4) * 2 + 4 * 4 * 2 + 8


def test_model_bytes_counts_tied_weights_once() -> None:
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    assert model_bytes(nn.ModuleList([emb, head])) == 10 * 6 * 4


def test_model_bytes_of_tiny_bert() -> None:
    model = tiny_bert()
    c = model.config
    h, f, n_layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    pooler_and_head = (h * h + h) + (h * c.num_labels + c.num_labels)
    params = embeddings + n_layers * layer + pooler_and_head
    # buffers: position_ids and token_type_ids, int64, one row of max_position_embeddings each
    buffers = 2 * c.max_position_embeddings * 8
    assert model_bytes(model) == params * 4 + buffers


def test_op_times_split_a_forward_pass_into_categories() -> None:
    model = tiny_bert()
    model.train()
    t = op_times(model, batch_size=2, seq_len=16, repeats=2)
    assert set(t) == {"matmul", "attention", "norm", "other", "total"}
    assert t["total"] == pytest.approx(t["matmul"] + t["attention"] + t["norm"] + t["other"])
    assert t["matmul"] > 0 and t["norm"] > 0 and t["attention"] > 0 and all(v >= 0 for v in t.values())
    assert model.training  # mode restored


def test_op_times_categories_by_hand() -> None:
    t = categorise([("aten::addmm", 3000.0), ("aten::linear", 200.0), ("aten::native_layer_norm", 1000.0),
                    ("aten::_softmax", 500.0), ("aten::_scaled_dot_product_flash_attention_for_cpu", 700.0),
                    ("aten::gelu", 500.0), ("aten::embedding", 0.0), ("aten::add", 100.0)], repeats=2)
    assert t == pytest.approx({"matmul": 1.6, "attention": 0.6, "norm": 0.5, "other": 0.3, "total": 3.0})


def test_op_times_matmul_grows_with_the_matmuls() -> None:
    """An FFN 128x wider has about 40x the matmul FLOPs: its matmul time is larger (timing under load is noisy, so
    only the direction is asserted)."""
    torch.manual_seed(0)
    narrow = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=2, intermediate_size=64)).eval()
    wide = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=8192)).eval()
    with torch.no_grad():
        op_times(narrow, batch_size=1, seq_len=8, repeats=1)  # the profiler's first use in this process
        a = op_times(narrow, batch_size=8, seq_len=64, repeats=3, warmup=2)
        b = op_times(wide, batch_size=8, seq_len=64, repeats=3, warmup=2)
    assert b["matmul"] > a["matmul"] > 0

"""vtrans.checkpoint.verify_weights: complete safetensors checkpoints pass, sharded ones too; pickle-only, truncated
and incomplete ones are a CheckpointError naming the file (the CLI rows are in tests/test_bad_input.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from tests.tiny import tiny
from vtrans.checkpoint import CheckpointError, load_pretrained, read_config, verify_weights


def _save(d: Path, **kw) -> Path:
    tiny("bert", BertForSequenceClassification).save_pretrained(d, **kw)
    return d


def test_sharded_checkpoint_is_verified_shard_by_shard(tmp_path: Path) -> None:
    d = _save(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (d / "model.safetensors").exists()
    verify_weights(d)
    assert read_config(d).model_type == "bert"
    shards[-1].write_bytes(shards[-1].read_bytes()[:-1])  # one byte short
    with pytest.raises(CheckpointError, match=rf"{shards[-1].name}' is truncated or corrupted"):
        verify_weights(d)
    shards[0].unlink()
    with pytest.raises(CheckpointError, match=rf"lacks the safetensors shard\(s\) \['{shards[0].name}'\]"):
        read_config(d)


def test_refused_and_broken_weights(tmp_path: Path) -> None:
    d = _save(tmp_path / "m")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x10" + data[1:8] + b"{not json" + data[17:])  # a garbled header
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load_pretrained(d)
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no model weights"):
        read_config(d)
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"holds \['pytorch_model.bin'\] but no model.safetensors"):
        load_pretrained(d)  # refused before transformers could unpickle anything

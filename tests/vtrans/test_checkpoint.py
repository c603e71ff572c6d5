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


def test_outputs_never_replace_the_working_directory_home_or_the_source(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: write_atomically replaces its target whole, so the current directory, its ancestors, $HOME and the
    model being read (symlinks resolved) are refused before anything is written; missing parents are created."""
    import re

    from vtrans.checkpoint import check_output_dir, write_atomically
    from vtrans.errors import OutputError

    work, home, model = tmp_path / "work", tmp_path / "home", tmp_path / "model"
    for d in (work, home, model):
        d.mkdir()
    (work / "keep.txt").write_text("mine")
    (tmp_path / "model-link").symlink_to(model, target_is_directory=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for out, what in ((".", "is the current directory"), (str(work), "is the current directory"),
                      ("..", "is an ancestor of the current directory"), ("/", "is an ancestor"),
                      ("~", "is $HOME"), (str(model), "is the source model directory"),
                      (str(tmp_path / "model-link"), "is the source model directory")):
        with pytest.raises(OutputError, match=re.escape(f"--out={out!r}") + ".*" + re.escape(what)):
            write_atomically(out, lambda d: (d / "x").write_text("x"), overwrite=True, sources=[model])
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"] and list(model.iterdir()) == []
    with pytest.raises(OutputError, match=r"^output='\.' .*is the current directory"):
        check_output_dir(".", key="output")
    nested = write_atomically("new/deeper/out", lambda d: (d / "x").write_text("x"), sources=[model])
    assert nested == (work / "new" / "deeper" / "out") and (nested / "x").read_text() == "x"
    (work / "file").write_text("")
    with pytest.raises(OutputError, match=r"--out parent '.*/file' exists and is not a directory"):
        check_output_dir("file/sub/out")

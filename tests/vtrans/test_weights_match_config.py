"""vtrans.checkpoint.check_weights_match_config: every supported architecture and head class, dense and compressed,
passes; weights that disagree with config.json (a layer more or less, an edited size, no tensors at all) are a
CheckpointError naming the file and the tensor, found from the safetensors header alone. The CLI rows are in
tests/test_bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification, BertModel, LlamaForCausalLM

import vtrans
from tests.tiny import CASES, IDS, tiny
from vtrans.checkpoint import check_weights_match_config
from vtrans.errors import CheckpointError
from vtrans.scoring import score


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(("arch", "cls"), CASES, ids=IDS)
def test_dense_and_compressed_checkpoints_pass(arch: str, cls, tmp_path: Path) -> None:
    model = tiny(arch, cls)
    model.save_pretrained(tmp_path / "dense")
    check_weights_match_config(tmp_path / "dense")
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    vib.apply_budget(vtrans.Budget(params=0.5, tolerance=0.2), scores=score(model, "magnitude"), method="magnitude")
    vtrans.compress(vib).save_pretrained(tmp_path / "small")
    assert json.loads((tmp_path / "small" / "config.json").read_text())["model_type"] == f"vtrans_{arch}"
    check_weights_match_config(tmp_path / "small")


def test_how_transformers_maps_keys_is_respected(tmp_path: Path) -> None:
    # tied LM head: Llama with tie_word_embeddings saves no lm_head.weight
    tiny("llama", LlamaForCausalLM).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    check_weights_match_config(tmp_path / "tied")
    # a head model's weights ("bert." prefix) under a base config, a base model's under a head config (new classifier),
    # legacy LayerNorm.gamma / beta names, an old position_ids buffer, sharded weights
    tiny("bert", BertForSequenceClassification).save_pretrained(tmp_path / "prefixed")
    _edit_config(tmp_path / "prefixed", architectures=["BertModel"])
    check_weights_match_config(tmp_path / "prefixed")
    d = tmp_path / "legacy"
    tiny("bert", BertModel).save_pretrained(d, max_shard_size="20KB")
    _edit_config(d, architectures=["BertForSequenceClassification"])
    for shard in d.glob("model-*.safetensors"):
        tensors = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                   for k, v in load_file(shard).items()}
        save_file({**tensors, "embeddings.position_ids": torch.arange(64)[None]}, shard)
    check_weights_match_config(d)


def test_weights_that_disagree_with_config_json(tmp_path: Path) -> None:
    d = tmp_path / "m"
    tiny("bert", BertForSequenceClassification).save_pretrained(d)
    _edit_config(d, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"the weights lack 16 tensor\(s\) it declares, e.g. "
                                              r"'bert.encoder.layer.2.attention.self.query.weight'"):
        check_weights_match_config(d)
    _edit_config(d, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"model.safetensors' .* holds 'bert.encoder.layer.1.[\w.]+', layer 1 of "
                                              r"bert.encoder.layer, but the config declares 1 layer"):
        check_weights_match_config(d)
    _edit_config(d, num_hidden_layers=2, intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"tensor 'bert.encoder.layer.0.intermediate.dense.weight' has shape "
                                              r"\[48, 32\], the config declares \[64, 32\]"):
        check_weights_match_config(d)
    _edit_config(d, intermediate_size=48)
    check_weights_match_config(d)
    save_file({}, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors' holds no tensors"):
        check_weights_match_config(d)

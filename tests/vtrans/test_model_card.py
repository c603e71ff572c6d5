"""Issue 18 item 5: every checkpoint vtrans writes carries a model card (README.md with the Hub's metadata) whose
numbers are the checkpoint's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import BertForSequenceClassification, LlamaForCausalLM

import vtrans
from pipelines.cli import main
from tests.tiny import tiny
from vtrans.model_card import MODEL_CARD
from vtrans.scoring import score


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _compress(model, budget: vtrans.Budget, out: Path) -> tuple[int, int]:
    dense = vtrans.count(model).params_blocks
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    vib.apply_budget(budget, scores=score(model, "magnitude"), method="magnitude")
    small = vtrans.compress(vib)
    small.save_pretrained(out)
    return dense, vtrans.count(small).params_blocks


def test_a_heterogeneous_checkpoint_has_a_card_with_its_exact_numbers(tmp_path: Path) -> None:
    model = tiny("bert", BertForSequenceClassification)
    model.config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"  # a Hub id: becomes base_model
    dense, kept = _compress(model, vtrans.Budget(params=0.5, tolerance=0.05), tmp_path / "ckpt")
    card = (tmp_path / "ckpt" / MODEL_CARD).read_text()
    meta = _front_matter(card)
    assert meta == {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "library_name": "transformers",
                    "tags": ["pruned", "structured-pruning", "vtrans"], "pipeline_tag": "text-classification"}
    report = json.loads((tmp_path / "ckpt" / "compression.json").read_text())
    assert report["compressed"]["params_blocks"] == kept
    assert f"| parameters (transformer blocks) | {dense:,} | {kept:,} | {kept / dense:.4f} |" in card
    assert "Method `magnitude`, budget `params=0.5` (blocks)" in card
    assert "trust_remote_code=True" in card and "AutoModelForSequenceClassification" in card
    assert card.count("| kept |") + card.count("| removed |") >= 2  # one row per layer


def test_a_stock_checkpoint_card_says_it_needs_no_vtrans_and_a_local_source_is_no_base_model(tmp_path: Path) -> None:
    model = tiny("llama", LlamaForCausalLM, attn="sdpa")
    model.config._name_or_path = str(tmp_path)  # a local folder is not a Hub id
    _compress(model, vtrans.Budget(params=0.5, uniform=True), tmp_path / "stock")
    card = (tmp_path / "stock" / MODEL_CARD).read_text()
    meta = _front_matter(card)
    assert "base_model" not in meta and meta["pipeline_tag"] == "text-generation"
    assert "loads with transformers alone" in card and "trust_remote_code" not in card
    assert "budget `params=0.5` (blocks, uniform)" in card


def test_the_cli_records_its_command_in_the_card(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny("llama", LlamaForCausalLM, attn="sdpa")
    model.save_pretrained(tmp_path / "dense")
    out = tmp_path / "small"
    assert main(["compress", "--model", str(tmp_path / "dense"), "--budget", "params=7700", "--out", str(out)]) == 0
    card = (out / MODEL_CARD).read_text()
    command = json.loads((out / "compression.json").read_text())["command"]
    assert command.startswith(f"vtrans compress --model {tmp_path / 'dense'} --scorer magnitude --budget params=7700")
    assert f"```bash\n{command}\n```" in card
    assert main(["export", str(out), "--format", "stock", "--out", str(tmp_path / "stock")]) == 0
    exported = json.loads((tmp_path / "stock" / "compression.json").read_text())["command"]
    assert exported.splitlines() == [command, f"vtrans export {out} --format stock --out {tmp_path / 'stock'}"]
    assert "loads with transformers alone" in (tmp_path / "stock" / MODEL_CARD).read_text()
    capsys.readouterr()

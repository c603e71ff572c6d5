"""The logged MLflow model of a compressed checkpoint (issue 18, item 4), on a real SQLite store: one model that
``mlflow.pyfunc`` loads through the installed vtrans and ``mlflow.transformers`` loads as a pipeline (after
:func:`pipelines.registry.load_transformers` checked it), from the registry by alias, with the task's class names.

Three checkpoints: a heterogeneous compressed BERT (seq-cls), a heterogeneous compressed Llama (causal-lm) and a stock
BERT (what ``--uniform`` / ``vtrans export`` give: transformers' own class, no vtrans needed)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

import vtrans
from pipelines.tracking import global_tracking_uri
from tests.test_security import _compressed
from tests.tiny import tiny
from vtrans.assets import resolve_model
from vtrans.checkpoint import load_pretrained, load_tokenizer

pytestmark = pytest.mark.integration

TEXTS = ["a gripping film", "dull", "the plot never lands, but the cast is wonderful"]
NAMES = ["rotten", "fresh"]


def _with_tokenizer(d: Path, model: str) -> Path:
    load_tokenizer(resolve_model(model)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    stock = root / "stock-bert"
    tiny("bert", BertForSequenceClassification, num_labels=2, vocab_size=30522,
         max_position_embeddings=512).save_pretrained(stock)
    return {
        "bert": _with_tokenizer(_compressed(root / "bert", num_labels=2, vocab_size=30522,
                                            max_position_embeddings=512), "minilm"),
        "llama": _with_tokenizer(_compressed(root / "llama", "llama", LlamaForCausalLM, vocab_size=49152), "smollm2"),
        "stock-bert": _with_tokenizer(stock, "minilm"),
    }


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    from pipelines.tracking import Tracker

    d = tmp_path_factory.mktemp("store")
    return Tracker.connect(f"sqlite:///{d}/mlflow.db", "flavor", artifact_location=(d / "mlartifacts").as_uri())


def _log_and_register(tracker, ckpt: Path, name: str, labels) -> str:
    import mlflow

    from pipelines.stages.base import log_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uri = log_model(tracker, tracker.start_run(name), str(ckpt), {"accuracy": 0.5}, labels)
        with global_tracking_uri(tracker.uri):
            version = mlflow.register_model(uri, name, tags={"budget": "0.5"}).version
    tracker.client.set_registered_model_alias(name, "best", version)
    return uri


@pytest.mark.parametrize("which", ["bert", "stock-bert"])
def test_a_classifier_predicts_class_names_through_both_flavors(which, checkpoints, tracker, tmp_path) -> None:
    import mlflow

    from pipelines.registry import download_checkpoint, load_transformers

    ckpt = checkpoints[which]
    uri = _log_and_register(tracker, ckpt, f"cls-{which}", NAMES)
    alias = f"models:/cls-{which}@best"
    version = tracker.client.get_model_version_by_alias(f"cls-{which}", "best")
    assert version.tags["budget"] == "0.5" and version.source == uri  # the registry keeps tags and the alias

    # the stored model: no Python file, no auto_map, the class names; the flavor names a class transformers resolves
    local = download_checkpoint(alias, tmp_path / "ckpt", tracker.uri)
    assert not list(local.rglob("*.py"))
    config = json.loads((local / "config.json").read_text())
    assert "auto_map" not in config and config["id2label"] == {"0": "rotten", "1": "fresh"}
    assert (local / "compression.json").is_file() == (which == "bert") and (local / "tokenizer.json").is_file()
    with global_tracking_uri(tracker.uri):
        flavors = mlflow.models.get_model_info(alias).flavors
    assert flavors["python_function"]["loader_module"] == "pipelines.mlflow_model"  # installed code, not stored
    assert flavors["transformers"]["pipeline_model_type"] == \
        ("AutoModelForSequenceClassification" if which == "bert" else "BertForSequenceClassification")

    ours = load_pretrained(ckpt, task="seq-cls", dtype=torch.float32).eval()
    tok = load_tokenizer(ckpt)
    with torch.no_grad():
        want = ours(**tok(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    expected = [NAMES[i] for i in want.argmax(-1).tolist()]

    with global_tracking_uri(tracker.uri):
        pyfunc = mlflow.pyfunc.load_model(alias)
    out = pyfunc.predict(TEXTS)
    assert out["label"].tolist() == expected
    torch.testing.assert_close(torch.tensor(out["probabilities"].tolist()), want, rtol=1e-5, atol=1e-6)
    assert type(pyfunc.get_raw_model().model) is type(ours)

    pipe = load_transformers(alias, tmp_path / "pipe", tracker.uri)
    got = pipe(TEXTS)
    assert [g["label"] for g in got] == expected
    torch.testing.assert_close(torch.tensor([g["score"] for g in got]), want.max(-1).values, rtol=1e-5, atol=1e-6)
    assert type(pipe.model) is type(ours)


def test_a_decoder_generates_the_same_tokens_through_both_flavors(checkpoints, tracker, tmp_path) -> None:
    import mlflow

    from pipelines.registry import load_transformers

    ckpt = checkpoints["llama"]
    _log_and_register(tracker, ckpt, "lm", None)
    ours = load_pretrained(ckpt, task="causal-lm", dtype=torch.float32).eval()
    tok = load_tokenizer(ckpt)
    prompt = "The history of"
    ids = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        gen = ours.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    want = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    with global_tracking_uri(tracker.uri):
        pyfunc = mlflow.pyfunc.load_model("models:/lm@best")
    assert pyfunc.predict([prompt], params={"max_new_tokens": 4})["generated_text"].tolist() == [want]

    pipe = load_transformers("models:/lm@best", tmp_path / "pipe", tracker.uri)
    assert isinstance(pipe.model, vtrans.modeling_vtrans.VtransLlamaForCausalLM)
    text = pipe(prompt, max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == want

"""lm-evaluation-harness on vtrans models (vtrans.lm_eval): the shipped ``lambada_local`` task, its names, the checks
before any work, and - on real SmolLM2 - scores equal to an independent recomputation."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

from vtrans.errors import ConfigError
from vtrans.lm_eval import (
    LAMBADA_MIN_WORDS,
    LOCAL_TASKS,
    TASK_DIR,
    check_tasks,
    flat_metrics,
    lambada_local_docs,
    metric_name,
)


def test_lambada_local_examples_are_passages_cut_before_their_last_word() -> None:
    docs = lambada_local_docs()
    assert len(docs) == 290  # every distinct built-in Lee news story (of 300) gives one
    assert docs == lambada_local_docs()  # deterministic
    assert docs[0]["target"] == "Highway" and docs[0]["context"].endswith("forced the closure of the Hume")
    for d in docs:
        assert d["text"] == f"{d['context']} {d['target']}"
        assert re.fullmatch(r"[A-Za-z][A-Za-z'-]*[A-Za-z]", d["target"])
        assert len(d["text"].split()) >= LAMBADA_MIN_WORDS
    assert len({d["context"] for d in docs}) == len(docs)


def test_metric_names_are_flat_and_prefixed() -> None:
    assert metric_name("lambada_local", "acc") == "lm_eval_lambada_local_acc"
    assert metric_name("mmlu.stem", "acc_norm,none") == "lm_eval_mmlu_stem_acc_norm_none"  # no '.', ',' or '/'
    scores = {"lambada_local": {"acc": 0.25, "perplexity": 30.5, "samples": 8.0}, "x": {"f1": math.nan}}
    assert flat_metrics(scores, "dense_") == {"dense_lm_eval_lambada_local_acc": 0.25,
                                              "dense_lm_eval_lambada_local_perplexity": 30.5,
                                              "dense_lm_eval_lambada_local_samples": 8.0}


def test_the_prefix_token_comes_from_the_tokenizer_else_the_model_config() -> None:
    from types import SimpleNamespace as NS

    from vtrans.lm_eval import prefix_token_id

    config = NS(config=NS(bos_token_id=101, eos_token_id=102))
    assert prefix_token_id(config, NS(bos_token_id=1, eos_token_id=2)) == 1
    assert prefix_token_id(config, NS(bos_token_id=None, eos_token_id=2)) == 2
    assert prefix_token_id(config, NS(bos_token_id=None, eos_token_id=None)) == 101  # a BERT tokenizer on a decoder
    with pytest.raises(ConfigError, match="names a bos or eos token"):
        prefix_token_id(NS(config=NS(bos_token_id=None, eos_token_id=None)), NS(bos_token_id=None, eos_token_id=None))


def test_the_task_ships_with_the_package() -> None:
    assert sorted(p.name for p in TASK_DIR.glob("*.yaml")) == [f"{t}.yaml" for t in sorted(LOCAL_TASKS)]


def test_vtrans_imports_without_lm_eval_and_says_how_to_install() -> None:
    code = ("import sys; sys.modules['lm_eval'] = None; import vtrans, vtrans.lm_eval\n"
            "try:\n    vtrans.lm_eval.check_tasks(['lambada_local'])\n"
            "except vtrans.ConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "evaluate.lm_eval_tasks needs lm-evaluation-harness" in out.stdout and "vtrans[eval]" in out.stdout


@pytest.mark.parametrize("names", ["lambada_local", [], None])
def test_task_lists_of_the_wrong_form_are_refused(names) -> None:
    with pytest.raises(ConfigError, match=r"^evaluate\.lm_eval_tasks must be a non-empty list"):
        check_tasks(names)


def test_the_local_task_is_found_and_loads_offline() -> None:
    """Local names need no index of lm-eval's thousands of tasks; the task's data comes from the text assets."""
    from vtrans.lm_eval import _manager

    assert check_tasks(["lambada_local"]) == ["lambada_local"]
    task = _manager(["lambada_local"]).load(["lambada_local"])["tasks"]["lambada_local"]
    docs = list(task.test_docs())
    assert len(docs) == 290 and task.doc_to_text(docs[0]) == lambada_local_docs()[0]["context"]
    assert task.doc_to_target(docs[0]) == " Highway"


@pytest.mark.integration
@pytest.mark.slow
def test_unknown_and_unreachable_tasks_are_one_line_errors() -> None:
    """A name that is no task (with the closest one), a hub task whose data cannot be had offline (conftest sets
    HF_DATASETS_OFFLINE=1): one-line ConfigErrors naming the list item and the value."""
    with pytest.raises(ConfigError) as e:
        check_tasks(["lambada_locl"], key="evaluate.lm_eval_tasks")
    assert str(e.value).startswith("evaluate.lm_eval_tasks[0]='lambada_locl' is not one of lm-eval's tasks")
    assert "did you mean 'lambada_local'?" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_tasks(["lambada_local", "lambada_openai"])
    assert str(e.value).startswith("evaluate.lm_eval_tasks[1]='lambada_openai': its data cannot be loaded here")
    assert "\n" not in str(e.value)


def _own_scores(model, tokenizer, docs: list[dict]) -> tuple[float, float]:
    """(greedy last-word accuracy, exp(-mean log-likelihood)) one passage at a time, without lm-eval: the target's
    tokens are those the passage adds to its context's, as lm-eval encodes a (context, continuation) pair."""
    correct, lls = 0, []
    with torch.no_grad():
        for d in docs:
            ctx = tokenizer(d["context"]).input_ids
            cont = tokenizer(d["context"] + " " + d["target"]).input_ids[len(ctx):]
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]  # (len(cont), vocab)
            want = torch.tensor(cont)  # (len(cont),)
            lls.append(float(logits.float().log_softmax(-1).gather(-1, want[:, None]).sum()))
            correct += bool((logits.argmax(-1) == want).all())
    return correct / len(docs), math.exp(-sum(lls) / len(lls))


@pytest.mark.integration
def test_real_smollm2_lambada_local_equals_an_independent_recomputation() -> None:
    """SmolLM2-135M on the first 16 ``lambada_local`` passages through lm-eval's own HFLM / simple_evaluate (the model
    handed over in memory): accuracy and perplexity equal a recomputation by hand on the same passages. (A
    vtrans-compressed model - its own classes, no trust_remote_code - goes the same way in the decoder pipeline
    test.)"""
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_pretrained, load_tokenizer
    from vtrans.lm_eval import evaluate

    limit = 16
    path = resolve_model("smollm2")
    tokenizer = load_tokenizer(path)
    model = load_pretrained(path, task="causal-lm", dtype=torch.float32).eval()
    scores = evaluate(model, tokenizer, ["lambada_local"], limit=limit, batch_size=8)["lambada_local"]
    acc, ppl = _own_scores(model, tokenizer, lambada_local_docs()[:limit])
    assert scores["samples"] == limit
    assert 0 < scores["acc"] < 1 and scores["acc"] == pytest.approx(acc, abs=1e-9)
    assert 1 < scores["perplexity"] < 1000 and scores["perplexity"] == pytest.approx(ppl, rel=1e-4)

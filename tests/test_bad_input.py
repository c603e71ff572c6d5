"""Catalogue of bad input (issue 8): what a user can get wrong on the command line, in a config, in the data and in a
model, each run through the real ``vtrans`` entry point.

Every row must give a typed :class:`~vtrans.errors.VtransError` (its class is checked with ``--debug``, which
re-raises), exit 2 with exactly one stderr line ``vtrans: error: ...`` that names the key and the offending value (the
row's needles), show no traceback, and start nothing: no Ray, no MLflow store, no file written. Rows of a pipeline
config go through ``vtrans run`` and ``vtrans validate`` alike (validate reports what run would). A few rows also run
as a real ``python -m pipelines.cli`` subprocess, with no Ray process appearing under it.

Models are tiny (tests/tiny.py) with the MiniLM tokenizer, data are small CSVs, all written to a temporary folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertForSequenceClassification, T5Config, T5Model

from pipelines.cli import main
from tests.tiny import tiny
from vtrans.checkpoint import CheckpointError
from vtrans.errors import BudgetError, ConfigError, OutputError, UnknownModelError, UnsupportedModelError, VtransError

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "pipelines" / "configs" / "minilm-rotten-tomatoes.yaml")
SWEEP = str(REPO / "pipelines" / "configs" / "sweep-minilm.yaml")
LM_CONFIG = str(REPO / "pipelines" / "configs" / "smollm2-wikipedia.yaml")
RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "dashboard")


# ---------------------------------------------------------------------------------------------------------------------
# the files the rows point at: {w} in a row is this folder
# ---------------------------------------------------------------------------------------------------------------------


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> None:
    path.write_text("\n".join([header, *(f'"{t}",{label}' for t, label in rows)]) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models (good, pickle-only, truncated, unsupported, tampered, without tokenizer), CSVs and YAMLs."""
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_tokenizer

    w = tmp_path_factory.mktemp("bad-input")
    tokenizer = load_tokenizer(resolve_model("minilm"))

    def model_dir(name: str, model, with_tokenizer: bool = True) -> Path:
        d = w / name
        model.save_pretrained(d)
        if with_tokenizer:
            tokenizer.save_pretrained(d)
        return d

    def bert(**kw):  # the MiniLM tokenizer's vocabulary, 512 positions: the shipped config's lengths (128) fit
        kw = {"vocab_size": 30522, **kw}
        return tiny("bert", BertForSequenceClassification, num_labels=2, max_position_embeddings=512, **kw)

    model_dir("bert", bert())
    model_dir("smallvocab", bert(vocab_size=60))
    model_dir("notok", bert(), with_tokenizer=False)
    pickled = model_dir("pickled", bert())  # transformers 5 writes safetensors only: a pickle checkpoint by hand
    (pickled / "model.safetensors").unlink()
    torch.save(bert().state_dict(), pickled / "pytorch_model.bin")
    truncated = model_dir("truncated", bert()) / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    model_dir("t5", T5Model(T5Config(vocab_size=60, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)))
    (w / "empty").mkdir()
    assert main(["compress", "--model", str(w / "bert"), "--budget", "params=0.6", "--out", str(w / "tampered")]) == 0
    payload = f"\nopen({str(w / 'PAYLOAD_RAN')!r}, 'w').close()\n"  # never run: its marker must never appear
    (w / "tampered" / "evil.py").write_text(payload + "class SomeClass:\n    pass\n")
    config = json.loads((w / "tampered" / "config.json").read_text())
    config["auto_map"]["AutoConfig"] = "evil.SomeClass"
    (w / "tampered" / "config.json").write_text(json.dumps(config))
    with (w / "tampered" / "modeling_vtrans.py").open("a") as f:
        f.write(payload)

    good = [(f"a fine film number {i}", i % 2) for i in range(40)]
    _csv(w / "ok.csv", good)
    _csv(w / "nocol.csv", good, header="review,label")
    _csv(w / "header.csv", [])
    _csv(w / "label5.csv", good[:3] + [("a sixth kind of film", 5)] + good[3:])
    _csv(w / "oneclass.csv", [(t, 1) for t, _ in good])
    _csv(w / "nolabel.csv", good[:7] + [("no label here", "")] + good[7:])
    (w / "data.tsv").write_text("text\tlabel\ngood\t1\n")
    (w / "one-document.jsonl").write_text('{"text": "the only article there is"}\n')

    base = Path(CONFIG).read_text()
    (w / "typo-section.yaml").write_text(base.replace("\nfinetune:\n", "\nfinetun:\n"))
    (w / "typo-nested.yaml").write_text(base.replace("kl_weight: 0.01", "kl_wieght: 0.01"))
    (w / "repeated.yaml").write_text(base + "\nprune:\n  steps: 3\n")
    (w / "tabs.yaml").write_text(base.replace("  steps: 250", "\tsteps: 250"))
    sweep = Path(SWEEP).read_text()
    space = "  space:\n    prune.budget.params: [0.7, 0.5, 0.3, 0.2]\n    prune.vib.kl_weight: [0.01, 0.1]\n"
    assert space in sweep
    (w / "sweep-empty.yaml").write_text(sweep.replace(space, "  space: {}\n"))
    _issue15_files(w, model_dir, bert)
    _file_access_world(w)
    return w


# --- issue 15: inputs ------------------------------------------------------------------------------------------------
def _issue15_files(w: Path, model_dir, bert) -> None:
    """Under ``{w}/i15``: weights that disagree with config.json, a compressed checkpoint, a bad dtype, a directory and
    a FIFO named like data files, a "billion laughs" and a too deeply nested YAML."""
    import json
    import os

    i15 = w / "i15"
    i15.mkdir()

    def edited(name: str, **changes) -> None:
        d = model_dir(f"i15/{name}", bert())
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))

    edited("layers3", num_hidden_layers=3)
    edited("layers1", num_hidden_layers=1)
    edited("wider", intermediate_size=64)
    save_file({}, model_dir("i15/notensors", bert()) / "model.safetensors")
    weights = model_dir("i15/baddtype", bert()) / "model.safetensors"
    data = weights.read_bytes()
    assert b'"F32"' in data[:4096]
    weights.write_bytes(data.replace(b'"F32"', b'"F33"', 1))  # same header length: only the dtype is wrong
    assert main(["compress", "--model", str(w / "bert"), "--budget", "params=0.6", "--out",
                 str(i15 / "compressed")]) == 0
    (i15 / "adir.csv").mkdir()
    os.mkfifo(i15 / "fifo.csv")
    laughs = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    (i15 / "laughs.yaml").write_text(Path(CONFIG).read_text() + "\nsweep_notes:\n" + "".join(
        "  " + line + "\n" for line in laughs.splitlines()))
    (i15 / "deep.yaml").write_text(Path(CONFIG).read_text().replace("\nname: ", "\nnested: " + "[" * 3000 + "]" * 3000
                                                                      + "\nname: ", 1))
    _csv(i15 / "biglabel.csv", [(f"a film {i}", i % 2) for i in range(40)] + [("a film of its own class", 99999999)])


def files(name: str, *more: str) -> tuple[str, ...]:
    """Overrides reading ``{w}/name`` instead of the built-in data (enough rows per split for every job's batch)."""
    return ("data.name=", f"data.files=[{{w}}/{name}]", "data.max_train_samples=", "calibration.count=16", *more)


# ---------------------------------------------------------------------------------------------------------------------
# the catalogue
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    """``vtrans`` arguments; a CONFIG first means ``run`` and ``validate`` both; ``{w}`` is the world folder."""
    error: type[VtransError]
    """The class ``--debug`` re-raises."""
    needles: tuple[str, ...]
    """Text the one-line message must contain: the key (or argument) and the offending value."""

    def commands(self, w: Path) -> list[list[str]]:
        args = [a.replace("{w}", str(w)) for a in self.argv]
        if args[0].endswith(".yaml"):
            return [["run", *args], ["validate", *args]]
        return [args]


def pipe(rid: str, overrides: tuple[str, ...] | list[str], error: type[VtransError], *needles: str,
         config: str = CONFIG) -> Row:
    """A row of a pipeline config (the shipped MiniLM one unless ``config``) with ``overrides``: run and validate."""
    return Row(rid, (config, *overrides), error, needles)


ROWS: list[Row] = [
    # --- typo keys: the file's top level, a nested key in the file, an override; each suggests the key meant
    pipe("typo-section-in-file", [], ConfigError, "unknown key 'finetun'", "did you mean 'finetune'?",
         config="{w}/typo-section.yaml"),
    pipe("typo-nested-in-file", [], ConfigError, "unknown key 'prune.vib.kl_wieght'", "'prune.vib.kl_weight'",
         config="{w}/typo-nested.yaml"),
    pipe("typo-section-override", ["finetnue.steps=10"], ConfigError, "unknown key 'finetnue'", "'finetune'"),
    pipe("typo-nested-override", ["finetune.distill.temprature=3"], ConfigError,
         "unknown key 'finetune.distill.temprature'", "did you mean 'finetune.distill.temperature'?"),
    # --- malformed files and overrides
    pipe("key-repeated-in-file", [], ConfigError, "found key 'prune' twice", "repeated.yaml",
         config="{w}/repeated.yaml"),
    pipe("tab-in-file", [], ConfigError, "tabs.yaml", "is not valid YAML", "line ", config="{w}/tabs.yaml"),
    # --- wrong types
    pipe("string-for-int", ["finetune.steps=ten"], ConfigError, "finetune.steps must be an int", "'ten'"),
    pipe("unknown-kl-normalisation", ["prune.vib.kl_normalisation=layer"], ConfigError,
         "prune.vib.kl_normalisation must be one of ['group', 'unit']", "'layer'"),
    pipe("list-for-number", ["prune.lr_masks=[0.1, 0.2]"], ConfigError, "prune.lr_masks must be a number",
         "[0.1, 0.2]"),
    pipe("bool-for-int", ["teacher.steps=true"], ConfigError, "teacher.steps must be an int", "True"),
    pipe("number-for-bool", ["ray.use_gpu=1"], ConfigError, "ray.use_gpu must be a bool", "got 1"),
    # --- budgets
    pipe("budget-params-zero", ["prune.budget.params=0"], ConfigError, "prune.budget.params", "got 0"),
    pipe("budget-flops-negative", ["prune.budget.flops=-0.1"], ConfigError, "prune.budget.flops", "-0.1"),
    pipe("budget-tolerance", ["prune.budget.tolerance=1.5"], ConfigError, "prune.budget.tolerance", "1.5"),
    pipe("budget-unreachable", ["prune.budget.flops=1.0e-6"], BudgetError, "flops=1e-06", "cannot be met"),
    # MiniLM (post-LN BERT) in stock form keeps every layer and its attention: no uniform shape is under ~33%
    pipe("uniform-budget-unreachable", ["prune.budget.params=0.2", "prune.budget.uniform=true"], BudgetError,
         "params=0.2", "uniform", "33.48% of dense"),
    # aligned widths (issue 20): a positive integer or {heads, neurons, hidden}, no wider than MiniLM's structures
    pipe("align-zero", ["prune.budget.align=0"], ConfigError, "prune.budget.align", "got 0"),
    pipe("align-unknown-structure", ["prune.budget.align={ffn: 8}"], ConfigError, "prune.budget.align", "'ffn'"),
    pipe("align-wider-than-ffn", ["prune.budget.align={neurons: 4096}"], ConfigError, "align.neurons=4096",
         "FFN width 1536"),
    # --- fractions
    pipe("calibration-fraction-above-1", ["calibration.fraction=1.5"], ConfigError, "calibration.fraction", "1.5"),
    pipe("test-fraction-zero", ["data.test_fraction=0"], ConfigError, "data.test_fraction", "got 0"),
    # --- model names
    pipe("unknown-model", ["model.name=bert-tiny"], ConfigError, "model.name", "'bert-tiny'", "'minilm'"),
    pipe("missing-model-dir", ["model.name={w}/nowhere"], ConfigError, "model.name", "nowhere'"),
    pipe("model-dir-without-config", ["model.name={w}/empty"], ConfigError, "model.name=", "empty'", "config.json"),
    pipe("tokenizer-larger-than-vocab", ["model.name={w}/smallvocab"], ConfigError, "model.name=", "smallvocab'",
         "30522 tokens", "vocab_size=60"),
    pipe("model-dir-without-tokenizer", ["model.name={w}/notok"], ConfigError, "model.name=", "notok'",
         "no tokenizer"),
    Row("inspect-unknown-model", ("inspect", "no-such-model"), UnknownModelError, ("'no-such-model'", "'minilm'")),
    # --- data sets and files
    pipe("unknown-dataset", ["data.name=rotten-tomatoes"], ConfigError, "data.name", "'rotten-tomatoes'",
         "'rotten_tomatoes'"),
    pipe("data-file-missing", files("missing.csv"), ConfigError, "data.files[0] does not exist", "missing.csv'"),
    pipe("data-file-extension", files("data.tsv"), ConfigError, "data.files[0] must end in", "data.tsv'"),
    pipe("text-column-missing", files("nocol.csv"), ConfigError, "data.text_column='text'", "nocol.csv'",
         "['review', 'label']"),
    pipe("label-column-missing", files("ok.csv", "data.label_column=target"), ConfigError,
         "data.label_column='target'", "ok.csv'", "['text', 'label']"),
    pipe("label-column-null", files("ok.csv", "data.label_column=", "model.task=seq-cls"), ConfigError,
         "data.label_column is required", "model.task='seq-cls'", "None"),
    pipe("label-empty", files("nolabel.csv"), ConfigError, "data.label_column='label'", "1 null or empty label",
         "row 7"),
    pipe("data-header-only", files("header.csv"), ConfigError, "data.files=", "header.csv'", "no rows"),
    pipe("label-outside-classes", files("label5.csv"), ConfigError, "data.label_column='label'", "class id 5",
         "model.num_labels=2"),
    pipe("single-class", files("oneclass.csv"), ConfigError, "data.label_column='label'", "1 class(es) [1]",
         "at least 2"),
    pipe("batch-larger-than-data", files("ok.csv", "prune.batch_size=32"), ConfigError, "prune.batch_size=32",
         "16 calibration samples"),
    pipe("finetune-hold-out-too-large", files("ok.csv", "finetune.eval_every=10", "finetune.eval_samples=30"),
         ConfigError, "finetune.batch_size=16", "6 training (less finetune.eval_samples=30)"),
    pipe("one-document-for-causal-lm", ["data.name=", "data.files=[{w}/one-document.jsonl]"], ConfigError,
         "data.files=", "one-document.jsonl'", "1 document(s)", config=LM_CONFIG),
    # --- architectures and checkpoints
    pipe("unsupported-architecture", ["model.name={w}/t5"], UnsupportedModelError, "model.name=", "t5'",
         "'t5' is not supported", "'bert'"),
    Row("inspect-unsupported-architecture", ("inspect", "{w}/t5"), UnsupportedModelError,
        ("model_type 't5'", "vtrans.arch.register")),
    pipe("pickle-checkpoint", ["model.name={w}/pickled"], ConfigError, "model.name=", "pickled'",
         "['pytorch_model.bin']", "safetensors only"),
    Row("compress-pickle-checkpoint", ("compress", "--model", "{w}/pickled", "--budget", "params=0.5", "--out",
                                       "out"), CheckpointError, ("pickled'", "pytorch_model.bin", "never pickle")),
    pipe("truncated-checkpoint", ["model.name={w}/truncated"], ConfigError, "model.name=",
         "truncated/model.safetensors'", "truncated or corrupted"),
    Row("inspect-truncated-checkpoint", ("inspect", "{w}/truncated"), CheckpointError,
        ("truncated/model.safetensors'", "bytes")),
    pipe("tampered-vtrans-checkpoint", ["model.name={w}/tampered"], ConfigError, "model.name=",
         "tampered/config.json'", "auto_map.AutoConfig='evil.SomeClass'", "would run code stored"),
    Row("inspect-tampered-vtrans-checkpoint", ("inspect", "{w}/tampered"), CheckpointError,
        ("tampered/config.json'", "auto_map.AutoConfig='evil.SomeClass'")),
    # --- resources, Ray and MLflow
    pipe("more-workers-than-cpus", ["ray.num_workers=64", "prune.batch_size=64", "finetune.batch_size=64",
                                    "teacher.batch_size=64"], ConfigError, "ray.num_workers=64", "needs 64 CPUs"),
    pipe("workers-do-not-divide-batch", ["ray.num_workers=64"], ConfigError, "prune.batch_size=16",
         "ray.num_workers=64"),
    pipe("ray-address-unreachable", ["ray.address=127.0.0.1:1"], ConfigError, "ray.address='127.0.0.1:1'",
         "nothing answers"),
    pipe("ray-address-is-dashboard", ["ray.address=http://127.0.0.1:8265"], ConfigError,
         "ray.address='http://127.0.0.1:8265'", "dashboard"),
    pipe("mlflow-unreachable", ["tracking.uri=http://127.0.0.1:1"], ConfigError, "tracking.uri='http://127.0.0.1:1'",
         "no MLflow server answers"),
    # --- sweeps
    Row("sweep-space-empty", ("sweep", "{w}/sweep-empty.yaml"), ConfigError, ("sweep.space is empty",)),
    Row("sweep-space-unknown-key", ("sweep", SWEEP, "sweep.space={prune.vib.kl_wieght: [0.1]}"), ConfigError,
        ("unknown key 'prune.vib.kl_wieght'", "'prune.vib.kl_weight'")),
    Row("sweep-model-twice", ("sweep", SWEEP, "sweep.models={small: {}, again: {}}"), ConfigError,
        ("sweep.models lists the same model twice", "'minilm'", "'small'")),
    Row("sweep-bad-data", ("sweep", SWEEP, *files("label5.csv")), ConfigError,
        ("data.label_column='label'", "class id 5", "model.num_labels=2")),
    Row("sweep-budget-out-of-range", ("sweep", SWEEP, "sweep.space={prune.budget.params: [0.5, 1.5]}"), ConfigError,
        ("prune.budget.params", "1.5")),
    # --- compress
    Row("compress-budget-not-a-number", ("compress", "--model", "{w}/bert", "--budget", "params=half", "--out", "out"),
        ConfigError, ("budget.params", "'half'")),
    Row("compress-budget-flops-negative", ("compress", "--model", "{w}/bert", "--budget", "flops=-0.1", "--out",
                                           "out"), ConfigError, ("budget.flops", "-0.1")),
]
# --- issue 15: inputs ------------------------------------------------------------------------------------------------
LONG = "x" * 5000
ROWS += [
    # weights that disagree with config.json, seen from the safetensors header before anything loads
    pipe("weights-lack-a-layer", ["model.name={w}/i15/layers3"], CheckpointError, "model.name=", "layers3'",
         "the weights lack 16 tensor(s)", "'bert.encoder.layer.2."),
    Row("inspect-weights-lack-a-layer", ("inspect", "{w}/i15/layers3"), CheckpointError,
        ("layers3'", "does not match its config.json", "'bert.encoder.layer.2.")),
    pipe("weights-hold-an-extra-layer", ["model.name={w}/i15/layers1"], CheckpointError, "model.name=",
         "layers1/model.safetensors'", "layer 1 of bert.encoder.layer", "declares 1 layer(s)"),
    Row("compress-weights-shape-mismatch", ("compress", "--model", "{w}/i15/wider", "--budget", "params=0.5", "--out",
                                            "out"), CheckpointError,
        ("wider/model.safetensors'", "'bert.encoder.layer.0.intermediate.dense.weight' has shape [48, 32]",
         "declares [64, 32]")),
    pipe("weights-without-tensors", ["model.name={w}/i15/notensors"], CheckpointError, "model.name=",
         "notensors/model.safetensors'", "holds no tensors"),
    Row("inspect-weights-bad-dtype", ("inspect", "{w}/i15/baddtype"), CheckpointError,
        ("baddtype/model.safetensors'", "is corrupted", "'dtype': 'F33'")),
    # a compressed checkpoint: a pipeline prunes it (vtrans.vib.attach refuses), so validate says so, naming the source
    pipe("model-already-compressed", ["model.name={w}/i15/compressed"], ConfigError, "model.name=", "compressed'",
         "already compressed by vtrans", "bert'"),
    Row("compress-model-already-compressed", ("compress", "--model", "{w}/i15/compressed", "--budget", "params=0.5",
                                              "--out", "out"), ConfigError, ("--model", "compressed'",
                                                                              "already compressed by vtrans")),
    # budgets and lengths of compress / inspect
    Row("compress-align-not-a-number", ("compress", "--model", "{w}/bert", "--budget", "params=0.5", "--align", "x",
                                         "--out", "out"), ConfigError, ("--align", "'x'")),
    Row("compress-align-wider-than-heads", ("compress", "--model", "{w}/bert", "--budget", "params=0.5", "--align",
                                            "64", "--out", "out"), ConfigError, ("budget.align=64", "larger than")),
    Row("compress-budget-key-twice", ("compress", "--model", "{w}/bert", "--budget", "params=0.5,params=0.3", "--out",
                                      "out"), ConfigError, ("gives params twice", "'params=0.5,params=0.3'")),
    Row("compress-budget-count-above-dense", ("compress", "--model", "{w}/bert", "--budget", "params=100000000",
                                              "--out", "out"), BudgetError,
        ("--budget params=100000000", "not below the dense model's", "params (blocks)")),
    Row("compress-seq-len-beyond-positions", ("compress", "--model", "{w}/bert", "--budget", "params=0.5", "--seq-len",
                                              "100000", "--out", "out"), ConfigError,
        ("--seq-len 100000", "512 positions", "bert'")),
    Row("inspect-seq-len-beyond-positions", ("inspect", "{w}/bert", "--seq-len", "4096"), ConfigError,
        ("--seq-len 4096", "512 positions")),
    # absurd sizes have a documented maximum
    pipe("prune-steps-absurd", ["prune.steps=1000000000000"], ConfigError, "prune.steps must be at most 1,000,000",
         "1000000000000"),
    pipe("finetune-steps-absurd", ["finetune.steps=1000000000000"], ConfigError,
         "finetune.steps must be at most 1,000,000", "1000000000000"),
    pipe("latency-repeats-absurd", ["evaluate.latency_repeats=10000000"], ConfigError,
         "evaluate.latency_repeats must be at most 10,000", "10000000"),
    pipe("latency-batch-absurd", ["evaluate.latency_batch_sizes=[1, 1000000]"], ConfigError,
         "evaluate.latency_batch_sizes[1] must be at most 4,096", "1000000"),
    pipe("batch-larger-than-builtin-calibration", ["prune.batch_size=128"], ConfigError, "prune.batch_size=128",
         "120 calibration samples", "data.name='rotten_tomatoes'"),
    pipe("num-labels-absurd", ["model.num_labels=1000000"], ConfigError, "model.num_labels must be at most 10,000",
         "1000000"),
    pipe("label-beyond-class-cap", files("i15/biglabel.csv", "model.num_labels="), ConfigError,
         "data.label_column='label'", "class id 99999999", "10,000 classes"),
    # paths: a directory, a FIFO, a name too long for the file system
    pipe("data-file-is-a-directory", files("i15/adir.csv"), ConfigError, "data.files[0]=", "adir.csv'",
         "is a directory"),
    pipe("data-file-is-a-fifo", files("i15/fifo.csv"), ConfigError, "data.files[0]=", "fifo.csv'", "a FIFO"),
    pipe("data-file-name-too-long", files(LONG + ".csv"), ConfigError, "data.files[0]=", "File name too long",
         "xxx… (5,0"),  # the world folder's path comes first: its length varies
    pipe("model-name-too-long", ["model.name=" + LONG], ConfigError, "model.name=", "File name too long",
         "(5,002 characters)"),
    Row("config-path-too-long", ("validate", "{w}/" + LONG + ".yaml"), ConfigError,
        ("config file", "File name too long")),
    Row("inspect-name-too-long", ("inspect", LONG), UnknownModelError, ("model=", "File name too long")),
    # values are quoted at most ~200 characters; YAML that would expand or nest without bound fails at once
    pipe("long-value-is-cut", ["finetune.steps=" + LONG], ConfigError, "finetune.steps must be an int",
         "… (5,002 characters)"),
    pipe("yaml-billion-laughs", [], ConfigError, "laughs.yaml'", "more than 100,000 values", "aliases",
         config="{w}/i15/laughs.yaml"),
    pipe("yaml-nested-too-deep", [], ConfigError, "deep.yaml'", "nesting deeper than 50 levels",
         config="{w}/i15/deep.yaml"),
]
if not torch.cuda.is_available():  # the GPU row needs a machine without one
    ROWS.append(pipe("gpu-without-one", ["ray.use_gpu=true"], ConfigError, "ray.use_gpu=true", "2 GPU(s)",
                     "this machine has 0"))

# ---------------------------------------------------------------------------------------------------------------------
# issue 15: file access - outputs never replace the working directory, $HOME or the model; relog uploads only the
# run's own files
# ---------------------------------------------------------------------------------------------------------------------


def _file_access_world(w: Path) -> None:
    """A link to the tiny model, and two finished-looking runs for relog whose records point outside their stage
    directories (an artifact /etc/hostname, a stage directory elsewhere)."""
    import json

    from pipelines.config import load_config, to_dict

    (w / "bert-link").symlink_to(w / "bert", target_is_directory=True)
    config = yaml_dump(to_dict(load_config(CONFIG)))
    for run, stage_dir, artifact in (("leaky-artifact", None, "/etc/hostname"), ("leaky-dir", "/etc", None)):
        root = w / run
        own = root / "stages" / "evaluate" / "k"
        own.mkdir(parents=True)
        (root / "r").mkdir()
        (root / "r" / "config.yaml").write_text(config)
        summary = {"name": "r", "run_id": None, "tracking_uri": f"sqlite:///{w}/relog-never.db",
                   "stages": {"evaluate": {"status": "ran", "key": "k", "dir": stage_dir or str(own)}}}
        (root / "r" / "summary.json").write_text(json.dumps(summary))
        record = {"stage": "evaluate", "key": "k", "dir": str(own), "outputs": {}, "metrics": {}, "info": {},
                  "started_at": 0.0, "finished_at": 1.0, "wall_s": 1.0, "logged": False,
                  "logging": {"artifacts": [[artifact or str(own / "report.json"), "evaluation"]]}}
        (own / "stage.json").write_text(json.dumps(record))


def yaml_dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


_OUT = ("compress", "--model", "{w}/bert", "--budget", "params=0.5", "--overwrite", "--out")
ROWS += [
    Row("compress-out-is-cwd", (*_OUT, "."), OutputError, ("--out='.'", "is the current directory")),
    Row("compress-out-is-an-ancestor", (*_OUT, ".."), OutputError,
        ("--out='..'", "is an ancestor of the current directory")),
    Row("compress-out-is-home", (*_OUT, "~"), OutputError, ("--out='~'", "is $HOME")),
    Row("compress-out-is-the-model", (*_OUT, "{w}/bert"), OutputError, ("/bert'", "the source model directory")),
    Row("compress-out-links-to-the-model", (*_OUT, "{w}/bert-link"), OutputError,
        ("bert-link'", "/bert'", "the source model directory")),
    pipe("output-is-cwd", ["output=."], OutputError, "output='.'", "is the current directory"),
    pipe("output-is-home", [f"output={Path.home()}"], OutputError, f"output={str(Path.home())!r}", "is $HOME"),
    Row("relog-artifact-outside-the-run", ("relog", "{w}/leaky-artifact/r"), ConfigError,
        ("logging.artifacts path '/etc/hostname'", "outside the run's stage directories")),
    Row("relog-stage-dir-outside-the-run", ("relog", "{w}/leaky-dir/r"), ConfigError,
        ("dir='/etc'", "not the run's stage directory")),
]



@pytest.fixture
def clean_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty working directory; Ray must not start (init_ray fails the test); afterwards no Ray, no MLflow store,
    no output."""
    import ray

    import pipelines.ray_runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("a bad input went as far as starting Ray")

    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pipelines.ray_runtime, "init_ray", no_ray)
    assert not ray.is_initialized()
    yield tmp_path
    assert not ray.is_initialized(), "Ray was started"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [], "something was written (MLflow store, output)"


def test_the_catalogue_is_large() -> None:
    assert len(ROWS) >= 30 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, world: Path, clean_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    for argv in row.commands(world):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, code, err)
        assert len(err.splitlines()) == 1 and err.startswith("vtrans: error: "), err
        assert "Traceback" not in err
        for needle in row.needles:
            assert needle in err, (argv[0], needle, err)
        assert not ray.is_initialized()
    for argv in row.commands(world):
        with pytest.raises(row.error) as info:
            main(["--debug", *argv])
        assert "\n" not in str(info.value)
    capsys.readouterr()
    assert not (world / "PAYLOAD_RAN").exists(), "code stored with a checkpoint ran"


def test_the_rows_break_a_valid_setup(world: Path, clean_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The controls: the base of the rows is valid, so each row fails for its own reason."""
    for overrides in ([], [f"model.name={world}/bert"], [a.replace("{w}", str(world)) for a in files("ok.csv")]):
        assert main(["validate", "--quiet", CONFIG, *overrides]) == 0, capsys.readouterr().err
    assert main(["inspect", str(world / "bert")]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------------------
# as a user sees it: a real process
# ---------------------------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, "PYTHONPATH": str(REPO)}


def _run_watched(commands: list[tuple[list[str], Path]], logs: Path) -> list[tuple[int, str, set[str]]]:
    """Run ``python -m pipelines.cli ARGV`` in ``cwd`` for each command, side by side; each one's exit status, its
    stderr and the command lines of every process seen under it while it ran."""
    import psutil

    procs, errs = [], []
    for i, (argv, cwd) in enumerate(commands):
        errs.append(logs / f"{i}.stderr")  # a file, not a pipe: a chatty process cannot block on a full pipe
        with open(errs[-1], "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], cwd=cwd, env=_env(),
                                          stdout=subprocess.DEVNULL, stderr=err))
    seen: list[set[str]] = [set() for _ in procs]
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs):
        for p, names in zip(procs, seen):
            try:
                names |= {" ".join(c.cmdline()[:3]) or c.name() for c in psutil.Process(p.pid).children(recursive=True)}
            except psutil.Error:  # it exited (or a child did) while being looked at
                pass
        if time.monotonic() - t0 > 300:
            for p in procs:
                p.kill()
            pytest.fail("a command hung")
        time.sleep(0.25)  # a Ray head lives for seconds: no need to look more often
    return [(p.returncode, err.read_text(), names) for p, err, names in zip(procs, errs, seen)]


#: One row of each kind: a config typo (validate), bad data and an unreachable Ray (run), a pickle checkpoint (compress)
SUBPROCESS_ROWS = ("typo-nested-override", "text-column-missing", "ray-address-unreachable",
                   "compress-pickle-checkpoint")


@pytest.mark.slow  # fresh interpreters import torch and transformers: about 5 s of CPU each
def test_as_a_user_sees_it(world: Path, tmp_path: Path) -> None:
    rows = {r.id: r for r in ROWS}
    commands = []
    for rid in SUBPROCESS_ROWS:
        (tmp_path / rid).mkdir()
        argv = rows[rid].commands(world)
        commands.append((argv[-1] if rid.startswith("typo") else argv[0], tmp_path / rid))  # validate / run
    logs = tmp_path / "logs"
    logs.mkdir()
    for rid, (argv, cwd), (code, err, seen) in zip(SUBPROCESS_ROWS, commands, _run_watched(commands, logs)):
        err = err.strip()
        assert code == 2, (argv, code, err)
        assert len(err.splitlines()) == 1 and err.startswith("vtrans: error: "), err
        for needle in rows[rid].needles:
            assert needle in err, (needle, err)
        assert not [name for name in seen if any(r in name for r in RAY_PROCESSES)], seen
        assert [p for p in cwd.rglob("*") if p.is_file()] == [], "something was written"

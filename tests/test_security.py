"""Issue 15: no code stored with a checkpoint runs when vtrans loads it (the trust anchor is the installed vtrans).

Each attack plants a payload that writes a marker file when imported; every test asserts the marker does not exist
and, where the checkpoint is refused, that the error is one line naming the file, the key and the value. The MLflow
ones (pyfunc, registry alias) are at the end, on a real SQLite store in ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    BertModel,
)

import vtrans
from pipelines.cli import main
from tests.tiny import CASES, IDS, input_ids, main_output, tiny
from vtrans.checkpoint import CheckpointError, load_pretrained, load_tokenizer, read_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "pipelines" / "configs" / "minilm-rotten-tomatoes.yaml")
AUTO = {"base": AutoModel, "seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}


def _payload(marker: Path) -> str:
    return f"\nfrom pathlib import Path as _P\n_P({str(marker)!r}).write_text('ran')\n"


def _compressed(d: Path, arch: str = "bert", cls=BertForSequenceClassification, seed: int = 0, **kw) -> Path:
    """A tiny compressed checkpoint (random masks keeping ~60%) saved at ``d``."""
    model = tiny(arch, cls, attn="sdpa", **kw)
    vib = vtrans.attach(model)
    gen = torch.Generator().manual_seed(seed)
    for _, m in vib.masks():
        keep = torch.rand(m.n, generator=gen) < 0.6
        keep[0] = True  # never an empty model
        m.fix(keep)
    vtrans.compress(vib).save_pretrained(d)
    return d


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def _one_line(e: BaseException, *needles: str) -> str:
    text = str(e)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compressed tiny BERT (MiniLM tokenizer vocabulary, so the pipeline's checks pass) with its tokenizer."""
    from vtrans.assets import resolve_model

    d = _compressed(tmp_path_factory.mktemp("sec") / "small", num_labels=2, vocab_size=30522,
                    max_position_embeddings=512)
    load_tokenizer(resolve_model("minilm")).save_pretrained(d)
    return d


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    m = tmp_path / "PAYLOAD_RAN"
    yield m
    assert not m.exists(), "the checkpoint's payload ran"


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "copy"))


# --- the attacks, through the library --------------------------------------------------------------------------------


def test_modified_modeling_code_with_its_hash_updated_never_runs(ckpt: Path, tmp_path: Path, marker: Path) -> None:
    d = _copy(ckpt, tmp_path)
    code = d / "modeling_vtrans.py"
    code.write_text(code.read_text() + _payload(marker))
    _edit_json(d / "compression.json", modeling_sha256=hashlib.sha256(code.read_bytes()).hexdigest())
    with pytest.warns(UserWarning, match=r"modeling_vtrans.py' differs from the installed vtrans's.*it is not run"):
        model = load_pretrained(d)
        assert load_tokenizer(d) is not None
    assert type(model) is vtrans.modeling_vtrans.VtransBertForSequenceClassification  # the installed class
    # plain transformers after `import vtrans`, with or without the flag: the installed classes too
    for flag in ({}, {"trust_remote_code": True}):
        assert type(AutoConfig.from_pretrained(d, **flag)) is vtrans.modeling_vtrans.VtransBertConfig
        assert type(AutoModelForSequenceClassification.from_pretrained(d, **flag)) is type(model)


def test_symlinked_modeling_file_never_runs(ckpt: Path, tmp_path: Path, marker: Path) -> None:
    d = _copy(ckpt, tmp_path)
    evil = tmp_path / "elsewhere.py"
    evil.write_text((d / "modeling_vtrans.py").read_text() + _payload(marker))
    (d / "modeling_vtrans.py").unlink()
    (d / "modeling_vtrans.py").symlink_to(evil)
    with pytest.warns(UserWarning, match=r"modeling_vtrans.py' is a symlink"):
        read_config(d)
        load_pretrained(d)


@pytest.mark.parametrize("key", ["AutoConfig", "AutoModelForSequenceClassification"])
def test_config_auto_map_to_another_module_is_refused(ckpt: Path, tmp_path: Path, marker: Path, key: str) -> None:
    d = _copy(ckpt, tmp_path)
    (d / "evil.py").write_text(_payload(marker) + "class SomeClass:\n    pass\n")
    config = json.loads((d / "config.json").read_text())
    _edit_json(d / "config.json", auto_map={**config["auto_map"], key: "evil.SomeClass"})
    for load in (read_config, load_pretrained, load_tokenizer):
        with pytest.raises(CheckpointError) as e:
            load(d)
        _one_line(e.value, "config.json'", f"auto_map.{key}='evil.SomeClass'")


def test_vtrans_classes_of_another_architecture_are_refused(ckpt: Path, tmp_path: Path) -> None:
    d = _copy(ckpt, tmp_path)
    _edit_json(d / "config.json", auto_map={"AutoConfig": "modeling_vtrans.VtransGPT2Config"})
    with pytest.raises(CheckpointError) as e:
        read_config(d)
    _one_line(e.value, "auto_map.AutoConfig='modeling_vtrans.VtransGPT2Config'", "'vtrans_bert'")


def test_non_vtrans_checkpoint_with_any_auto_map_is_refused(tmp_path: Path, marker: Path) -> None:
    d = tmp_path / "plain"
    tiny("bert", BertModel).save_pretrained(d)
    (d / "modeling_vtrans.py").write_text(_payload(marker))
    _edit_json(d / "config.json", auto_map={"AutoModel": "modeling_vtrans.VtransBertModel"})
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d)
    _one_line(e.value, "auto_map.AutoModel='modeling_vtrans.VtransBertModel'", "model_type 'bert' is not a vtrans")


@pytest.mark.parametrize("change", [
    {"auto_map": {"AutoTokenizer": ["evil.SomeTokenizer", None]}},
    {"tokenizer_class": "SomeTokenizer"},
], ids=["auto_map", "unknown-class"])
def test_tokenizer_asking_for_its_own_code_is_refused(ckpt: Path, tmp_path: Path, marker: Path, change) -> None:
    d = _copy(ckpt, tmp_path)
    (d / "evil.py").write_text(_payload(marker) + "class SomeTokenizer:\n    pass\n")
    _edit_json(d / "tokenizer_config.json", **change)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(d)
    key, value = next(iter(change.items()))
    _one_line(e.value, "tokenizer_config.json'", f"{key}={value!r}")


def test_custom_generate_code_never_runs(tmp_path: Path, marker: Path) -> None:
    """transformers imports ``custom_generate/generate.py`` of a directory loaded with trust_remote_code=True."""
    from transformers import GPT2LMHeadModel

    d = _compressed(tmp_path / "lm", "gpt2", GPT2LMHeadModel)
    (d / "custom_generate").mkdir()
    (d / "custom_generate" / "generate.py").write_text(_payload(marker) + "def generate(*a, **k):\n    pass\n")
    model = load_pretrained(d)
    assert model.generate(input_ids()[:1], max_new_tokens=2, do_sample=False).shape == (1, 14)


# --- the attacks, through the CLI -----------------------------------------------------------------------------------


def _cli_refused(argv: list[str], capsys, *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vtrans: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_cli_refuses_foreign_code(ckpt: Path, tmp_path: Path, marker: Path, capsys, monkeypatch) -> None:
    import pipelines.ray_runtime

    monkeypatch.setattr(pipelines.ray_runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.chdir(tmp_path)
    d = _copy(ckpt, tmp_path)
    (d / "evil.py").write_text(_payload(marker) + "class SomeClass:\n    pass\n")
    _edit_json(d / "config.json", auto_map={"AutoConfig": "evil.SomeClass"})
    needles = ("config.json'", "auto_map.AutoConfig='evil.SomeClass'")
    _cli_refused(["inspect", str(d)], capsys, *needles)
    _cli_refused(["validate", CONFIG, f"model.name={d}"], capsys, "model.name=", *needles)


def test_cli_runs_installed_code_not_the_stored_copy(ckpt: Path, tmp_path: Path, marker: Path, capsys) -> None:
    d = _copy(ckpt, tmp_path)
    code = d / "modeling_vtrans.py"
    code.write_text(code.read_text() + _payload(marker))
    _edit_json(d / "compression.json", modeling_sha256=hashlib.sha256(code.read_bytes()).hexdigest())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["inspect", str(d)]) == 0
        assert "VtransBertForSequenceClassification" in capsys.readouterr().out
        # validate reads the checkpoint (installed classes) and refuses to prune a compressed model again
        assert main(["validate", "--quiet", CONFIG, f"model.name={d}"]) == 2
    assert "already compressed by vtrans" in capsys.readouterr().err
    assert not marker.exists()


# --- what keeps working ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "cls"), CASES, ids=IDS)
def test_plain_transformers_loads_with_installed_classes(arch: str, cls, tmp_path: Path) -> None:
    """After ``import vtrans``, ``AutoModel*.from_pretrained(dir)`` needs no flag and equals vtrans's own load."""
    d = _compressed(tmp_path / "m", arch, cls)
    ours = load_pretrained(d).eval()
    task = vtrans.checkpoint.infer_task(ours.config)
    theirs = AUTO[task].from_pretrained(d).eval()
    assert type(theirs) is type(ours) and type(theirs).__module__ == "vtrans.modeling_vtrans"
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(main_output(theirs(input_ids=ids)), main_output(ours(input_ids=ids)))


def test_registration_is_idempotent() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    vtrans.checkpoint.register_auto_classes()
    vtrans.checkpoint.register_auto_classes()
    assert CONFIG_MAPPING["vtrans_llama"] is vtrans.modeling_vtrans.VtransLlamaConfig
    assert AutoModelForCausalLM._model_mapping[vtrans.modeling_vtrans.VtransGPT2Config] is (
        vtrans.modeling_vtrans.VtransGPT2LMHeadModel)


def test_trust_remote_code_is_not_accepted(ckpt: Path) -> None:
    with pytest.raises(vtrans.ConfigError, match="trust_remote_code=True is not accepted"):
        load_pretrained(ckpt, trust_remote_code=True)


# --- MLflow: the pyfunc and the registry, on a real SQLite store ------------------------------------------------------


@pytest.fixture
def tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from pipelines.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return Tracker.connect(uri, "security", artifact_location=(tmp_path / "mlartifacts").as_uri())


def _logged(tracker, ckpt: Path) -> str:
    from pipelines.stages.base import log_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return log_model(tracker, tracker.start_run("m"), str(ckpt), {})


def _stored_checkpoint(download_uri: str) -> Path:
    """The checkpoint folder inside the (local) artifact store: what an attacker with write access edits."""
    from urllib.parse import urlparse

    root = Path(urlparse(download_uri).path)
    (config,) = [c for c in root.rglob("config.json") if (c.parent / "model.safetensors").is_file()]
    return config.parent


def _tamper(d: Path, marker: Path) -> None:
    """Modified modeling code (its hash updated) and an auto_map to another module, both carrying the payload."""
    code = d / "modeling_vtrans.py"  # a logged model carries none: the attacker brings it
    code.write_text((code.read_text() if code.is_file() else "") + _payload(marker))
    _edit_json(d / "compression.json", modeling_sha256=hashlib.sha256(code.read_bytes()).hexdigest())
    (d / "evil.py").write_text(_payload(marker) + "class SomeClass:\n    pass\n")
    config = json.loads((d / "config.json").read_text())
    _edit_json(d / "config.json", auto_map={**config.get("auto_map", {}), "AutoConfig": "evil.SomeClass"})


@pytest.mark.integration
def test_pyfunc_loads_only_through_the_gated_loader(tracker, ckpt: Path, tmp_path: Path, marker: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import mlflow

    from pipelines.registry import load_checkpoint, load_transformers

    uri = _logged(tracker, ckpt)
    pyfunc = mlflow.pyfunc.load_model(uri)
    assert type(pyfunc.get_raw_model().model) is vtrans.modeling_vtrans.VtransBertForSequenceClassification
    assert len(pyfunc.predict(["a gripping film", "dull"])) == 2
    model, tokenizer = load_checkpoint(uri, tmp_path / "dl-good")
    assert torch.equal(model.classifier.weight, pyfunc.get_raw_model().model.classifier.weight)

    with monkeypatch.context() as m:  # without an installed vtrans the pyfunc refuses, in one line
        m.setitem(sys.modules, "vtrans", None)
        with pytest.raises(ImportError) as e:
            mlflow.pyfunc.load_model(uri)
        _one_line(e.value, "needs vtrans installed")

    _tamper(_stored_checkpoint(tracker.client.get_logged_model(uri.removeprefix("models:/")).artifact_location),
            marker)
    with pytest.raises(CheckpointError) as e:
        mlflow.pyfunc.load_model(uri)
    _one_line(e.value, "config.json'", "auto_map.AutoConfig='evil.SomeClass'")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(uri, tmp_path / "dl-bad")
    _one_line(e.value, "config.json'", "auto_map.AutoConfig='evil.SomeClass'")
    # MLflow's transformers loader would follow the auto_map with trust_remote_code=True: the gated one refuses first
    with pytest.raises(CheckpointError) as e:
        load_transformers(uri, tmp_path / "dl-pipe", tracker.uri)
    _one_line(e.value, "carries Python code", ".py'")


@pytest.mark.integration
def test_registry_alias_repointed_to_a_tampered_version(tracker, ckpt: Path, tmp_path: Path, marker: Path) -> None:
    import mlflow

    from pipelines.registry import load_checkpoint

    client = tracker.client
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        versions = [mlflow.register_model(_logged(tracker, ckpt), "sec-model").version for _ in range(2)]
    client.set_registered_model_alias("sec-model", "best", versions[0])
    model, _ = load_checkpoint("models:/sec-model@best", tmp_path / "dl-1")
    assert type(model) is vtrans.modeling_vtrans.VtransBertForSequenceClassification

    _tamper(_stored_checkpoint(client.get_model_version_download_uri("sec-model", versions[1])), marker)
    client.set_registered_model_alias("sec-model", "best", versions[1])  # the attacker re-points the alias
    with pytest.raises(CheckpointError) as e:
        load_checkpoint("models:/sec-model@best", tmp_path / "dl-2")
    _one_line(e.value, "config.json'", "auto_map.AutoConfig='evil.SomeClass'")
    with pytest.raises(CheckpointError) as e:
        mlflow.pyfunc.load_model("models:/sec-model@best")
    _one_line(e.value, "auto_map.AutoConfig='evil.SomeClass'")
    assert load_checkpoint(f"models:/sec-model/{versions[0]}", tmp_path / "dl-3")[0] is not None  # v1 untouched

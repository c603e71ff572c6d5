"""The ``vtrans`` CLI: bad input is a one-line typed error naming the argument and the value, and leaves no output;
the real MiniLM compresses and inspects end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertModel, DistilBertConfig, DistilBertModel

from pipelines.cli import main
from tests.tiny import tiny


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-bert")
    tiny("bert", BertModel).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("distilbert")
    DistilBertModel(DistilBertConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(d)
    return d


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("vtrans: error: "), err
    return err


def test_compress_tiny_model(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "small"
    assert main(["compress", "--model", str(tiny_bert_dir), "--budget", "params=0.6", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "params (blocks)" in text and "max |masked - compressed|" in text
    report = json.loads((out / "compression.json").read_text())
    assert report["method"] == "magnitude" and report["budget"]["value"] == 0.6
    assert report["compressed"]["params_blocks"] <= 0.6 * report["dense"]["params_blocks"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    assert main(["inspect", str(out)]) == 0
    assert f"{report['compressed']['params_blocks']:,}" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "needles"), [
    (["--model", "no-such-model"], ["'no-such-model'", "'minilm'"]),
    (["--budget", "params=1.5"], ["budget.params", "1.5"]),
    (["--budget", "params=0"], ["budget.params", "0"]),
    (["--budget", "params=0.5,flops=0.4"], ["exactly one of params, flops or latency", "0.4"]),
    (["--budget", "size=0.5"], ["'size=0.5'"]),
    (["--scope", "everything"], ["budget.scope", "'everything'"]),
    (["--scorer", "fisher"], ["--scorer", "'fisher'"]),
    (["--task", "translation"], ["--task", "'translation'"]),
    (["--out", "/dev/null/out"], ["--out parent", "'/dev/null'", "not a directory"]),
])
def test_compress_bad_input(args, needles, tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = {"--model": str(tiny_bert_dir), "--budget": "params=0.5", "--out": str(out)}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[flag] = value
        else:
            extra += [flag, value]
    err = _bad(["compress", *[x for kv in argv.items() for x in kv], *extra], capsys)
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


def test_unsupported_architecture(distilbert_dir: Path, tmp_path: Path, capsys) -> None:
    err = _bad(["compress", "--model", str(distilbert_dir), "--budget", "params=0.5", "--out",
                str(tmp_path / "o")], capsys)
    assert "'distilbert'" in err and "'bert'" in err


def test_existing_output_is_kept_without_overwrite(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = _bad(["compress", "--model", str(tiny_bert_dir), "--budget", "params=0.5", "--out", str(out)], capsys)
    assert "--overwrite" in err and str(out) in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_failure_mid_write_leaves_nothing(tiny_bert_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from vtrans import modeling_vtrans

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(modeling_vtrans.VtransMixin, "save_pretrained", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        main(["compress", "--model", str(tiny_bert_dir), "--budget", "params=0.5", "--out", str(out)])
    assert list(tmp_path.iterdir()) == []


def test_foreign_code_in_a_checkpoint_is_refused(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "small"
    assert main(["compress", "--model", str(tiny_bert_dir), "--budget", "params=0.6", "--out", str(out)]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "evil.SomeClass"
    (out / "config.json").write_text(json.dumps(config))
    err = _bad(["inspect", str(out)], capsys)
    assert "auto_map.AutoModel='evil.SomeClass' would run code stored with the checkpoint" in err


def test_help_lists_commands_with_examples() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "compress", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "example: vtrans compress --model minilm" in proc.stdout


@pytest.mark.integration
def test_minilm_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "minilm-p50"
    assert main(["compress", "--model", "minilm", "--scorer", "magnitude", "--budget", "params=0.5",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "params (blocks)" in text
    report = json.loads((out / "compression.json").read_text())
    assert report["dense"]["params_blocks"] == 10_646_784 and report["dense"]["params_total"] == 22_713_216
    assert 0.995 * 0.5 <= report["compressed"]["params_blocks"] / report["dense"]["params_blocks"] <= 0.5
    assert {"tokenizer.json", "model.safetensors", "modeling_vtrans.py"} <= {p.name for p in out.iterdir()}
    assert main(["inspect", "minilm"]) == 0
    assert "10,646,784" in capsys.readouterr().out


HEAVY = ("torch", "ray", "mlflow", "transformers")


def test_help_and_version_import_no_heavy_library() -> None:
    """``vtrans --help``, ``vtrans COMMAND --help`` and ``--version`` stay fast: nothing imports torch, Ray, MLflow or
    transformers until a command runs."""
    code = f"""
import contextlib, io, sys
import pipelines.cli as cli
parser = cli._parser()
commands = [a for a in parser._subparsers._group_actions[0].choices]
for argv in [["--help"], ["--version"], *[[c, "--help"] for c in commands]]:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        cli.main(argv)
    assert out.getvalue().strip(), argv
print(sorted(commands))
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    commands, loaded = proc.stdout.strip().splitlines()
    assert commands == str(["compress", "configs", "export", "inspect", "relog", "run", "sweep", "validate"])
    assert loaded == "[]"


def test_version_names_vtrans_and_its_stack(capsys) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"vtrans {version('vtrans')} (python ") and len(out.splitlines()) == 1
    for name in HEAVY:
        assert f"{name} {version(name)}" in out


@pytest.mark.parametrize(("argv", "expected"), [
    (["run", "c.yaml", "--force", "a=1", "b=2"], {"config": "c.yaml", "overrides": ["a=1", "b=2"], "force": True}),
    (["run", "--from", "prune", "c.yaml", "a=1"], {"overrides": ["a=1"], "from_stage": "prune"}),
    (["run", "c.yaml", "a=1", "--verbose", "b=2"], {"overrides": ["a=1", "b=2"], "verbose": True}),
    (["--verbose", "run", "c.yaml"], {"overrides": [], "verbose": True}),
    (["run", "c.yaml"], {"verbose": False, "force": False}),
    (["validate", "c.yaml", "a=1", "--quiet", "b=2"], {"overrides": ["a=1", "b=2"], "quiet": True}),
    (["sweep", "s.yaml", "sweep.seed=1", "--resume"], {"overrides": ["sweep.seed=1"], "resume": True}),
    (["inspect", "minilm", "--seq-len", "64"], {"model": "minilm", "seq_len": 64}),
    (["relog", "runs/x", "--tracking-uri", "http://h:1"], {"run_dir": "runs/x", "tracking_uri": "http://h:1"}),
])
def test_options_go_anywhere(argv, expected) -> None:
    from pipelines.cli import _parser

    args = vars(_parser().parse_args(argv))
    assert {k: args[k] for k in expected} == expected


def test_bad_option_after_positionals_is_still_an_error(capsys) -> None:
    from pipelines.cli import _parser

    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["run", "c.yaml", "a=1", "--forse"])
    assert e.value.code == 2 and "unrecognized arguments: --forse" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["inspect"], ["compress", "--budget", "params=0.5", "--out", "OUT", "--model"]])
def test_hub_id_not_in_the_offline_cache_is_one_line(command, tmp_path: Path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    err = _bad([*argv, "fake-org/no-such-model"], capsys)
    assert "'fake-org/no-such-model'" in err and "HF_HUB_OFFLINE=1" in err and "local Hugging Face cache" in err
    assert not (tmp_path / "out").exists()


def test_hub_id_from_the_local_cache(tiny_bert_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A hub id resolves to its snapshot in the Hugging Face cache layout (offline), then loads like a directory."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-bert"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_bert_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["inspect", "tiny-org/tiny-bert"]) == 0
    direct = capsys.readouterr().out
    assert f"model: {repo / 'snapshots' / commit}" in direct
    assert main(["inspect", str(tiny_bert_dir)]) == 0
    assert capsys.readouterr().out.split("\n", 1)[1] == direct.split("\n", 1)[1]  # the same counts

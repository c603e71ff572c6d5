"""The output root is checked before any compute: writable, and room for the pipeline's copies of the model."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from pipelines.validate import SPARE_BYTES, WEIGHT_COPIES, check_output_root
from vtrans.errors import ConfigError


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0" * 3 * 2**20)  # 3 MiB of "weights"
    return d


def test_a_writable_root_with_room_passes_and_nothing_is_written(model_dir: Path, tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    check_output_root(str(tmp_path / "new" / "runs"), model_dir)  # checked at tmp_path, where it would be created
    assert sorted(tmp_path.rglob("*")) == before


def test_an_unwritable_root_is_refused(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")  # not a directory (root ignores permission bits, so no chmod test)
    with pytest.raises(ConfigError, match=r"^output='.*a-file/runs' cannot be written \((FileExistsError|"
                                          r"NotADirectoryError)"):
        check_output_root(str(tmp_path / "a-file" / "runs"), model_dir)


def test_a_full_disk_is_refused_before_any_compute(model_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    need = WEIGHT_COPIES * 3 * 2**20 + SPARE_BYTES
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 * need, 9 * need, need - 1))
    with pytest.raises(ConfigError) as e:
        check_output_root(str(tmp_path / "runs"), model_dir)
    assert str(e.value) == (f"output={str(tmp_path / 'runs')!r} has {(need - 1) / 2**20:,.0f} MiB free; a pipeline of "
                            f"this model needs about {need / 2**20:,.0f} MiB ({WEIGHT_COPIES} copies of its 3 MiB of "
                            f"weights and room for data); free space or choose another output")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 * need, 9 * need, need))
    check_output_root(str(tmp_path / "runs"), model_dir)


def test_vtrans_validate_reports_it(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.cli import main
    from tests.pipelines.test_config import MINILM

    (tmp_path / "a-file").write_text("x")
    assert main(["validate", str(MINILM), f"output={tmp_path / 'a-file' / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtrans: error: output=") and "cannot be written" in err and "\n" not in err


def test_lora_target_modules_naming_nothing_fail_before_any_work(tmp_path: Path, capsys) -> None:
    from pipelines.cli import main
    from tests.pipelines.test_config import MINILM

    # MiniLM is a BERT: its projections are query / key / value / dense, not Llama's q_proj
    assert main(["validate", str(MINILM), "finetune.method=lora", "finetune.lora.target_modules=[query, q_proj]",
                 f"output={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtrans: error: finetune.lora.target_modules names 'q_proj', which matches no Linear "
                          "layer of BertForSequenceClassification") and "\n" not in err
    # no fine-tune stage, but LoRA fine-tunes between two pruning rounds: the same check, on the dense model
    assert main(["validate", str(MINILM), "finetune.method=lora", "finetune.steps=0", "prune.method=vtrans",
                 "prune.rounds=2", "finetune.lora.target_modules=[q_proj]", f"output={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtrans: error: finetune.lora.target_modules names 'q_proj'") and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_lora_without_peft_fails_before_any_work(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where peft cannot be imported (a --no-deps install), ``finetune.method=lora`` is one line before any work."""
    import sys

    from pipelines.cli import main
    from tests.pipelines.test_config import MINILM

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    assert main(["validate", str(MINILM), "finetune.method=lora", f"output={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtrans: error: finetune.method='lora' needs peft, which cannot be imported") and (
        "\n" not in err)
    assert not (tmp_path / "runs").exists()


def test_an_unknown_lm_eval_task_fails_before_any_work(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """``vtrans validate`` (what ``vtrans run`` checks before Ray) refuses a task lm-eval does not know, naming the list
    item, the value and the closest task (lm-eval's index of its own tasks stubbed: building it takes a minute)."""
    from pipelines.cli import main
    from tests.pipelines.test_config import SMOLLM2
    from vtrans import lm_eval

    class Index:
        all_tasks = ["lambada_local", "lambada_openai", "arc_easy"]

    monkeypatch.setattr(lm_eval, "_task_manager", lambda include_defaults: Index())
    assert main(["validate", str(SMOLLM2), "evaluate.lm_eval_tasks=[lambada_local, arc_easyy]",
                 f"output={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtrans: error: evaluate.lm_eval_tasks[1]='arc_easyy' is not one of lm-eval's tasks")
    assert "did you mean 'arc_easy'?" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()

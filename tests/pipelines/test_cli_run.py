"""``vtrans run`` / ``vtrans validate``: every bad input fails in one line naming the key and the value, before Ray
starts and before the tracking store is touched; shipped configs validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
MINILM = str(CONFIGS / "minilm-rotten-tomatoes.yaml")


@pytest.fixture(autouse=True)
def no_side_effects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run in an empty directory; afterwards neither Ray nor an MLflow store may exist."""
    import ray

    import pipelines.ray_runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("the pipeline went as far as starting Ray")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(pipelines.ray_runtime, "init_ray", no_ray)
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "Ray was started"
    assert not (tmp_path / "mlflow.db").exists(), "the tracking store was touched"
    assert not (tmp_path / "runs").exists(), "an output was written"


@pytest.mark.parametrize(("overrides", "needles"), [
    (["prune.budget.parms=0.5"], ["prune.budget.parms", "did you mean 'prune.budget.params'"]),
    (["prune.steps=many"], ["prune.steps", "'many'"]),
    (["prune.method=fastest"], ["prune.method", "'fastest'"]),
    (["prune.budget.params=1.5"], ["budget.params", "1.5"]),
    (["prune.budget.params=1.0e-5"], ["params=1e-05", "cannot be met"]),  # unreachable for MiniLM's structures
    (["model.name=no-such-model"], ["model.name", "'no-such-model'"]),
    (["data.name=imdb"], ["data.name", "'imdb'"]),
    (["evaluate.latency_seq_lens=[1024]"], ["evaluate.latency_seq_lens", "1024", "512"]),
    (["ray.num_workers=3"], ["prune.batch_size=16", "ray.num_workers=3"]),
    (["ray.cpus_per_worker=1000"], ["ray.cpus_per_worker=1000", "needs 2000 CPUs"]),
    (["evaluate.threads=100000"], ["evaluate.threads=100000", "CPUs"]),
    (["tracking.uri=file:///tmp/mlruns"], ["tracking.uri", "file:///tmp/mlruns"]),
    (["prune.budget.params"], ["override 'prune.budget.params'", "key=value"]),
])
def test_bad_input_fails_before_ray(overrides: list[str], needles: list[str], capsys) -> None:
    for command in ("run", "validate"):
        assert main([command, MINILM, *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("vtrans: error: "), err
        for needle in needles:
            assert needle in err, (needle, err)


def test_bad_from_stage_and_missing_file(capsys) -> None:
    assert main(["run", MINILM, "--from", "prunes"]) == 2
    assert "--from must be one of" in capsys.readouterr().err
    assert main(["run", "nope.yaml"]) == 2
    assert "config file 'nope.yaml' not found" in capsys.readouterr().err


def test_unreachable_tracking_server_fails_before_ray(capsys) -> None:
    from pipelines.ray_runtime import free_port

    port = free_port()
    assert main(["run", MINILM, f"tracking.uri=http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"tracking.uri='http://127.0.0.1:{port}': no MLflow server answers there" in err


def test_validate_prints_the_resolved_config_and_the_plan(capsys) -> None:
    assert main(["validate", MINILM, "prune.budget.params=0.3"]) == 0
    out = capsys.readouterr().out
    assert "params: 0.3" in out and "calibrate" in out and out.count("to run") == 5
    assert out.rstrip().endswith("minilm-rotten-tomatoes.yaml: valid")
    assert main(["validate", "--quiet", MINILM]) == 0
    assert capsys.readouterr().out == ""

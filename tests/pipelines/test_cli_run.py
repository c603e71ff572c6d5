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


@pytest.mark.parametrize("name", ["minilm-rotten-tomatoes", "minilm-rotten-tomatoes.yaml"])
def test_a_shipped_config_by_name(name: str, capsys) -> None:
    from pipelines.cli import resolve_config

    assert Path(resolve_config(name)) == CONFIGS / "minilm-rotten-tomatoes.yaml"  # no such file in the cwd
    assert main(["validate", name, "prune.budget.params=0.3", "--quiet"]) == 0, capsys.readouterr().err


def test_a_local_file_wins_over_a_shipped_name(tmp_path: Path) -> None:
    from pipelines.cli import resolve_config

    (tmp_path / "sweep-minilm").write_text("model: {}\n")
    assert resolve_config("sweep-minilm") == "sweep-minilm"


def test_an_unknown_config_name_lists_the_shipped_ones(capsys) -> None:
    assert main(["run", "minilm-rotten-tomato", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'minilm-rotten-tomato'" in err
    assert "did you mean 'minilm-rotten-tomatoes'?" in err
    assert "['minilm-rotten-tomatoes', 'smollm2-wikipedia', 'sweep-minilm']" in err


def test_configs_lists_every_shipped_config_with_its_description(capsys) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert [line.split()[0] for line in lines[: len(shipped)]] == shipped
    assert lines[0].split(None, 1)[1].startswith("all-MiniLM-L6-v2 on Rotten Tomatoes: fine-tune a dense teacher")
    assert all(len(line) < 140 for line in lines[: len(shipped)])


def test_validate_checks_a_sweep_without_running_it(capsys) -> None:
    over = ["sweep.space={prune.budget.params: [0.5, 0.3]}", "sweep.models={minilm: {}, minilm-fast: "
            "{prune.method: fast}}"]
    assert main(["validate", "sweep-minilm", *over]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "2 model(s) x 4 trial(s) = 8 trials" in out  # budgets x the file's two KL weights
    assert "minilm-fast" in out and "0/4" in out and ": valid" in out
    assert main(["validate", "sweep-minilm", *over, "--quiet"]) == 0 and capsys.readouterr().out == ""
    # a grid point that cannot be met fails as `vtrans sweep` would, naming the point
    assert main(["validate", "sweep-minilm", "sweep.space={prune.budget.params: [1.0e-5]}"]) == 2
    err = capsys.readouterr().err
    assert "params=1e-05" in err and "cannot be met" in err

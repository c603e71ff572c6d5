"""Registering a Pareto front in the MLflow model registry: alias rules (pure) and a real SQLite store."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from pipelines.registry import FrontPoint, choose_aliases, register_front, registered_name
from pipelines.tracking import global_tracking_uri
from vtrans.errors import ConfigError

MODEL_CODE = '''
import mlflow
from mlflow.pyfunc import PythonModel


class Constant(PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[float]:
        return [{value!r}] * len(model_input)


mlflow.models.set_model(Constant())
'''


def _point(i: int, quality: float, ratio: float, higher: bool = True, key: str = "accuracy") -> FrontPoint:
    return FrontPoint(model_uri=f"models:/m-{i:032x}", run_id=f"run{i}", quality=quality, quality_key=key,
                      higher_is_better=higher, params_blocks_ratio=ratio, tags={"budget": str(ratio)})


# --- alias rules, no MLflow ------------------------------------------------------------------------------------------


def test_aliases_accuracy_front() -> None:
    pts = [_point(0, 0.912, 1.0), _point(1, 0.905, 0.7), _point(2, 0.902, 0.5), _point(3, 0.85, 0.3)]
    assert choose_aliases(pts, dense_quality=0.91) == {
        "best": 0, "smallest-within-1pt": 2, "p100": 0, "p70": 1, "p50": 2, "p30": 3,
    }
    # exactly one point below the dense model counts as within (0.91 - 0.01 is 0.9000000000000001 in floats)
    pts[2].quality = 0.90
    assert choose_aliases(pts, dense_quality=0.91)["smallest-within-1pt"] == 2
    pts[2].quality = 0.899
    assert choose_aliases(pts, dense_quality=0.91)["smallest-within-1pt"] == 1
    assert choose_aliases(pts, dense_quality=0.91, within=0.2)["smallest-within-1pt"] == 3
    # no dense model, or nothing within reach: no smallest-within-1pt alias
    assert "smallest-within-1pt" not in choose_aliases(pts, dense_quality=None)
    assert "smallest-within-1pt" not in choose_aliases(pts, dense_quality=0.95)


def test_aliases_ties_and_one_point() -> None:
    # equal best quality: the smaller model is best; equal ratio within reach: the better one is smallest
    pts = [_point(0, 0.9, 0.8), _point(1, 0.9, 0.6), _point(2, 0.89, 0.6)]
    a = choose_aliases(pts, dense_quality=0.9)
    assert a["best"] == 1 and a["smallest-within-1pt"] == 1
    # p60: both at exactly 60 % -> higher quality wins; the loser gets no p alias
    assert a["p60"] == 1 and a["p80"] == 0 and sorted(a) == ["best", "p60", "p80", "smallest-within-1pt"]
    # same NN from different ratios: the nearest to NN % wins even when its quality is worse
    pts = [_point(0, 0.95, 0.504), _point(1, 0.90, 0.498)]
    assert choose_aliases(pts, None) == {"best": 0, "p50": 1}
    # halves round up: 0.125 -> p13 (round() would give p12), 0.29 -> p29 despite 0.29 * 100 = 28.999...
    assert set(choose_aliases([_point(0, 0.5, 0.125), _point(1, 0.4, 0.29)], None)) == {"best", "p13", "p29"}
    assert choose_aliases([_point(0, 0.5, 0.4)], dense_quality=0.5) == {"best": 0, "smallest-within-1pt": 0, "p40": 0}
    assert choose_aliases([], dense_quality=0.5) == {}


def test_aliases_perplexity_is_lower_is_better_and_relative() -> None:
    pts = [_point(i, q, r, higher=False, key="perplexity") for i, (q, r) in
           enumerate([(20.0, 1.0), (20.15, 0.6), (20.25, 0.5), (25.0, 0.3)])]
    # dense 20.0: within 1 % means <= 20.2, so 20.15 at 60 % qualifies and 20.25 at 50 % does not
    assert choose_aliases(pts, dense_quality=20.0) == {
        "best": 0, "smallest-within-1pt": 1, "p100": 0, "p60": 1, "p50": 2, "p30": 3,
    }
    assert "smallest-within-1pt" not in choose_aliases(pts, dense_quality=10.0)


def test_bad_points_and_arguments() -> None:
    with pytest.raises(ConfigError, match=r"model_uri must look like .*'runs:/abc/model'"):
        FrontPoint("runs:/abc/model", "r", 0.9, "accuracy", True, 0.5)
    with pytest.raises(ConfigError, match=r"params_blocks_ratio must be a number in \[0, 1\], got 1.5"):
        FrontPoint("models:/m-1", "r", 0.9, "accuracy", True, 1.5)
    with pytest.raises(ConfigError, match=r"quality must be a finite number, got nan"):
        FrontPoint("models:/m-1", "r", float("nan"), "accuracy", True, 0.5)
    with pytest.raises(ConfigError, match=r"may not set \['quality'\]"):
        FrontPoint("models:/m-1", "r", 0.9, "accuracy", True, 0.5, tags={"quality": "1"})
    with pytest.raises(ConfigError, match="disagree on higher_is_better"):
        choose_aliases([_point(0, 0.9, 0.5), _point(1, 9.0, 0.4, higher=False)], None)
    with pytest.raises(ConfigError, match="within must be a number >= 0, got -0.1"):
        choose_aliases([_point(0, 0.9, 0.5)], None, within=-0.1)


def test_registered_name() -> None:
    assert registered_name("{model}-{task}-vtrans", "minilm", "seq-cls") == "minilm-seq-cls-vtrans"
    assert registered_name("{model}-{task}", "sentence-transformers/all-MiniLM-L6-v2", "seq cls") == (
        "sentence-transformers-all-MiniLM-L6-v2-seq-cls"
    )
    assert registered_name("{model}", "/x:y@z/", "t") == "x-y-z"
    with pytest.raises(ConfigError, match=r"template '\{model\}-\{arch\}' has unknown placeholder \{arch\}"):
        registered_name("{model}-{arch}", "m", "t")
    with pytest.raises(ConfigError, match=r"template '\{\}-x' has unknown placeholder \{\}"):
        registered_name("{}-x", "m", "t")
    with pytest.raises(ConfigError, match=r"template '\{model' is not a valid format string"):
        registered_name("{model", "m", "t")
    with pytest.raises(ConfigError, match="gives an empty name"):
        registered_name("{model}", "//", "t")


# --- a real SQLite store ---------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An MLflow client on a fresh SQLite store while the process-global tracking URI points at another store
    (register_front must use the client's); MLflow's global URI and the environment are restored afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    client.create_experiment("sweep", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return client


def _log_models(client, tmp_path: Path, values: list[float]) -> list[tuple[str, str]]:
    """One run per value, each with a pyfunc that predicts that constant; returns (model_uri, run_id) pairs."""
    import mlflow

    exp_id = client.get_experiment_by_name("sweep").experiment_id
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    out = []
    try:
        for i, value in enumerate(values):
            code = tmp_path / f"model_{i}.py"
            code.write_text(MODEL_CODE.format(value=value))
            with mlflow.start_run(experiment_id=exp_id) as run, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=["mlflow"])
            out.append((info.model_uri, run.info.run_id))
    finally:
        mlflow.set_tracking_uri(previous)  # register_front must not rely on the global URI
    return out


def _load(name: str, alias: str, client) -> float:
    import mlflow

    with global_tracking_uri(client.tracking_uri):
        return mlflow.pyfunc.load_model(f"models:/{name}@{alias}").predict(["x"])[0]


def test_register_front_on_sqlite(store, tmp_path: Path) -> None:
    client = store
    # (quality, ratio); each model predicts its own quality, so loading an alias shows which model it is
    spec = [(0.912, 1.0), (0.905, 0.7), (0.902, 0.5), (0.85, 0.3)]
    logged = _log_models(client, tmp_path, [q for q, _ in spec])
    points = [FrontPoint(uri, run, q, "accuracy", True, r, tags={"budget": str(r), "method": "vib", "speedup": "1.5"})
              for (uri, run), (q, r) in zip(logged, spec, strict=True)]
    name = registered_name("{model}-{task}-vtrans", "minilm", "seq-cls")

    out = register_front(client, name, points, dense_quality=0.91, description="vtrans front")
    assert [o["version"] for o in out] == [1, 2, 3, 4]
    assert [o["model_uri"] for o in out] == [uri for uri, _ in logged]
    assert [sorted(o["aliases"]) for o in out] == [["best", "p100"], ["p70"], ["p50", "smallest-within-1pt"], ["p30"]]
    assert client.get_registered_model(name).description == "vtrans front"
    assert client.get_registered_model(name).aliases == {
        "best": 1, "p100": 1, "p70": 2, "p50": 3, "smallest-within-1pt": 3, "p30": 4,
    }
    mv = client.get_model_version(name, "3")
    assert mv.status == "READY" and mv.source == logged[2][0] and mv.run_id == logged[2][1]
    assert mv.tags == {"budget": "0.5", "method": "vib", "speedup": "1.5", "quality": "0.902",
                       "quality_key": "accuracy", "params_blocks_ratio": "0.5"}
    # the logged model links back to its version, as with mlflow.register_model
    assert '"version": "3"' in client.get_logged_model(logged[2][0][len("models:/"):]).tags["mlflow.modelVersions"]
    assert _load(name, "best", client) == pytest.approx(0.912)
    assert _load(name, "smallest-within-1pt", client) == pytest.approx(0.902)
    assert _load(name, "p30", client) == pytest.approx(0.85)

    # a re-run creates no version and moves nothing; changed tags are refreshed
    points[1].tags["speedup"] = "2.0"
    again = register_front(client, name, points, dense_quality=0.91)
    assert [o["version"] for o in again] == [1, 2, 3, 4]
    assert len(client.search_model_versions(f"name = '{name}'")) == 4
    assert client.get_model_version(name, "2").tags["speedup"] == "2.0"

    # a stricter dense model: no point is within one point any more, so the stale alias is deleted;
    # a user's own alias is left alone
    client.set_registered_model_alias(name, "production", "2")
    third = register_front(client, name, points[:2], dense_quality=0.95)
    assert [o["version"] for o in third] == [1, 2]
    assert client.get_registered_model(name).aliases == {"best": 1, "p100": 1, "p70": 2, "production": 2}
    assert len(client.search_model_versions(f"name = '{name}'")) == 4


def test_register_perplexity_front(store, tmp_path: Path) -> None:
    client = store
    spec = [(20.0, 1.0), (20.15, 0.6), (25.0, 0.3)]  # lower is better
    logged = _log_models(client, tmp_path, [q for q, _ in spec])
    points = [FrontPoint(uri, run, q, "perplexity", False, r) for (uri, run), (q, r) in zip(logged, spec, strict=True)]
    out = register_front(client, "gpt-lm-vtrans", points, dense_quality=20.0)
    assert [o["version"] for o in out] == [1, 2, 3]
    assert client.get_registered_model("gpt-lm-vtrans").aliases == {
        "best": 1, "p100": 1, "smallest-within-1pt": 2, "p60": 2, "p30": 3,
    }
    assert _load("gpt-lm-vtrans", "best", client) == pytest.approx(20.0)
    assert client.get_model_version("gpt-lm-vtrans", "3").tags["quality_key"] == "perplexity"

"""The in-process driver (``pipelines.dag.run_in_process``) on stand-in stages, and the typed stage products."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from pipelines.config import PipelineConfig, from_dict
from pipelines.dag import run_in_process
from pipelines.stages import BY_NAME, NAMES, STAGES
from pipelines.stages.base import RECORD, StageContext, StageOutput, stage_key
from pipelines.stages.products import Data, Evaluation, Pruned, Trained
from vtrans.errors import ConfigError


class Standin:
    """A stage's name, needs, key material and version, with work that records its call and hands on its inputs'
    names."""

    def __init__(self, stage, calls: list) -> None:
        self.NAME, self.NEEDS, self.VERSION, self.OPTIONS = stage.NAME, stage.NEEDS, stage.VERSION, stage.OPTIONS
        self.material = stage.material
        self.calls = calls

    def run(self, ctx, work: Path, inputs: dict, run_id: str | None) -> StageOutput:
        self.calls.append((self.NAME, sorted(inputs)))
        (work / "made").write_text(self.NAME)
        return StageOutput(outputs={"made": str(work / "made")}, metrics={"inputs": float(len(inputs))},
                           info={"from": sorted(inputs)})


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """The graph's stages replaced by stand-ins; the list of their calls."""
    import pipelines.dag

    made: list = []
    monkeypatch.setattr(pipelines.dag, "STAGES", tuple(Standin(s, made) for s in STAGES))
    return made


@pytest.fixture
def ctx(tmp_path: Path) -> StageContext:
    cfg = from_dict(PipelineConfig, {"name": "t", "model": {"name": "minilm", "task": "seq-cls"},
                                     "data": {"name": "rotten_tomatoes"}, "output": str(tmp_path)})
    keys: dict[str, str] = {}
    for stage in STAGES:
        keys[stage.NAME] = stage_key(stage, cfg, {n: keys[n] for n in stage.NEEDS})
    return StageContext(config=cfg, root=str(tmp_path), keys=keys)


def test_runs_every_stage_in_order_with_its_needs_then_finds_them_finished(ctx: StageContext, calls: list) -> None:
    results = run_in_process(ctx)
    assert list(results) == list(NAMES) and {r.status for r in results.values()} == {"ran"}
    assert calls == [(s.NAME, sorted(s.NEEDS)) for s in STAGES]
    for name, r in results.items():  # each in the pipeline's cache folder, under the real stage's key
        assert Path(r.dir) == ctx.stage_dir(name) and r.key == ctx.keys[name]
        assert json.loads((Path(r.dir) / RECORD).read_text())["metrics"]["inputs"] == len(BY_NAME[name].NEEDS)
    again = run_in_process(ctx)
    assert len(calls) == len(NAMES) and {r.status for r in again.values()} == {"cached"}


def test_a_part_of_the_graph_with_given_results_and_a_wrapper_round_each_stage(ctx: StageContext, calls: list) -> None:
    first = run_in_process(ctx, ("calibrate", "teacher"))
    assert list(first) == ["calibrate", "teacher"]
    seen: list[str] = []

    @contextlib.contextmanager
    def around(name: str):
        seen.append(f"enter {name}")
        yield
        seen.append(f"leave {name}")

    rest = run_in_process(ctx, ("prune", "finetune"), given=first, around=around)
    assert list(rest) == ["prune", "finetune"]
    assert seen == ["enter prune", "leave prune", "enter finetune", "leave finetune"]
    assert calls[-2:] == [("prune", ["calibrate", "teacher"]), ("finetune", ["calibrate", "prune", "teacher"])]


def test_a_stage_whose_needs_are_missing_or_an_unknown_stage_is_refused_before_any_work(ctx: StageContext,
                                                                                         calls: list) -> None:
    with pytest.raises(ConfigError, match=r"stage 'prune' needs \['calibrate', 'teacher'\]"):
        run_in_process(ctx, ("prune",))
    with pytest.raises(ConfigError, match=r"stages must be among .*got \['tune'\]"):
        run_in_process(ctx, ("calibrate", "tune"))
    assert calls == []


def test_products_read_what_the_stages_record() -> None:
    data = Data(splits={"train": "/d/train.parquet", "test": "/d/test.parquet", "calibration": "/d/c.parquet"},
                pad_token_id=0, num_labels=2, label_names=["rotten", "fresh"])
    out = StageOutput(outputs=dict(data.splits), info={"summary": {}, **data.info()})
    assert Data.of(out) == data
    assert data.info() == {"pad_token_id": 0, "num_labels": 2, "label_names": ["rotten", "fresh"]}
    assert Data(splits={}, pad_token_id=3).info() == {"pad_token_id": 3}  # causal-lm: no labels recorded

    assert Trained.of(StageOutput(outputs=Trained("/m").outputs())) == Trained("/m")
    pruned = Pruned(compressed="/p/c", masks="/p/m.safetensors", report="/p/c/compression.json", plot="/p/l.png")
    assert pruned.outputs() == {"compressed": "/p/c", "masks": "/p/m.safetensors",
                                "report": "/p/c/compression.json", "plot": "/p/l.png"}  # no posterior: no key
    assert Pruned.of(StageOutput(outputs=pruned.outputs())) == pruned
    assert Pruned.of(StageOutput(outputs={"compressed": "/p/c", "posterior": "/p/post"})).posterior == "/p/post"
    ev = Evaluation(report_md="/e/report.md", report="/e/report.json", logged_model_dir="/m")
    assert Evaluation.of(StageOutput(outputs=ev.outputs())) == ev
    assert Evaluation(report_md="/e/r.md").outputs() == {"report_md": "/e/r.md"}


class _StoreDiesAtEnd:
    """A tracker whose store answers every write of a stage's run, then dies on the run's ``end_run``: the run stays
    RUNNING in the store (what a store lost between a stage's logging and its end leaves)."""

    def __init__(self) -> None:
        self.offline, self.runs = False, 0

    @property
    def online(self) -> bool:
        return not self.offline

    def start_run(self, name, parent_run_id=None, params=None, tags=None) -> str:
        self.runs += 1
        return f"run-{self.runs}"

    def end_run(self, run_id, status="FINISHED") -> None:
        self.offline = True  # the call that would end the run fails: the tracker goes offline

    def __getattr__(self, name):  # log_metrics, set_tags, log_history, log_artifacts, log_datasets: answered
        return lambda *args, **kwargs: None


def test_a_stage_whose_run_could_not_be_ended_is_recorded_not_logged(ctx: StageContext, calls: list) -> None:
    import dataclasses

    ctx = dataclasses.replace(ctx, tracker=_StoreDiesAtEnd(), parent_run_id="parent")
    result = run_in_process(ctx, ("calibrate",))["calibrate"]
    record = json.loads((Path(result.dir) / RECORD).read_text())
    assert result.status == "ran" and result.run_id == "run-1"
    assert result.logged is False and record["logged"] is False  # so `vtrans relog` ends the run and re-logs it

"""Pareto fronts: exact index lists on hand-checkable sets, and a brute-force cross-check on random ties."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.pareto import Objective, front_table, fronts, pareto_front, plot_front, text_plot
from vtrans.errors import ConfigError

ACC, PARAMS, LAT = Objective("accuracy", "max"), Objective("params", "min"), Objective("latency", "min")

# index: (accuracy, params) -- why it is (not) on the front
EIGHT = [
    (0.90, 100),  # 0 front
    (0.85, 60),  # 1 front
    (0.80, 70),  # 2 dominated by 1
    (0.70, 30),  # 3 front
    (0.88, 120),  # 4 dominated by 0
    (0.60, 30),  # 5 dominated by 3 (equal params, lower accuracy)
    (0.92, 200),  # 6 front
    (0.50, 10),  # 7 front
]


def _pts(pairs: list[tuple[float, float]]) -> list[dict[str, float]]:
    return [{"accuracy": a, "params": p} for a, p in pairs]


def test_hand_made_front_sorted_by_first_objective() -> None:
    assert pareto_front(_pts(EIGHT), [ACC, PARAMS]) == [6, 0, 1, 3, 7]


def test_first_objective_minimised_sorts_ascending() -> None:
    assert pareto_front(_pts(EIGHT), [PARAMS, ACC]) == [7, 3, 1, 0, 6]


def test_equal_accuracy_only_smaller_params_on_front() -> None:
    assert pareto_front(_pts([(0.9, 100), (0.9, 80)]), [ACC, PARAMS]) == [1]


def test_exact_duplicates_all_on_front_dedupe_keeps_lowest_index() -> None:
    points = _pts([(0.9, 100), (0.8, 50), (0.9, 100), (0.7, 60), (0.8, 50)])
    assert pareto_front(points, [ACC, PARAMS]) == [0, 2, 1, 4]
    assert pareto_front(points, [ACC, PARAMS], dedupe=True) == [0, 1]


def test_duplicates_of_a_dominated_point_are_all_off() -> None:
    assert pareto_front(_pts([(0.8, 100), (0.9, 50), (0.8, 100)]), [ACC, PARAMS]) == [1]


def test_empty_and_one_point() -> None:
    assert pareto_front([], [ACC, PARAMS]) == []
    assert pareto_front(_pts([(0.5, 10)]), [ACC, PARAMS]) == [0]


def test_three_objectives() -> None:
    points = [
        {"accuracy": 0.90, "params": 100, "latency": 10},  # 0 front
        {"accuracy": 0.90, "params": 100, "latency": 12},  # 1 dominated by 0 (latency)
        {"accuracy": 0.80, "params": 50, "latency": 20},  # 2 front (fewest params)
        {"accuracy": 0.80, "params": 60, "latency": 5},  # 3 front (lowest latency)
        {"accuracy": 0.70, "params": 60, "latency": 6},  # 4 dominated by 3
        {"accuracy": 0.85, "params": 100, "latency": 30},  # 5 dominated by 0
    ]
    assert pareto_front(points, [ACC, PARAMS, LAT]) == [0, 2, 3]
    assert pareto_front(points, [ACC, PARAMS]) == [0, 1, 2]  # without latency, 3 loses to 2 and 1 ties 0


def test_strict_trade_off_puts_every_point_on_front() -> None:
    points = _pts([(0.5, 10), (0.9, 50), (0.7, 30), (0.6, 20), (0.8, 40)])
    assert pareto_front(points, [ACC, PARAMS]) == [1, 4, 2, 3, 0]


def test_nan_is_an_error_naming_index_and_key() -> None:
    points = _pts(EIGHT)
    points[3]["params"] = math.nan
    with pytest.raises(ConfigError, match=r"point 3: 'params' is NaN"):
        pareto_front(points, [ACC, PARAMS])


def test_missing_key_is_an_error_naming_index_and_key() -> None:
    points = _pts(EIGHT)
    del points[5]["accuracy"]
    with pytest.raises(ConfigError, match=r"point 5 has no key 'accuracy'"):
        pareto_front(points, [ACC, PARAMS])


def test_non_number_and_no_objectives_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"point 0: 'params' must be a number, got '10'"):
        pareto_front([{"accuracy": 0.5, "params": "10"}], [ACC, PARAMS])
    with pytest.raises(ConfigError, match="at least one objective"):
        pareto_front(_pts(EIGHT), [])


def test_objective_parse() -> None:
    assert Objective.parse("accuracy:max") == ACC
    assert Objective.parse("eval:loss:min") == Objective("eval:loss", "min")
    with pytest.raises(ConfigError, match=r"'accuracy'"):
        Objective.parse("accuracy")
    with pytest.raises(ConfigError, match=r"objective 'accuracy': goal must be one of \['max', 'min'\], got 'up'"):
        Objective.parse("accuracy:up")


def _naive_front(points: list[dict[str, float]], objectives: list[Objective], dedupe: bool = False) -> list[int]:
    def key(p: dict[str, float]) -> list[float]:
        return [p[o.key] if o.goal == "max" else -p[o.key] for o in objectives]

    vals = [key(p) for p in points]
    front = []
    for i, a in enumerate(vals):
        dominated = any(
            all(x >= y for x, y in zip(b, a, strict=True)) and any(x > y for x, y in zip(b, a, strict=True))
            for b in vals
        )
        if not dominated and not (dedupe and any(vals[j] == a for j in front)):
            front.append(i)
    return sorted(front, key=lambda i: (-vals[i][0], i))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_matches_brute_force_on_random_points(seed: int, decimals: int) -> None:
    rng = np.random.default_rng(seed)
    objectives = [ACC, PARAMS, LAT]
    raw = np.round(rng.random((200, 3)), decimals)  # coarse rounding forces ties and exact duplicates
    points = [dict(zip(("accuracy", "params", "latency"), map(float, r), strict=True)) for r in raw]
    for objs in (objectives, objectives[:2]):
        assert pareto_front(points, objs) == _naive_front(points, objs)
        assert pareto_front(points, objs, dedupe=True) == _naive_front(points, objs, dedupe=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=30), st.booleans())
def test_matches_brute_force_on_small_integer_grids(pairs: list[tuple[int, int]], dedupe: bool) -> None:
    points = _pts([(float(a), float(p)) for a, p in pairs])
    assert pareto_front(points, [ACC, PARAMS], dedupe=dedupe) == _naive_front(points, [ACC, PARAMS], dedupe)


def _rows() -> list[dict[str, float]]:
    return [
        {"accuracy": 0.90, "params_blocks": 100, "flops_total": 5.0},  # 0
        {"accuracy": 0.80, "params_blocks": 50, "flops_total": 6.0},  # 1 dominated on flops by 0
        {"accuracy": 0.70, "params_blocks": 60, "flops_total": 1.0},  # 2 dominated on params by 1
    ]


def test_fronts_skips_a_size_key_absent_from_every_row() -> None:
    assert fronts(_rows(), ACC) == {"params_blocks": [0, 1], "flops_total": [0, 2]}


def test_fronts_rejects_a_size_key_absent_from_some_rows() -> None:
    rows = _rows()
    rows[1]["latency_ms"] = 3.0
    with pytest.raises(ConfigError, match=r"size key 'latency_ms' is missing from rows \[0, 2\]"):
        fronts(rows, ACC)


def test_front_table_in_front_order() -> None:
    rows = _rows()
    assert front_table(rows, [2, 0], ["accuracy", "flops_total"]) == [
        {"accuracy": 0.70, "flops_total": 1.0},
        {"accuracy": 0.90, "flops_total": 5.0},
    ]
    with pytest.raises(ConfigError, match=r"row 0 has no column\(s\) \['latency_ms'\]"):
        front_table(rows, [0], ["accuracy", "latency_ms"])


def test_plot_front_writes_png(tmp_path: Path) -> None:
    rows = [{"accuracy": a, "params_blocks": p} for a, p in EIGHT]
    front = fronts(rows, ACC, size_keys=("params_blocks",))["params_blocks"]
    assert front == [6, 0, 1, 3, 7]
    out = plot_front(rows, front, "params_blocks", "accuracy", tmp_path / "front.png",
                     dense={"accuracy": 0.93, "params_blocks": 250}, title="sweep",
                     labels=[f"run{i}" for i in range(len(rows))])
    assert out == tmp_path / "front.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_front_rejects_bad_front_and_labels(tmp_path: Path) -> None:
    rows = [{"accuracy": a, "params_blocks": p} for a, p in EIGHT]
    with pytest.raises(ConfigError, match=r"front index 8 is out of range for 8 rows"):
        plot_front(rows, [8], "params_blocks", "accuracy", tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"labels must have one entry per row \(8\), got 2"):
        plot_front(rows, [0], "params_blocks", "accuracy", tmp_path / "x.png", labels=["a", "b"])


def test_text_plot_places_every_point_in_its_cell() -> None:
    rows = [{"params_blocks": 0, "accuracy": 0.5}, {"params_blocks": 10, "accuracy": 0.7},
            {"params_blocks": 5, "accuracy": 0.6}]
    text = text_plot(rows, [1, 0], "params_blocks", "accuracy", dense={"params_blocks": 20, "accuracy": 0.9},
                     width=5, height=5)
    lines = text.splitlines()
    grid = [line.split("|", 1)[1].ljust(5) for line in lines[1:6]]
    # x 0..20 over 5 columns (5 per column), y 0.5..0.9 over 5 rows (0.1 per row, top = 0.9)
    assert grid == ["    *", "     ", "  o  ", " .   ", "o    "]
    assert lines[1].split("|")[0].strip() == "0.9" and lines[5].split("|")[0].strip() == "0.5"
    assert "0" in lines[7] and lines[7].rstrip().endswith("20") and "o front" in lines[8]
    assert text_plot([], [], "params_blocks", "accuracy") == ""
    with pytest.raises(ConfigError, match="out of range"):
        text_plot(rows, [3], "params_blocks", "accuracy")

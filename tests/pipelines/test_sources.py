"""Data sources: csv / JSON lines / JSON array / parquet files and the built-in sets read back exactly; every bad input
is a one-line ConfigError naming the key and the value; splits have exact sizes, keep label shares and are
deterministic; parquet files round-trip. No Ray, no MLflow."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from pipelines import sources
from pipelines.config import DataConfig
from pipelines.sources import (
    LABEL_NAMES_KEY,
    describe,
    label_names,
    read_parquet,
    read_source,
    split_and_sample,
    uses_ray_data,
    write_parquet,
)
from vtrans.data import stratified_subset, train_test_split
from vtrans.errors import ConfigError

ROWS = [
    {"text": "a fine film", "label": 1},
    {"text": "dull, \"very\" dull", "label": 0},
    {"text": "multi\nline", "label": 1},
    {"text": "123", "label": 0},
]


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    def cell(v: object) -> str:
        if v is None:
            return ""
        s = str(v)
        return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s

    path.write_text("\n".join(",".join(cell(v) for v in row) for row in [header, *rows]) + "\n", encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(*paths: Path, text: str = "text", label: str | None = "label") -> DataConfig:
    return DataConfig(files=[str(p) for p in paths], text_column=text, label_column=label)


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def _error(config: DataConfig, task: str = "seq-cls") -> str:
    with pytest.raises(ConfigError) as info:
        read_source(config, task)
    message = str(info.value)
    assert "\n" not in message
    return message


def _expected(rows: list[dict], start: int = 0) -> list[dict]:
    return [{"sample_id": start + i, **r} for i, r in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------------------------------


def test_csv_reads_exactly(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", ["id", "text", "label"], [[i, r["text"], r["label"]] for i, r in enumerate(ROWS)])
    table = read_source(_config(path), "seq-cls")
    assert table.schema == pa.schema([("sample_id", pa.int64()), ("text", pa.string()), ("label", pa.int64())])
    assert _rows(table) == _expected(ROWS)  # quoted newlines and quotes kept; "123" stays a string
    assert label_names(table) is None


def test_jsonl_reads_exactly(tmp_path: Path) -> None:
    table = read_source(_config(_jsonl(tmp_path / "a.jsonl", ROWS)), "seq-cls")
    assert _rows(table) == _expected(ROWS)


def test_json_lines_in_a_json_file(tmp_path: Path) -> None:
    table = read_source(_config(_jsonl(tmp_path / "a.json", ROWS)), "seq-cls")
    assert _rows(table) == _expected(ROWS)


def test_json_array_reads_exactly(tmp_path: Path) -> None:
    rows = [{"text": "first", "label": 0}, {"extra": [1, 2], "text": "second", "label": 1}]  # keys beyond row 0
    path = tmp_path / "a.json"
    path.write_text("\n  " + json.dumps(rows, indent=2), encoding="utf-8")
    table = read_source(_config(path), "seq-cls")
    assert _rows(table) == _expected([{"text": "first", "label": 0}, {"text": "second", "label": 1}])


def test_parquet_reads_only_the_needed_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"label": pa.array([r["label"] for r in ROWS], pa.int8()),
                             "blob": [b"x" * 10] * len(ROWS),
                             "text": pa.array([r["text"] for r in ROWS], pa.large_string())}), path)
    asked: list[object] = []
    real = pq.read_table

    def read_table(source: object, columns: list[str] | None = None, **kwargs: object) -> pa.Table:
        asked.append(columns)
        return real(source, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", read_table)
    table = read_source(_config(path), "seq-cls")
    assert asked == [["text", "label"]]
    assert _rows(table) == _expected(ROWS)
    assert table.schema.field("text").type == pa.string() and table.schema.field("label").type == pa.int64()


def test_parquet_categorical_labels_are_names(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    labels = pa.array(["pos", "neg", "pos"]).dictionary_encode()
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": labels}), path)
    table = read_source(_config(path), "seq-cls")
    assert table.column("label").to_pylist() == [1, 0, 1] and label_names(table) == ["neg", "pos"]


def test_files_are_concatenated_in_order(tmp_path: Path) -> None:
    a = _csv(tmp_path / "a.csv", ["text", "label"], [["one", 0], ["two", 1]])
    b = _csv(tmp_path / "b.csv", ["label", "text"], [[1.0, "three"]])  # other column order, float labels
    c = _csv(tmp_path / "c.csv", ["text", "label"], [["four", 0], ["five", 1]])
    table = read_source(_config(a, b, c), "seq-cls")
    assert _rows(table) == _expected([{"text": t, "label": lab} for t, lab in
                                      [("one", 0), ("two", 1), ("three", 1), ("four", 0), ("five", 1)]])


def test_causal_lm_files_have_no_label(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "docs.jsonl", [{"body": "doc one", "n": 1}, {"body": "doc two", "n": 2}])
    table = read_source(_config(path, text="body", label=None), "causal-lm")
    assert table.column_names == ["sample_id", "text"]
    assert _rows(table) == [{"sample_id": 0, "text": "doc one"}, {"sample_id": 1, "text": "doc two"}]


def test_string_labels_map_to_sorted_ids(tmp_path: Path) -> None:
    a = _csv(tmp_path / "a.csv", ["text", "label"], [["x", "pos"], ["y", "neg"], ["z", "neutral"]])
    b = _csv(tmp_path / "b.csv", ["text", "label"], [["w", "neg"]])
    table = read_source(_config(a, b), "seq-cls")
    assert table.column("label").to_pylist() == [2, 0, 1, 0]
    assert table.schema.metadata[LABEL_NAMES_KEY] == b'["neg", "neutral", "pos"]'
    assert label_names(table) == ["neg", "neutral", "pos"]


def test_integral_float_labels_are_ints(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": 1.0}, {"text": "b", "label": 0.0},
                                         {"text": "c", "label": 2}])
    table = read_source(_config(path), "seq-cls")
    assert table.column("label").type == pa.int64() and table.column("label").to_pylist() == [1, 0, 2]


# ---------------------------------------------------------------------------------------------------------------------
# errors: one line, naming the key and the value
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_text_column_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _csv(tmp_path / "a.csv", ["text", "label"], [["x", 0], ["y", 1]])
    config = DataConfig(files=["a.csv"], text_column="txt", label_column="label")
    assert _error(config) == ("data.text_column='txt' is not a column of data.files[0]='a.csv'; columns: "
                              "['text', 'label']; did you mean 'text'?")


def _write(path: Path, rows: list[dict]) -> Path:
    """``rows`` in the format of ``path``'s suffix (``.json``: one JSON array)."""
    if path.suffix == ".csv":
        return _csv(path, list(rows[0]), [list(r.values()) for r in rows])
    if path.suffix == ".jsonl":
        return _jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_missing_label_column(tmp_path: Path, suffix: str) -> None:
    good = _write(tmp_path / f"good{suffix}", [{"text": "x", "label": 0}, {"text": "y", "label": 1}])
    bad = _write(tmp_path / f"bad{suffix}", [{"text": "z", "class_id": 1}])
    message = _error(_config(good, bad, label="lable"))
    assert message == (f"data.label_column='lable' is not a column of data.files[0]={str(good)!r}; columns: "
                       f"['text', 'label']; did you mean 'label'?")
    message = _error(_config(good, bad))
    assert message == (f"data.label_column='label' is not a column of data.files[1]={str(bad)!r}; columns: "
                       f"['text', 'class_id']")


def test_null_and_empty_texts(tmp_path: Path) -> None:
    a = _csv(tmp_path / "a.csv", ["text", "label"], [["x", 0], ["y", 1]])
    b = _csv(tmp_path / "b.csv", ["text", "label"], [["z", 0], ["  ", 1], ["", 0]])
    message = _error(_config(a, b))
    assert message.startswith("data.text_column='text' has 2 null or empty text(s); the first is row 3 of "
                              f"data.files[1]={str(b)!r} (its row 1)")
    path = _jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": 0}, {"text": None, "label": 1}])
    assert "data.text_column='text' has 1 null or empty text(s); the first is row 1" in _error(_config(path))


def test_text_column_must_hold_strings(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"text": 1, "label": 0}, {"text": 2, "label": 1}])
    message = _error(_config(path))
    assert message == f"data.text_column='text' of data.files[0]={str(path)!r} must hold strings, got int64"


def test_negative_label(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", ["text", "label"], [["x", 0], ["y", 1], ["z", -1]])
    message = _error(_config(path))
    assert message.startswith("data.label_column='label' must hold class ids >= 0, got -1 at row 2")


def test_null_labels(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", ["text", "label"], [["x", 0], ["y", None], ["z", 1], ["w", None]])
    message = _error(_config(path))
    assert message.startswith("data.label_column='label' has 2 null or empty label(s); the first is row 1")
    path = _csv(tmp_path / "s.csv", ["text", "label"], [["x", "pos"], ["y", ""], ["z", "neg"]])
    assert "data.label_column='label' has 1 null or empty label(s); the first is row 1" in _error(_config(path))


def test_non_integral_float_label(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": 1.0}, {"text": "b", "label": 0.5}])
    message = _error(_config(path))
    assert message.startswith("data.label_column='label' holds a non-integral number 0.5 at row 1")


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", ["text", "label"], [["x", 3], ["y", 3]])
    assert _error(_config(path)) == "data.label_column='label' has 1 class(es) [3]; seq-cls needs at least 2"
    path = _csv(tmp_path / "b.csv", ["text", "label"], [["x", "pos"], ["y", "pos"]])
    assert _error(_config(path)) == "data.label_column='label' has 1 class(es) ['pos']; seq-cls needs at least 2"


def test_mixed_label_kinds_across_files(tmp_path: Path) -> None:
    a = _csv(tmp_path / "a.csv", ["text", "label"], [["x", 0], ["y", 1]])
    b = _csv(tmp_path / "b.csv", ["text", "label"], [["z", "pos"]])
    message = _error(_config(a, b))
    assert message.startswith(f"data.label_column='label' holds strings in data.files[1]={str(b)!r} but numbers in "
                              f"data.files[0]={str(a)!r}")


def test_bool_labels_are_rejected(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": True}, {"text": "b", "label": False}])
    assert _error(_config(path)) == (f"data.label_column='label' of data.files[0]={str(path)!r} must hold integers or "
                                     f"strings (class names), got bool")


@pytest.mark.parametrize(("name", "content", "fmt"), [
    ("bad.parquet", b"not a parquet file at all", "parquet"),
    ("bad.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label"\n', "json"),
    ("bad.json", b'[{"text": "a", "label": 0}, ', "json"),
    ("empty.csv", b"", "csv"),
    ("bad.csv", b"text,label\nx,0\n\xff\xfe,1\n", "csv"),
])
def test_unreadable_file(tmp_path: Path, name: str, content: bytes, fmt: str) -> None:
    good = tmp_path / f"good{Path(name).suffix}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": ["x", "y"], "label": [0, 1]}), good)
    elif fmt == "json":
        _jsonl(good, [{"text": "x", "label": 0}, {"text": "y", "label": 1}])
    else:
        _csv(good, ["text", "label"], [["x", 0], ["y", 1]])
    bad = tmp_path / name
    bad.write_bytes(content)
    message = _error(_config(good, bad))
    assert message.startswith(f"data.files[1]={str(bad)!r} cannot be read as {fmt}: ")
    assert len(message) > len(f"data.files[1]={str(bad)!r} cannot be read as {fmt}: ")


def test_json_array_of_non_objects(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[{"text": "a", "label": 0}, "b"]')
    assert _error(_config(path)) == (f"data.files[0]={str(path)!r} holds a JSON array whose items must be objects, "
                                     f"got 'b' at index 1")


def test_task_and_source_must_fit(tmp_path: Path) -> None:
    assert _error(DataConfig(name="rotten_tomatoes"), "causal-lm").startswith(
        "data.name='rotten_tomatoes' is a seq-cls data set, but the task is 'causal-lm'")
    assert _error(DataConfig(name="wikipedia"), "seq-cls").startswith(
        "data.name='wikipedia' is a causal-lm data set without labels, but the task is 'seq-cls'")
    path = _csv(tmp_path / "a.csv", ["text", "label"], [["x", 0], ["y", 1]])
    assert _error(_config(path), "causal-lm") == ("data.label_column must be null for model.task='causal-lm', "
                                                  "got 'label'")
    assert _error(_config(path, label=None), "seq-cls") == ("data.label_column is required for model.task='seq-cls' "
                                                            "on data.files, got None")
    assert _error(_config(path), "seq_cls") == ("model.task must be one of ['seq-cls', 'causal-lm'], got 'seq_cls'; "
                                                "did you mean 'seq-cls'?")


def test_no_rows(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", ["text", "label"], [])
    assert _error(_config(path)) == f"data.files=[{str(path)!r}] holds no rows"


# ---------------------------------------------------------------------------------------------------------------------
# built-in data sets
# ---------------------------------------------------------------------------------------------------------------------


def test_rotten_tomatoes() -> None:
    table = read_source(DataConfig(name="rotten_tomatoes"), "seq-cls")
    assert table.column_names == ["sample_id", "text", "label"]
    assert table.num_rows == 12_752
    assert Counter(table.column("label").to_pylist()) == {1: 7_368, 0: 5_384}
    assert table.column("sample_id").to_pylist() == list(range(12_752))
    assert label_names(table) == ["rotten", "fresh"]  # the ids keep the asset's meaning: 1 = fresh


def test_wikipedia() -> None:
    table = read_source(DataConfig(name="wikipedia"), "causal-lm")
    assert table.column_names == ["sample_id", "text"]
    assert table.num_rows == 106
    assert min(len(t) for t in table.column("text").to_pylist()) >= 200


def test_lee_news_is_a_second_text() -> None:
    table = read_source(DataConfig(name="lee_news"), "causal-lm")
    assert table.column_names == ["sample_id", "text"] and table.num_rows == 300
    assert table.column("text")[0].as_py().startswith("Hundreds of people have been forced to vacate their homes")
    assert _error(DataConfig(name="lee_news"), "seq-cls").startswith(
        "data.name='lee_news' is a causal-lm data set without labels, but the task is 'seq-cls'")


# ---------------------------------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------------------------------


def _labelled(n: int = 1000, positive: int = 700) -> pa.Table:
    labels = np.zeros(n, dtype=np.int64)
    labels[np.random.default_rng(123).permutation(n)[:positive]] = 1
    return pa.table({"sample_id": pa.array(np.arange(n) + 5000, pa.int64()),  # ids != positions
                     "text": [f"text {i}" for i in range(n)], "label": labels})


def _ids(table: pa.Table) -> list[int]:
    return table.column("sample_id").to_pylist()


def _counts(table: pa.Table) -> dict[int, int]:
    return dict(Counter(table.column("label").to_pylist()))


def test_split_sizes_and_shares() -> None:
    table = _labelled()
    splits = split_and_sample(table, test_fraction=0.1, seed=0, max_train_samples=None, calibration_fraction=0.03,
                              stratified=True)
    assert set(splits) == {"train", "test", "calibration"}
    train_idx, test_idx = train_test_split(1000, 0.1, 0, table.column("label").to_pylist())
    assert _ids(splits["test"]) == [5000 + i for i in test_idx]
    assert _ids(splits["train"]) == [5000 + i for i in train_idx]
    assert _counts(splits["test"]) == {1: 70, 0: 30}
    assert _counts(splits["train"]) == {1: 630, 0: 270}
    assert splits["calibration"].num_rows == 27  # floor(0.03 * 900 + 0.5)
    cal = _counts(splits["calibration"])
    assert abs(cal[1] - 27 * 0.7) <= 1 and abs(cal[0] - 27 * 0.3) <= 1
    assert not set(_ids(splits["train"])) & set(_ids(splits["test"]))
    assert sorted(_ids(splits["train"]) + _ids(splits["test"])) == _ids(table)
    assert set(_ids(splits["calibration"])) <= set(_ids(splits["train"]))
    for split in splits.values():  # rows intact: text and label follow their sample_id
        for row in split.to_pylist()[:50]:
            assert table.slice(row["sample_id"] - 5000, 1).to_pylist() == [row]


def test_split_is_deterministic() -> None:
    table = _labelled()
    kwargs = dict(test_fraction=0.2, max_train_samples=300, calibration_count=40, stratified=True)
    a = split_and_sample(table, seed=7, **kwargs)
    b = split_and_sample(table, seed=7, **kwargs)
    c = split_and_sample(table, seed=8, **kwargs)
    assert all(a[k].equals(b[k]) for k in a)
    assert _ids(a["test"]) != _ids(c["test"])
    d = split_and_sample(table, seed=7, calibration_seed=1, **kwargs)
    assert d["train"].equals(a["train"]) and _ids(d["calibration"]) != _ids(a["calibration"])


def test_max_train_samples_is_a_stratified_subset() -> None:
    table = _labelled()
    splits = split_and_sample(table, test_fraction=0.1, seed=3, max_train_samples=200, calibration_count=20,
                              stratified=True)
    full = split_and_sample(table, test_fraction=0.1, seed=3, max_train_samples=None, stratified=False)
    assert splits["test"].equals(full["test"])  # the test split does not depend on the training subset
    assert splits["train"].num_rows == 200 and _counts(splits["train"]) == {1: 140, 0: 60}
    assert set(_ids(splits["train"])) <= set(_ids(full["train"]))
    picked = stratified_subset(full["train"].column("label").to_pylist(), count=200, seed=3)
    assert _ids(splits["train"]) == [_ids(full["train"])[j] for j in picked]
    assert splits["calibration"].num_rows == 20 and _counts(splits["calibration"]) == {1: 14, 0: 6}
    assert set(_ids(splits["calibration"])) <= set(_ids(splits["train"]))
    assert full["calibration"].equals(full["train"])  # neither fraction nor count: all of train
    big = split_and_sample(table, test_fraction=0.1, seed=3, max_train_samples=5000, stratified=False)
    assert big["train"].equals(full["train"])


def test_unlabelled_split() -> None:
    table = pa.table({"sample_id": pa.array(range(106), pa.int64()), "text": [f"doc {i}" for i in range(106)]})
    splits = split_and_sample(table, test_fraction=0.1, seed=0, max_train_samples=50, calibration_fraction=0.1,
                              stratified=False)
    assert [s.num_rows for s in splits.values()] == [50, 11, 5]
    assert not set(_ids(splits["train"])) & set(_ids(splits["test"]))
    assert set(_ids(splits["calibration"])) <= set(_ids(splits["train"]))
    assert _ids(splits["train"]) == sorted(_ids(splits["train"]))
    tiny = split_and_sample(table, test_fraction=0.1, seed=0, max_train_samples=None, calibration_fraction=0.001,
                            stratified=False)
    assert tiny["calibration"].num_rows == 1  # never empty


def test_split_errors() -> None:
    table = _labelled(100, 50)
    with pytest.raises(ConfigError) as info:
        split_and_sample(table, test_fraction=0.1, seed=0, max_train_samples=30, calibration_count=31,
                         stratified=True)
    assert str(info.value) == ("calibration.count=31 is larger than the training split (30 rows); lower "
                               "calibration.count or raise data.max_train_samples")
    with pytest.raises(ConfigError, match=r"^data.max_train_samples must be an int >= 1 or null, got 0$"):
        split_and_sample(table, test_fraction=0.1, seed=0, max_train_samples=0, stratified=False)
    with pytest.raises(ConfigError, match=r"calibration.fraction=0.1, calibration.count=3$"):
        split_and_sample(table, test_fraction=0.1, seed=0, max_train_samples=None, calibration_fraction=0.1,
                         calibration_count=3, stratified=False)
    with pytest.raises(ConfigError, match=r"^calibration.stratified=True needs a label column"):
        split_and_sample(table.drop_columns(["label"]), test_fraction=0.1, seed=0, max_train_samples=None,
                         calibration_count=3, stratified=True)
    with pytest.raises(ConfigError, match=r"^data.test_fraction must be a number in \(0, 1\), got 1.5$"):
        split_and_sample(table, test_fraction=1.5, seed=0, max_train_samples=None, stratified=False)


def test_splits_keep_label_names(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", ["text", "label"], [[f"t{i}", "pos" if i % 3 else "neg"] for i in range(30)])
    splits = split_and_sample(read_source(_config(path), "seq-cls"), test_fraction=0.2, seed=0,
                              max_train_samples=None, calibration_count=6, stratified=True)
    assert all(label_names(s) == ["neg", "pos"] for s in splits.values())
    assert describe(splits) == {
        "train": {"rows": 24, "label_counts": {"0": 8, "1": 16}, "label_names": ["neg", "pos"]},
        "test": {"rows": 6, "label_counts": {"0": 2, "1": 4}, "label_names": ["neg", "pos"]},
        "calibration": {"rows": 6, "label_counts": {"0": 2, "1": 4}, "label_names": ["neg", "pos"]},
    }


def test_describe_unlabelled() -> None:
    table = pa.table({"sample_id": pa.array([0, 1, 2], pa.int64()), "text": ["a", "b", "c"]})
    assert describe({"train": table, "test": table.slice(0, 1)}) == {"train": {"rows": 3}, "test": {"rows": 1}}


# ---------------------------------------------------------------------------------------------------------------------
# parquet files
# ---------------------------------------------------------------------------------------------------------------------


def test_parquet_round_trip_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = _labelled(50, 20).replace_schema_metadata({LABEL_NAMES_KEY: b'["neg", "pos"]'})
    path = tmp_path / "out" / "train.parquet"
    assert write_parquet(table, path) == path
    back = read_parquet(path)
    assert back.equals(table) and label_names(back) == ["neg", "pos"]
    assert os.listdir(path.parent) == ["train.parquet"]

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sources.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_parquet(table.slice(0, 3), path)
    assert os.listdir(path.parent) == ["train.parquet"]  # no temporary file left, the old file intact
    assert read_parquet(path).equals(table)


@pytest.mark.integration
def test_ray_data_reader_gives_the_pyarrow_table(tmp_path: Path) -> None:
    """``data.reader: ray`` (what large or remote sources use) reads csv, JSON lines and parquet into exactly the
    table pyarrow gives, rows in file order, on a real local Ray."""
    import ray

    from pipelines.ray_runtime import init_ray

    texts = [f'review "{i}", with a comma\nand a newline' if i % 7 == 0 else f"review {i}" for i in range(500)]
    labels = ["fresh" if i % 3 else "rotten" for i in range(500)]
    csv_path = tmp_path / "a.csv"
    pa_csv.write_csv(pa.table({"review": texts[:200], "verdict": labels[:200]}), csv_path)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"review": t, "verdict": v}) + "\n"
                                              for t, v in zip(texts[200:350], labels[200:350])))
    pq.write_table(pa.table({"review": texts[350:], "verdict": labels[350:], "x": list(range(150))}),
                    tmp_path / "c.parquet", row_group_size=40)
    init_ray(num_cpus=2)
    try:
        for files in (["a.csv"], ["b.jsonl"], ["c.parquet"]):
            paths = [str(tmp_path / f) for f in files]
            base = DataConfig(files=paths, text_column="review", label_column="verdict", reader="pyarrow")
            via_ray = DataConfig(files=paths, text_column="review", label_column="verdict", reader="ray")
            assert not uses_ray_data(base) and uses_ray_data(via_ray)
            assert read_source(via_ray, "seq-cls").equals(read_source(base, "seq-cls")), files
        bad = DataConfig(files=[str(csv_path)], text_column="text", label_column="verdict", reader="ray")
        with pytest.raises(ConfigError, match=r"data.text_column='text' is not a column of data.files\[0\]"):
            read_source(bad, "seq-cls")
    finally:
        ray.shutdown()


def test_uri_files_need_ray_data() -> None:
    cfg = DataConfig(files=["s3://bucket/train.parquet"], label_column="label")  # not checked for existence
    assert uses_ray_data(cfg)
    with pytest.raises(ConfigError, match=r"data.files\[0\]='s3://bucket/train.parquet' is a URI.*data.reader=ray"):
        DataConfig(files=["s3://bucket/train.parquet"], label_column="label", reader="pyarrow")

"""The pipeline's data source as a pyarrow Table, its train / test / calibration splits, and their parquet files.

```python
from pipelines.sources import read_source, split_and_sample, write_parquet, describe
table = read_source(cfg.data, cfg.task)           # columns sample_id (int64), text (string)[, label (int64)]
splits = split_and_sample(table, test_fraction=0.1, seed=0, max_train_samples=None, calibration_fraction=0.03,
                          stratified=True)        # {"train", "test", "calibration"}, rows keep their sample_id
write_parquet(splits["train"], "runs/x/data/train.parquet")
describe(splits)                                  # {"train": {"rows": 11477, "label_counts": {"0": ..., "1": ...}}}
check_data(cfg)                                   # all of the above on a pipeline's local files, before Ray starts
```

Sources: the built-in ``rotten_tomatoes`` (seq-cls), ``wikipedia`` and ``lee_news`` (causal-lm, one row per
document), or local ``data.files`` - csv, JSON lines (``.json`` / ``.jsonl``; a ``.json`` file holding one JSON
array of objects works too) or parquet (only the needed columns are read) - concatenated in order. ``sample_id`` is
the row number over all files in order, so it is stable for a given source whatever the split.

Labels (seq-cls) become int64 class ids: integers must be >= 0; floats must be integral (``1.0``); strings are mapped
to ids by their sorted unique names, and the names are kept in the schema metadata under :data:`LABEL_NAMES_KEY` as a
JSON list (``label_names(table)`` reads them; id ``i`` is ``names[i]``). Integer labels carry no names.

Every problem with the data is a one-line :class:`~vtrans.errors.ConfigError` naming the config key and its value:
a missing column (with the columns there are, and a suggestion), null or empty texts, null or bad labels, fewer than
two classes, an unreadable file. This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipelines.config import DATASET_COLUMNS, FILE_FORMATS, MAX_NUM_LABELS, DataConfig, PipelineConfig, is_uri
from vtrans import assets
from vtrans.data import stratified_subset, train_test_split
from vtrans.distill import TASKS
from vtrans.errors import ConfigError, quote

__all__ = [
    "LABEL_NAMES_KEY",
    "SPLITS",
    "check_data",
    "describe",
    "label_names",
    "read_parquet",
    "random_rows",
    "read_source",
    "split_and_sample",
    "write_parquet",
]

LABEL_NAMES_KEY = b"vtrans.label_names"
"""Schema metadata key of the class names (a JSON list; id ``i`` is ``names[i]``) when the labels were strings."""
SPLITS = ("train", "test", "calibration")
"""Keys of :func:`split_and_sample`'s result."""

_TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view())


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (pyarrow's messages can span several), at most 300 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _where(i: int, path: str) -> str:
    return f"data.files[{i}]={path!r}"


# ---------------------------------------------------------------------------------------------------------------------
# reading one file: a table of the needed columns, checked to exist
# ---------------------------------------------------------------------------------------------------------------------


def _check_columns(columns: Sequence[str], needed: Mapping[str, str], i: int, path: str) -> None:
    """``needed`` maps a config key (``data.text_column``) to the column it names."""
    for key, column in needed.items():
        if column not in columns:
            close = difflib.get_close_matches(column, list(columns), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}={column!r} is not a column of {_where(i, path)}; columns: {list(columns)}{hint}")


def _read_csv(path: Path, needed: Mapping[str, str], i: int, name: str) -> pa.Table:
    parse = pa_csv.ParseOptions(newlines_in_values=True)  # quoted texts may span lines
    with pa_csv.open_csv(path, parse_options=parse) as reader:  # the header only, to check the columns
        columns = reader.schema.names
    _check_columns(columns, needed, i, name)
    text_column = needed["data.text_column"]
    # csv has no types: a text column of digits would otherwise come back as int64
    convert = pa_csv.ConvertOptions(column_types={text_column: pa.string()}, include_columns=list(needed.values()))
    return pa_csv.read_csv(path, parse_options=parse, convert_options=convert)


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _read_json(path: Path, needed: Mapping[str, str], i: int, name: str) -> pa.Table:
    if not _is_json_array(path):
        table = pa_json.read_json(path)  # JSON lines: one object per line
        _check_columns(table.column_names, needed, i, name)
        return table.select(list(needed.values()))
    with open(path, encoding="utf-8-sig") as f:
        rows = json.load(f)
    for r, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{_where(i, name)} holds a JSON array whose items must be objects, got {row!r} at "
                              f"index {r}")
    columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys, in first-seen order
    _check_columns(columns, needed, i, name)
    # built column by column: Table.from_pylist takes its schema from the first row only
    return pa.table({c: pa.array([row.get(c) for row in rows]) for c in needed.values()})


def _read_parquet_file(path: Path, needed: Mapping[str, str], i: int, name: str) -> pa.Table:
    _check_columns(pq.read_schema(path).names, needed, i, name)
    return pq.read_table(path, columns=list(needed.values()))


_READERS = {"csv": _read_csv, "json": _read_json, "parquet": _read_parquet_file}

#: ``data.reader: auto`` reads local files with Ray Data above this many bytes in total.
RAY_DATA_THRESHOLD = 1 << 30


def uses_ray_data(data: DataConfig) -> bool:
    """Whether ``data.files`` are read with Ray Data: ``data.reader``, or for ``auto`` any URI or more than
    :data:`RAY_DATA_THRESHOLD` bytes of local files."""
    if data.files is None or data.reader == "pyarrow":
        return False
    if data.reader == "ray" or any(is_uri(f) for f in data.files):
        return True
    return sum(Path(f).expanduser().stat().st_size for f in data.files) > RAY_DATA_THRESHOLD


def _read_with_ray_data(i: int, name: str, needed: Mapping[str, str]) -> pa.Table:
    """One file (or URI) read by Ray Data's parallel readers, in file order, then gathered as one table."""
    import ray.data

    fmt = FILE_FORMATS.get(Path(name).suffix.lower())
    if fmt is None:
        raise ConfigError(f"{_where(i, name)} must end in one of {sorted(FILE_FORMATS)}")
    path = name if is_uri(name) else str(Path(name).expanduser().resolve())
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # sample_id = row order
    try:
        if fmt == "parquet":
            ds = ray.data.read_parquet(path)
        elif fmt == "csv":
            ds = ray.data.read_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                                   convert_options=pa_csv.ConvertOptions(
                                       column_types={needed["data.text_column"]: pa.string()}))
        elif _is_local_json_array(path):
            return _read_file(i, name, needed)  # a JSON array is one document: nothing to read in parallel
        else:
            ds = ray.data.read_json(path, lines=True)  # JSON lines (a remote JSON array is not supported)
        _check_columns(ds.schema().names, needed, i, name)
        refs = ds.select_columns(list(needed.values())).to_arrow_refs()
        tables = [t for t in ray.get(refs) if t.num_rows]
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray Data wraps reader errors in its own types
        raise ConfigError(f"{_where(i, name)} cannot be read as {fmt} with Ray Data: {_one_line(e)}") from None
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table(
        {c: pa.array([], pa.string()) for c in needed.values()})
    return _normalise(table, needed, i, name)


def _is_local_json_array(path: str) -> bool:
    return not is_uri(path) and _is_json_array(Path(path))


def _read_file(i: int, name: str, needed: Mapping[str, str]) -> pa.Table:
    path = Path(name).expanduser()
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{_where(i, name)} must end in one of {sorted(FILE_FORMATS)}")
    try:
        table = _READERS[fmt](path, needed, i, name)
    except ConfigError:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError, RecursionError) as e:  # JSONDecodeError, Unicode...
        raise ConfigError(f"{_where(i, name)} cannot be read as {fmt}: {_one_line(e)}") from None
    return _normalise(table, needed, i, name)


def _normalise(table: pa.Table, needed: Mapping[str, str], i: int, name: str) -> pa.Table:
    for c, column in enumerate(table.columns):
        if pa.types.is_dictionary(column.type):  # pandas categoricals in parquet: plain values from here on
            table = table.set_column(c, table.field(c).name, column.cast(column.type.value_type))
    text_key = "data.text_column"
    text_type = table.schema.field(needed[text_key]).type
    if pa.types.is_null(text_type):  # every text is null: the null check reports it
        table = table.set_column(table.column_names.index(needed[text_key]), needed[text_key],
                                 pa.nulls(table.num_rows, pa.string()))
    elif text_type not in _TEXT_TYPES:
        raise ConfigError(f"{text_key}={needed[text_key]!r} of {_where(i, name)} must hold strings, got {text_type}")
    return table


# ---------------------------------------------------------------------------------------------------------------------
# texts and labels
# ---------------------------------------------------------------------------------------------------------------------


def _check_texts(texts: pa.ChunkedArray, key: str, origin: list[tuple[int, str, int]]) -> pa.ChunkedArray:
    """``texts`` as string; an error naming the first null or empty (whitespace only) text and how many there are."""
    texts = texts.cast(pa.string())
    bad = pc.or_kleene(pc.is_null(texts), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0))
    bad = pc.fill_null(bad, True)
    count = pc.sum(bad).as_py() or 0
    if count:
        first = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        raise ConfigError(f"{key} has {count} null or empty text(s); the first is row {first}{_origin(first, origin)} "
                          f"({texts[first].as_py()!r}); drop or fill them")
    return texts


def _origin(row: int, origin: list[tuple[int, str, int]]) -> str:
    """`` of data.files[1]='b.csv' (its row 3)`` for a global row number; ``origin``: (file index, name, first row)."""
    for i, name, start in reversed(origin):
        if row >= start:
            return f" of {_where(i, name)} (its row {row - start})" if name else ""
    return ""


def _label_kind(tp: pa.DataType) -> str | None:
    if pa.types.is_integer(tp):
        return "int"
    if pa.types.is_floating(tp):
        return "float"
    if tp in _TEXT_TYPES:
        return "str"
    if pa.types.is_null(tp):
        return "null"
    return None


def _labels(parts: list[pa.Array], key: str, origin: list[tuple[int, str, int]]) -> tuple[pa.Array, list[str] | None]:
    """Per-file label arrays -> (int64 class ids, class names or None). Checks nulls, types, values and classes."""
    kinds = []
    for part, (i, name, _) in zip(parts, origin):
        kind = _label_kind(part.type)
        if kind is None:
            where = f" of {_where(i, name)}" if name else ""
            raise ConfigError(f"{key}{where} must hold integers or strings (class names), got {part.type}")
        kinds.append(kind)
    if "str" in kinds and ({"int", "float"} & set(kinds)):
        first = {k: next((i, n) for k2, (i, n, _) in zip(kinds, origin) if k2 == k) for k in set(kinds)}
        num = "int" if "int" in first else "float"
        raise ConfigError(f"{key} holds strings in {_where(*first['str'])} but numbers in {_where(*first[num])}; "
                          f"use one kind of label in every file")
    kind = "str" if "str" in kinds else "float" if "float" in kinds else "int" if "int" in kinds else "null"
    target = {"str": pa.string(), "float": pa.float64(), "int": pa.int64(), "null": pa.int64()}[kind]
    try:
        labels = pa.concat_arrays([p.cast(target) for p in parts]) if parts else pa.array([], target)
    except pa.ArrowException as e:  # e.g. a uint64 beyond int64
        raise ConfigError(f"{key} cannot be read as {target} class ids: {_one_line(e)}") from None
    missing = pc.is_null(labels)
    if kind == "str":  # an empty cell of a csv string column is "", not null
        missing = pc.or_(missing, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(labels)), 0))
    missing = pc.fill_null(missing, True).to_numpy(zero_copy_only=False)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise ConfigError(f"{key} has {int(missing.sum())} null or empty label(s); the first is row {first}"
                          f"{_origin(first, origin)}; every row of seq-cls data needs a label")
    names: list[str] | None = None
    if kind == "str":
        names = sorted(set(labels.to_pylist()))
        ids = pc.index_in(labels, value_set=pa.array(names, pa.string())).cast(pa.int64())
    elif kind == "float":
        values = labels.to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"{key} holds a non-integral number {float(values[first])!r} at row {first}"
                              f"{_origin(first, origin)}; labels must be class ids (0, 1, ...) or class names")
        ids = pa.array(values.astype(np.int64))
    else:
        ids = labels
    values = ids.to_numpy(zero_copy_only=False)
    negative = values < 0
    if negative.any():
        first = int(np.flatnonzero(negative)[0])
        raise ConfigError(f"{key} must hold class ids >= 0, got {int(values[first])} at row {first}"
                          f"{_origin(first, origin)}")
    classes = np.unique(values)
    if classes.size < 2:
        found = names if names is not None else classes.tolist()
        raise ConfigError(f"{key} has {classes.size} class(es) {found}; seq-cls needs at least 2")
    return ids, names


# ---------------------------------------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------------------------------------


def _builtin(data: DataConfig, task: str) -> tuple[list[pa.Array], list[pa.Array], list[tuple[int, str, int]]]:
    if data.name == "rotten_tomatoes":
        if task != "seq-cls":
            raise ConfigError(f"data.name='rotten_tomatoes' is a seq-cls data set, but the task is {task!r}; use "
                              f"data.name=wikipedia or data.files for causal-lm")
        rows = assets.load_rotten_tomatoes()
        return ([pa.array([r["text"] for r in rows], pa.string())],
                [pa.array([r["label"] for r in rows], pa.int64())], [(0, "", 0)])
    texts = {"wikipedia": assets.load_wikipedia_text, "lee_news": assets.load_lee_news}
    if data.name in texts:
        if task != "causal-lm":
            raise ConfigError(f"data.name={data.name!r} is a causal-lm data set without labels, but the task is "
                              f"{task!r}; use data.name=rotten_tomatoes or data.files with data.label_column")
        return [pa.array(texts[data.name](), pa.string())], [], [(0, "", 0)]
    raise ConfigError(f"data.name must be one of {sorted(assets.DATASETS)}, got {data.name!r}")


def read_source(data: DataConfig, task: str) -> pa.Table:
    """The data source of ``data`` as a table: ``sample_id`` (int64), ``text`` (string) and, for ``seq-cls``,
    ``label`` (int64 class ids).

    ``sample_id`` is the row number in the source over all files in order. String labels are mapped to ids by sorted
    name; the names are stored in the schema metadata (:data:`LABEL_NAMES_KEY`, read them with :func:`label_names`).
    Raises a one-line ConfigError naming the config key and value for anything wrong with the data.
    """
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.task must be one of {list(TASKS)}, got {task!r}{hint}")
    labelled = task == "seq-cls"
    if data.name is not None:
        text_parts, label_parts, origin = _builtin(data, task)
    else:
        if labelled and data.label_column is None:
            raise ConfigError("data.label_column is required for model.task='seq-cls' on data.files, got None")
        if not labelled and data.label_column is not None:
            raise ConfigError(f"data.label_column must be null for model.task='causal-lm', got {data.label_column!r}")
        needed = {"data.text_column": data.text_column}
        if labelled:
            needed["data.label_column"] = data.label_column
        text_parts, label_parts, origin = [], [], []
        start = 0
        ray_data = uses_ray_data(data)
        for i, name in enumerate(data.files or []):
            table = _read_with_ray_data(i, name, needed) if ray_data else _read_file(i, name, needed)
            origin.append((i, name, start))
            start += table.num_rows
            text_parts.append(table.column(data.text_column).combine_chunks())
            if labelled:
                label_parts.append(table.column(data.label_column).combine_chunks())
    text_key = f"data.text_column={data.text_column!r}" if data.files is not None else f"data.name={data.name!r}"
    texts = pa.chunked_array([p.cast(pa.string()) for p in text_parts], pa.string())
    if len(texts) == 0:
        what = f"data.files={data.files!r}" if data.files is not None else f"data.name={data.name!r}"
        raise ConfigError(f"{what} holds no rows")
    texts = _check_texts(texts, text_key, origin)
    columns: dict[str, Any] = {"sample_id": pa.array(np.arange(len(texts), dtype=np.int64)), "text": texts}
    metadata = None
    if labelled:
        label_key = f"data.label_column={data.label_column!r}" if data.files is not None else f"data.name={data.name!r}"
        ids, names = _labels(label_parts, label_key, origin)
        columns["label"] = ids
        if data.name == "rotten_tomatoes":  # integer ids with known names
            names = list(assets.ROTTEN_TOMATOES_LABELS)
        if names is not None:
            metadata = {LABEL_NAMES_KEY: json.dumps(names).encode()}
    table = pa.table(columns)
    return table.replace_schema_metadata(metadata) if metadata else table


def label_names(table: pa.Table) -> list[str] | None:
    """The class names of a table whose labels were strings (id ``i`` is ``names[i]``); None for integer labels."""
    raw = (table.schema.metadata or {}).get(LABEL_NAMES_KEY)
    return json.loads(raw) if raw is not None else None


# ---------------------------------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _random_subset(n: int, size: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).permutation(n)[:size].tolist())


def random_rows(n: int, *, fraction: float | None = None, count: int | None = None, seed: int) -> list[int]:
    """Sorted positions of a seeded random subset of ``n`` rows (not stratified): ``count`` rows, or
    ``floor(fraction * n + 0.5)`` - the rule of ``stratified_subset`` - and never none."""
    size = count if count is not None else max(1, math.floor(fraction * n + 0.5))  # type: ignore[operator]
    return _random_subset(n, size, seed)


def split_and_sample(
    table: pa.Table,
    *,
    test_fraction: float,
    seed: int,
    max_train_samples: int | None,
    calibration_fraction: float | None = None,
    calibration_count: int | None = None,
    stratified: bool,
    calibration_seed: int | None = None,
) -> dict[str, pa.Table]:
    """``{"train", "test", "calibration"}`` tables of the rows of ``table`` (each keeps its ``sample_id``).

    1. test: ``vtrans.data.train_test_split`` with ``test_fraction`` and ``seed``, stratified by ``label`` when the
       table has one;
    2. train: the rest, or a ``max_train_samples`` subset of it (seeded with ``seed``; ``stratified_subset`` when
       labelled, which keeps every class and each class's share to within one row);
    3. calibration: drawn from the train rows - ``calibration_fraction`` or ``calibration_count`` of them, stratified
       by label when ``stratified`` - seeded with ``calibration_seed`` (None: ``seed``). Neither given: all of train.

    Rows stay in source order within each split. Deterministic for the seeds.
    """
    n = table.num_rows
    labelled = "label" in table.column_names
    if max_train_samples is not None and (not _is_int(max_train_samples) or max_train_samples < 1):
        raise ConfigError(f"data.max_train_samples must be an int >= 1 or null, got {max_train_samples!r}")
    if calibration_fraction is not None and calibration_count is not None:
        raise ConfigError(f"give at most one of calibration.fraction or calibration.count, got calibration.fraction="
                          f"{calibration_fraction!r}, calibration.count={calibration_count!r}")
    if calibration_count is not None and (not _is_int(calibration_count) or calibration_count < 1):
        raise ConfigError(f"calibration.count must be an int >= 1, got {calibration_count!r}")
    if calibration_fraction is not None and (isinstance(calibration_fraction, bool)
                                             or not isinstance(calibration_fraction, (int, float))
                                             or not 0 < calibration_fraction <= 1):
        raise ConfigError(f"calibration.fraction must be a number in (0, 1], got {calibration_fraction!r}")
    if stratified and not labelled:
        raise ConfigError(f"calibration.stratified={stratified!r} needs a label column, but the table has only "
                          f"{table.column_names}")
    if n < 2:
        raise ConfigError(f"the data has {n} row(s); a train/test split needs at least 2")
    labels = table.column("label").to_numpy().tolist() if labelled else None
    train, test = train_test_split(n, test_fraction, seed, labels)

    if max_train_samples is not None and max_train_samples < len(train):
        if labels is not None:
            picked = stratified_subset([labels[i] for i in train], count=max_train_samples, seed=seed)
        else:
            picked = _random_subset(len(train), max_train_samples, seed)
        train = [train[j] for j in picked]

    cal_seed = seed if calibration_seed is None else calibration_seed
    if calibration_count is not None and calibration_count > len(train):
        raise ConfigError(f"calibration.count={calibration_count!r} is larger than the training split "
                          f"({len(train)} rows); lower calibration.count or raise data.max_train_samples")
    if calibration_fraction is None and calibration_count is None:
        calibration = list(train)
    elif stratified:
        assert labels is not None
        picked = stratified_subset([labels[i] for i in train], fraction=calibration_fraction, count=calibration_count,
                                   seed=cal_seed)
        calibration = [train[j] for j in picked]
    else:
        rows = random_rows(len(train), fraction=calibration_fraction, count=calibration_count, seed=cal_seed)
        calibration = [train[j] for j in rows]
    return {"train": table.take(train), "test": table.take(test), "calibration": table.take(calibration)}


@functools.lru_cache(maxsize=2)
def _builtin_table(name: str, task: str) -> pa.Table:
    """A built-in data set's table, read once per process: checks of several configs (a sweep's) share it."""
    return read_source(DataConfig(name=name, label_column=DATASET_COLUMNS[name][1]), task)


def check_data(cfg: PipelineConfig) -> None:
    """Read and check a pipeline's local data files before anything starts, as its stages will use them: columns,
    texts and labels (:func:`read_source`), class ids below ``model.num_labels``, the train / test / calibration
    split (:func:`split_and_sample`) and, for seq-cls, enough samples for each training job's batch. A one-line
    ConfigError naming the key and the value otherwise.

    A built-in seq-cls data set is split as the calibrate stage will, to check the batches against its splits; files
    read with Ray Data (URIs, ``data.reader: ray``, more than
    :data:`RAY_DATA_THRESHOLD` bytes) are checked by the calibrate stage, which reads them on the cluster."""
    data, task = cfg.data, cfg.task
    if uses_ray_data(data) or (data.files is None and task != "seq-cls"):
        return
    table = read_source(data, task) if data.files is not None else _builtin_table(data.name, task)
    source = f"data.files={quote(data.files)}" if data.files is not None else f"data.name={data.name!r}"
    if task == "causal-lm":
        if table.num_rows < 2:
            raise ConfigError(f"{source} holds {table.num_rows} document(s); causal-lm needs at least 2 to hold "
                              f"some out (data.test_fraction)")
        return
    labels = table.column("label").to_numpy()
    num_labels = cfg.model.num_labels
    if num_labels is None and labels.max() >= MAX_NUM_LABELS:
        row = int(np.flatnonzero(labels >= MAX_NUM_LABELS)[0])
        raise ConfigError(f"data.label_column={quote(data.label_column)} holds class id {labels[row]} at row {row}, "
                          f"more than the {MAX_NUM_LABELS:,} classes vtrans allows (model.num_labels from the data); "
                          f"class ids count from 0")
    if num_labels is not None and labels.max() >= num_labels:
        row = int(np.flatnonzero(labels >= num_labels)[0])
        names = label_names(table)
        found = f"{names[labels[row]]!r} (class id {labels[row]}; {len(names)} classes {names})" if names else \
            f"class id {labels[row]}"
        raise ConfigError(f"data.label_column={data.label_column!r} holds {found} at row {row}, but model.num_labels="
                          f"{num_labels} allows class ids 0..{num_labels - 1}; set model.num_labels="
                          f"{int(labels.max()) + 1} (or null: from the data)")
    c = cfg.calibration
    splits = split_and_sample(table, test_fraction=data.test_fraction, seed=data.seed,
                              max_train_samples=data.max_train_samples, calibration_fraction=c.fraction,
                              calibration_count=c.count, stratified=bool(c.stratified), calibration_seed=c.seed)
    train, calibration = splits["train"].num_rows, splits["calibration"].num_rows
    ft = cfg.finetune
    split, rows = ("calibration", calibration) if cfg.calibrates else ("training", train)
    jobs = [("prune.batch_size", cfg.prune.batch_size, split, rows)]  # (key, batch, the samples it draws from)
    if cfg.model.teacher is None and cfg.teacher.steps > 0:
        jobs.append(("teacher.batch_size", cfg.teacher.batch_size, "training", train))
    if ft.steps > 0 and ft.eval_every > 0:
        jobs.append(("finetune.batch_size", ft.batch_size, f"training (less finetune.eval_samples={ft.eval_samples})",
                     train - ft.eval_samples))
    elif ft.steps > 0:
        jobs.append(("finetune.batch_size", ft.batch_size, "training", train))
    for key, batch, split, rows in jobs:
        if batch > rows:
            raise ConfigError(f"{key}={batch} is larger than the {rows} {split} samples {source} gives (of "
                              f"{table.num_rows} rows); lower {key} or give more data")


def describe(tables: Mapping[str, pa.Table]) -> dict[str, dict[str, Any]]:
    """Rows and label counts of each split, for a summary JSON.

    ``{"train": {"rows": 900, "label_counts": {"0": 400, "1": 500}}, ...}``: label ids as strings (JSON keys), in
    ascending order; ``label_counts`` only for labelled tables; ``label_names`` too when the labels were strings.
    """
    out: dict[str, dict[str, Any]] = {}
    for split, table in tables.items():
        entry: dict[str, Any] = {"rows": table.num_rows}
        if "label" in table.column_names:
            ids, counts = np.unique(table.column("label").to_numpy(), return_counts=True)
            entry["label_counts"] = {str(int(i)): int(c) for i, c in zip(ids, counts)}
            names = label_names(table)
            if names is not None:
                entry["label_names"] = names
        out[split] = entry
    return out


# ---------------------------------------------------------------------------------------------------------------------
# parquet files
# ---------------------------------------------------------------------------------------------------------------------


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` (schema metadata included) to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``, so a reader never sees a partial file. Creates the parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_parquet(path: str | Path) -> pa.Table:
    """A table written by :func:`write_parquet` (with its schema metadata, e.g. the label names)."""
    return pq.read_table(Path(path))

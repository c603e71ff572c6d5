"""Stage 1, calibrate: read the data source, split it, draw the calibration subset, tokenize; write parquet.

Outputs (``<output>/stages/calibrate/<key>/``): ``train.parquet``, ``test.parquet`` and ``calibration.parquet``, each
with ``sample_id`` (stable row id of the source), ``input_ids`` (token ids, list<int32>) and, for seq-cls, ``text``
and ``label``; ``summary.json`` with the split sizes and class counts.

- seq-cls: a stratified test split of the labelled texts (``data.test_fraction``), the training texts (a stratified
  ``data.max_train_samples`` subset), and the calibration subset drawn from them (``calibration.fraction`` or
  ``count``, stratified by default: the paper's 3%). Texts are truncated to ``data.max_length`` tokens.
- causal-lm: the documents are split (``data.test_fraction`` of the documents is held out), each side is cut into
  ``data.seq_len``-token chunks, the training chunks are capped at ``data.max_train_samples`` and the calibration
  chunks drawn from them.

Small local sources are read with pyarrow (much faster than Ray Data for a few MB).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipelines import sources
from pipelines.config import PipelineConfig, to_dict
from pipelines.redact import redact
from pipelines.stages.base import StageContext, StageOutput
from pipelines.stages.fingerprint import data_identity, model_identity
from pipelines.stages.products import Data
from vtrans.errors import ConfigError
from vtrans.progress import progress

NAME = "calibrate"
NEEDS: tuple[str, ...] = ()
VERSION = 1
OPTIONS = {"num_cpus": 1}
SPLITS = ("train", "test", "calibration")


def material(cfg: PipelineConfig) -> dict:
    return {"model": model_identity(cfg.model.name), "task": cfg.task, "num_labels": cfg.model.num_labels,
            "data": {k: v for k, v in to_dict(cfg.data).items() if k != "reader"},  # how it is read: not what
            "data_files": data_identity(cfg.data.files),
            "calibration": to_dict(cfg.calibration)}


class TokenizedDataset(torch.utils.data.Dataset):
    """A split written by this stage, as the map-style dataset the Ray Train jobs and the evaluation read: items
    ``input_ids`` (seq,), ``labels`` (() class id for seq-cls, the ids themselves for causal-lm), ``sample_id``."""

    def __init__(self, path: str | Path, task: str) -> None:
        table = sources.read_parquet(path)
        self.task = task
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in table.column("input_ids").to_pylist()]
        self.sample_ids = torch.tensor(table.column("sample_id").to_pylist(), dtype=torch.long)
        self.labels = (torch.tensor(table.column("label").to_pylist(), dtype=torch.long) if task == "seq-cls"
                       else None)
        self.texts = table.column("text").to_pylist() if "text" in table.column_names else None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        label = self.labels[i] if self.labels is not None else ids
        return {"input_ids": ids, "labels": label, "sample_id": self.sample_ids[i]}


def _token_column(ids: list[list[int]]) -> pa.Array:
    return pa.array(ids, type=pa.list_(pa.int32()))


def _classification(cfg: PipelineConfig, table: pa.Table, tokenizer) -> dict[str, pa.Table]:
    c = cfg.calibration
    tables = sources.split_and_sample(table, test_fraction=cfg.data.test_fraction, seed=cfg.data.seed,
                                      max_train_samples=cfg.data.max_train_samples,
                                      calibration_fraction=c.fraction, calibration_count=c.count,
                                      stratified=bool(c.stratified), calibration_seed=c.seed)
    out = {}
    for split, t in tables.items():
        enc = _tokenize(tokenizer, t.column("text").to_pylist(), f"{NAME} tokenize {split}", truncation=True,
                        max_length=cfg.data.max_length)
        for i, ids in enumerate(enc):
            if not ids:
                raise ConfigError(f"data: text of sample_id={t.column('sample_id')[i].as_py()} gives no tokens")
        out[split] = t.append_column("input_ids", _token_column(enc))
    return out


TOKENIZE_BATCH = 2048
"""Texts per tokenizer call (one progress step)."""


def _tokenize(tokenizer, texts: list[str], desc: str, **kwargs) -> list[list[int]]:
    """Token ids of ``texts``, tokenized in batches with progress lines (a large source takes minutes)."""
    ids: list[list[int]] = []
    for start in progress(range(0, len(texts), TOKENIZE_BATCH), desc=desc, unit="batch"):
        ids += tokenizer(texts[start : start + TOKENIZE_BATCH], padding=False, return_attention_mask=False,
                         verbose=False, **kwargs)["input_ids"]
    return ids


def _chunks(docs: list[str], tokenizer, seq_len: int, desc: str) -> list[list[int]]:
    """The documents as one token stream (each followed by eos, as :class:`vtrans.data.CausalLMDataset` does) cut
    into ``seq_len``-token chunks; the remainder is dropped."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [t for ids in _tokenize(tokenizer, docs, desc, add_special_tokens=False) for t in (*ids, *eos)]
    n = len(stream) // seq_len
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def _language_modelling(cfg: PipelineConfig, table: pa.Table, tokenizer) -> dict[str, pa.Table]:
    from vtrans.data import train_test_split

    d, c = cfg.data, cfg.calibration
    docs = table.column("text").to_pylist()
    if len(docs) < 2:
        raise ConfigError(f"data: causal-lm needs at least 2 documents to hold some out, got {len(docs)}")
    train_idx, test_idx = train_test_split(len(docs), d.test_fraction, seed=d.seed)
    train = _chunks([docs[i] for i in train_idx], tokenizer, d.seq_len, f"{NAME} tokenize train")
    test = _chunks([docs[i] for i in test_idx], tokenizer, d.seq_len, f"{NAME} tokenize test")
    if not train or not test:
        which = "training" if not train else "test"
        raise ConfigError(f"data.seq_len={d.seq_len} is longer than all {which} documents together (data."
                          f"test_fraction={d.test_fraction}); no {which} chunk")
    if d.max_train_samples is not None:
        train = train[: d.max_train_samples]
    n = len(train)
    if c.count is not None and c.count > n:
        raise ConfigError(f"calibration.count={c.count} is larger than the {n} training chunks")
    calib = sources.random_rows(n, fraction=c.fraction, count=c.count, seed=c.seed)

    def table_of(chunks: list[list[int]], ids: list[int]) -> pa.Table:
        return pa.table({"sample_id": pa.array(ids, type=pa.int64()), "input_ids": _token_column(chunks)})

    return {"train": table_of(train, list(range(n))),
            "test": table_of(test, list(range(len(test)))),
            "calibration": table_of([train[i] for i in calib], calib)}


def _cap_test(test: pa.Table, limit: int | None, seed: int) -> pa.Table:
    """At most ``limit`` test rows: a seeded subset, stratified by label when there are labels; source order kept."""
    from vtrans.data import stratified_subset

    if limit is None or test.num_rows <= limit:
        return test
    if "label" in test.column_names:
        rows = stratified_subset(test.column("label").to_pylist(), count=limit, seed=seed)
    else:
        rows = sources.random_rows(test.num_rows, count=limit, seed=seed)
    return test.take(pa.array(rows, type=pa.int64()))


def run(ctx: StageContext, work: Path, inputs: dict, run_id: str | None) -> StageOutput:
    from vtrans.checkpoint import load_tokenizer
    from vtrans.data import pad_token_id_of

    cfg = ctx.config
    tokenizer = load_tokenizer(ctx.model_path)
    if tokenizer is None:
        raise ConfigError(f"model.name={cfg.model.name!r} has no tokenizer files in {ctx.model_path}")
    table = sources.read_source(cfg.data, cfg.task)
    print(redact(f"[{NAME}] read {table.num_rows} rows from {cfg.data.name or cfg.data.files}"), flush=True)
    tables = (_classification if cfg.task == "seq-cls" else _language_modelling)(cfg, table, tokenizer)
    tables["test"] = _cap_test(tables["test"], cfg.data.max_test_samples, cfg.data.seed)
    outputs, metrics = {}, {}
    for split in SPLITS:
        path = work / f"{split}.parquet"
        sources.write_parquet(tables[split], path)
        outputs[split] = str(path)
        metrics[f"{split}_samples"] = tables[split].num_rows
        lengths = [len(x) for x in tables[split].column("input_ids").to_pylist()]
        metrics[f"{split}_mean_tokens"] = float(np.mean(lengths))
    num_labels = names = None
    if cfg.task == "seq-cls":
        labels = table.column("label").to_pylist()
        found = max(labels) + 1
        num_labels = cfg.model.num_labels or found
        if found > num_labels:
            raise ConfigError(f"model.num_labels={num_labels} but the data has label {found - 1}")
        names = sources.label_names(table)
        metrics["num_labels"] = num_labels
    data = Data(splits=outputs, pad_token_id=pad_token_id_of(tokenizer), num_labels=num_labels, label_names=names)
    info = {"summary": sources.describe(tables), **data.info()}
    summary = work / "summary.json"
    summary.write_text(json.dumps({"metrics": metrics, **info}, indent=1))
    print(f"[{NAME}] " + ", ".join(f"{s} {int(metrics[f'{s}_samples'])}" for s in SPLITS), flush=True)
    source = cfg.data.name or Path(cfg.data.files[0]).stem
    contexts = {"train": "training", "test": "testing", "calibration": "calibration"}
    return StageOutput(outputs=outputs, metrics=metrics, info=info, artifacts=[(str(summary), "data")],
                       datasets=[(outputs[s], f"{source}-{s}", contexts.get(s, s)) for s in SPLITS])

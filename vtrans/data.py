"""Task data for the pruning and fine-tuning loops: sequence classification and causal language modelling.

Everything here is deterministic for a seed and shardable for data-parallel training:

- ``TextClassificationData`` holds labelled texts with stable sample ids; ``rotten_tomatoes()`` loads the built-in
  set. ``stratified_subset`` draws the Fast-VTrans calibration subset (3% of the train set in the paper) and
  ``train_test_split`` a (stratified) held-out split.
- ``ClassificationDataset`` and ``CausalLMDataset`` tokenize once up front; ``collate`` pads a batch;
  ``make_loader`` builds a ``DataLoader`` for one rank of ``world_size``.

Sharding relation (what a trainer may rely on; tested in tests/vtrans/test_data.py). For a dataset of ``n``
samples, ``W = world_size`` and per-rank batch size ``B``, let

    order = global_order(n, shuffle=shuffle, seed=seed, epoch=epoch)     # one permutation, the same for every W
    order = order + order[:pad]  with pad = (-n) % W                      # drop_last=False (wrap-around padding)
    order = order[: (n // (W * B)) * W * B]                               # drop_last=True (whole global batches)
    G_k   = order[k * W * B : (k + 1) * W * B]                            # global batch k, k = 0 .. steps - 1

Then at step ``k`` rank ``r`` receives ``G_k[r::W]`` (default: ``torch.utils.data.DistributedSampler``, which
deals the permuted list out round-robin) or ``G_k[r * b : (r + 1) * b]`` with ``b = len(G_k) // W``
(``contiguous=True``). A single worker (``world_size=1``) with batch ``W * B`` receives ``G_k`` itself, unpadded.
So at every step the union of the rank batches is exactly the 1-worker batch of the same step: W workers x batch B
see the samples 1 worker x batch W*B sees. Every rank runs ``steps = ceil(n / (W * B))`` steps
(``floor`` with ``drop_last``) with equal batch sizes, as does the single worker, so DDP never waits on a rank.
The one exception is the last step with ``drop_last=False`` when ``n % W != 0``: the ranks then also see the
``pad`` wrap-around samples ``order[:pad]`` (a second time in the epoch), which the single worker does not.

Pure module: stdlib, numpy, torch and transformers only (never ray, mlflow or datasets).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from transformers import PreTrainedTokenizerBase

from vtrans import assets
from vtrans.errors import ConfigError

IGNORE_INDEX = -100
"""Label of padded positions in causal-LM batches (ignored by Hugging Face's cross-entropy)."""


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# ---------------------------------------------------------------------------------------------------------------------
# labelled texts
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TextClassificationData:
    """Labelled texts for sequence classification, each with a stable sample id."""

    texts: list[str]
    """The input texts."""
    labels: list[int]
    """Class index of each text, an int in ``0 .. num_labels - 1``."""
    ids: list[int] | None = None
    """Stable sample ids (unique ints), kept through subsets; default ``0 .. n - 1``."""

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        self.labels = list(self.labels)
        if not self.texts:
            raise ConfigError(f"data.texts must be non-empty, got {self.texts!r}")
        n = len(self.texts)
        if len(self.labels) != n:
            raise ConfigError(f"data.labels must have one entry per text ({n}), got {len(self.labels)}")
        for i, text in enumerate(self.texts):
            if not isinstance(text, str):
                raise ConfigError(f"data.texts[{i}] must be a str, got {text!r}")
        for i, label in enumerate(self.labels):
            if not _is_int(label) or label < 0:
                raise ConfigError(f"data.labels[{i}] must be a non-negative int, got {label!r}")
        self.labels = [int(label) for label in self.labels]
        self.ids = list(range(n)) if self.ids is None else list(self.ids)
        if len(self.ids) != n:
            raise ConfigError(f"data.ids must have one entry per text ({n}), got {len(self.ids)}")
        seen: set[int] = set()
        for i, sid in enumerate(self.ids):
            if not _is_int(sid):
                raise ConfigError(f"data.ids[{i}] must be an int, got {sid!r}")
            if sid in seen:
                raise ConfigError(f"data.ids[{i}] repeats sample id {sid!r}; ids must be unique")
            seen.add(sid)
        self.ids = [int(sid) for sid in self.ids]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Number of classes: the largest label + 1."""
        return max(self.labels) + 1

    def subset(self, indices: Sequence[int]) -> TextClassificationData:
        """The rows at ``indices`` (positions, not ids), in that order, keeping their sample ids."""
        ids = self.ids
        assert ids is not None
        return TextClassificationData([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                                      [ids[i] for i in indices])


def rotten_tomatoes() -> TextClassificationData:
    """The built-in Rotten Tomatoes snippets: 12,752 texts, label 1 = fresh (7,368), 0 = rotten (5,384); ids = rows."""
    rows = assets.load_rotten_tomatoes()
    return TextClassificationData([r["text"] for r in rows], [r["label"] for r in rows])


def wikipedia_documents(min_chars: int = 200) -> list[str]:
    """Plain text of the built-in Wikipedia articles (106 documents) for causal-LM calibration and fine-tuning."""
    return assets.load_wikipedia_text(min_chars=min_chars)


# ---------------------------------------------------------------------------------------------------------------------
# subsets and splits
# ---------------------------------------------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _check_labels(labels: Sequence[int], key: str) -> np.ndarray:
    arr = np.asarray(list(labels))
    if arr.size == 0:
        raise ConfigError(f"{key} must be non-empty, got []")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        bad = next((v for v in labels if not _is_int(v)), labels)
        raise ConfigError(f"{key} must be a sequence of ints, got {bad!r}")
    return arr


def _stratified_indices(labels: np.ndarray, total: int, seed: int) -> list[int]:
    """``total`` indices split over the classes by largest remainder, at least 1 per class; sorted."""
    n = labels.size
    classes, counts = np.unique(labels, return_counts=True)  # classes ascending
    # Exact share of class c is total * n_c / n; integer arithmetic keeps the remainders exact.
    quota = [int(total * c // n) for c in counts]
    remainder = [int(total * c % n) for c in counts]
    left = total - sum(quota)
    for j in sorted(range(len(classes)), key=lambda j: (-remainder[j], j))[:left]:
        quota[j] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cls, q in zip(classes, quota):
        members = np.flatnonzero(labels == cls)
        chosen.extend(rng.permutation(members)[: max(q, 1)].tolist())
    return sorted(chosen)


def stratified_subset(
    labels: Sequence[int], fraction: float | None = None, count: int | None = None, seed: int = 0
) -> list[int]:
    """Sorted indices of a stratified random sample of ``labels``: the Fast-VTrans calibration subset.

    Give exactly one of ``fraction`` in (0, 1] or ``count`` >= 1. Rule: the target size is
    ``T = floor(fraction * n + 0.5)`` (or ``count``); class ``c`` with ``n_c`` samples gets ``floor(T * n_c / n)``
    and the ``T - sum(floors)`` leftover places go to the largest remainders ``T * n_c mod n`` (ties: smaller
    label first), so every class is within 1 sample of its exact share and the size is exactly ``T`` - except that
    every present class keeps at least one sample, which can add up to one sample per class when ``T`` is tiny.
    Within a class the samples are the first of a seeded permutation (``numpy.random.default_rng(seed)``).
    Example: 3% of Rotten Tomatoes (7,368 / 5,384) is T = 383 -> 221 fresh + 162 rotten.
    """
    arr = _check_labels(labels, "calibration.labels")
    n = arr.size
    if (fraction is None) == (count is None):
        raise ConfigError(
            f"give exactly one of calibration.fraction or calibration.count, got fraction={fraction!r}, count={count!r}"
        )
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"calibration.fraction must be a number in (0, 1], got {fraction!r}")
        total = _round_half_up(fraction * n)
    else:
        if not _is_int(count) or count < 1:  # type: ignore[operator]
            raise ConfigError(f"calibration.count must be an int >= 1, got {count!r}")
        if count > n:  # type: ignore[operator]
            raise ConfigError(f"calibration.count must be at most the number of samples ({n}), got {count!r}")
        total = int(count)  # type: ignore[arg-type]
    if not _is_int(seed):
        raise ConfigError(f"calibration.seed must be an int, got {seed!r}")
    return _stratified_indices(arr, total, int(seed))


def train_test_split(
    n: int, test_fraction: float, seed: int, labels: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """``(train, test)`` sorted index lists partitioning ``range(n)``; stratified by ``labels`` when given.

    The test set has ``floor(test_fraction * n + 0.5)`` samples, clamped to ``1 .. n - 1`` (stratified: the rule of
    ``stratified_subset``). Deterministic for a seed.
    """
    if not _is_int(n) or n < 2:
        raise ConfigError(f"data.n must be an int >= 2 to split, got {n!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if not _is_int(seed):
        raise ConfigError(f"data.seed must be an int, got {seed!r}")
    total = min(max(_round_half_up(test_fraction * n), 1), n - 1)
    if labels is None:
        test = sorted(np.random.default_rng(int(seed)).permutation(n)[:total].tolist())
    else:
        arr = _check_labels(labels, "data.labels")
        if arr.size != n:
            raise ConfigError(f"data.labels must have n={n} entries, got {arr.size}")
        test = _stratified_indices(arr, total, int(seed))
        if len(test) >= n:
            raise ConfigError(
                f"data.test_fraction={test_fraction!r} leaves no training sample: every class needs a test "
                f"sample and {n} samples have {np.unique(arr).size} classes"
            )
    in_test = set(test)
    return [i for i in range(n) if i not in in_test], test


# ---------------------------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------------------------


def pad_token_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its eos token (GPT-2, SmolLM2 style)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if _is_int(value):
            return int(value)  # type: ignore[arg-type]
    raise ConfigError(
        f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; set tokenizer.pad_token first"
    )


class ClassificationDataset(Dataset):
    """Tokenized labelled texts; items ``input_ids`` (seq,), ``labels`` (), ``sample_id`` () as LongTensors.

    Texts are tokenized once, in one batch call, with the tokenizer's special tokens, truncated to
    ``max_length`` tokens and not padded (``collate`` pads each batch to its longest sequence).
    """

    def __init__(
        self,
        data: TextClassificationData,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 128,
        indices: Sequence[int] | None = None,
    ) -> None:
        if not _is_int(max_length) or max_length < 1:
            raise ConfigError(f"data.max_length must be an int >= 1, got {max_length!r}")
        if indices is not None:
            data = data.subset(indices)
        self.max_length = int(max_length)
        self.num_labels = data.num_labels
        enc = tokenizer(data.texts, truncation=True, max_length=self.max_length, padding=False,
                        return_attention_mask=False, verbose=False)
        self.input_ids: list[Tensor] = [torch.tensor(ids, dtype=torch.long) for ids in enc["input_ids"]]
        for i, ids in enumerate(self.input_ids):
            if ids.numel() == 0:
                raise ConfigError(f"data.texts[{i}] gives no tokens, got {data.texts[i]!r}")
        self.labels = torch.tensor(data.labels, dtype=torch.long)  # (n,)
        self.sample_ids = torch.tensor(data.ids, dtype=torch.long)  # (n,)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "sample_id": self.sample_ids[i]}


class CausalLMDataset(Dataset):
    """Documents as one token stream cut into chunks of exactly ``seq_len`` tokens for causal-LM training.

    Every document is tokenized without special tokens and followed by the eos token when the tokenizer has one
    (``add_eos``); the concatenation is cut into ``floor(num_tokens / seq_len)`` non-overlapping chunks (the
    remainder is dropped), the first ``max_chunks`` of them when given. Items: ``input_ids`` (seq_len,),
    ``labels`` (seq_len,) equal to ``input_ids`` (the model shifts them), ``sample_id`` () = the chunk index.
    """

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int = 128,
        max_chunks: int | None = None,
        add_eos: bool = True,
    ) -> None:
        if not _is_int(seq_len) or seq_len < 1:
            raise ConfigError(f"data.seq_len must be an int >= 1, got {seq_len!r}")
        if max_chunks is not None and (not _is_int(max_chunks) or max_chunks < 1):
            raise ConfigError(f"data.max_chunks must be an int >= 1 or None, got {max_chunks!r}")
        documents = list(documents)
        if not documents:
            raise ConfigError("data.documents must be non-empty, got []")
        for i, doc in enumerate(documents):
            if not isinstance(doc, str):
                raise ConfigError(f"data.documents[{i}] must be a str, got {doc!r}")
        enc = tokenizer(documents, add_special_tokens=False, return_attention_mask=False, verbose=False)
        eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
        stream = torch.tensor(list(itertools.chain.from_iterable(ids + eos for ids in enc["input_ids"])),
                              dtype=torch.long)  # (num_tokens,)
        self.seq_len = int(seq_len)
        self.num_tokens = stream.numel()
        n_chunks = self.num_tokens // self.seq_len
        if n_chunks == 0:
            raise ConfigError(
                f"data.seq_len={seq_len!r} is longer than the {self.num_tokens} tokens of the documents; no chunk"
            )
        if max_chunks is not None:
            n_chunks = min(n_chunks, int(max_chunks))
        self.chunks = stream[: n_chunks * self.seq_len].view(n_chunks, self.seq_len)  # (n_chunks, seq_len)

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.chunks[i]  # (seq_len,)
        return {"input_ids": ids, "labels": ids, "sample_id": torch.tensor(i, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------------------------------
# batching and sharding
# ---------------------------------------------------------------------------------------------------------------------


def collate(batch: list[dict[str, Tensor]], pad_token_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Stack a list of items into a batch, right-padding the sequences to the longest one.

    ``input_ids`` (batch, seq) padded with ``pad_token_id`` and ``attention_mask`` (batch, seq), 1 on real tokens;
    sequence ``labels`` (causal LM) padded with -100, scalar ``labels`` (classification) stacked to (batch,);
    ``sample_id`` and any other scalar stacked, any other sequence padded with 0. ``pad_to_multiple_of`` rounds the
    padded length up (tensor-core friendly shapes).
    """
    if not batch:
        raise ConfigError("collate got an empty batch")
    if not _is_int(pad_token_id):
        raise ConfigError(f"pad_token_id must be an int, got {pad_token_id!r}; see vtrans.data.pad_token_id_of")
    lengths = [item["input_ids"].shape[0] for item in batch]
    seq = max(lengths)
    if pad_to_multiple_of:
        seq = -(-seq // pad_to_multiple_of) * pad_to_multiple_of
    out: dict[str, Tensor] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if values[0].dim() == 0:
            out[key] = torch.stack(values)  # (batch,)
            continue
        fill = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        padded = values[0].new_full((len(batch), seq), fill)  # (batch, seq)
        for i, v in enumerate(values):
            padded[i, : v.shape[0]] = v
        out[key] = padded
    lengths_t = torch.tensor(lengths)  # (batch,)
    out["attention_mask"] = (torch.arange(seq)[None, :] < lengths_t[:, None]).long()  # (batch, seq)
    return out


def global_order(n: int, *, shuffle: bool, seed: int, epoch: int = 0) -> list[int]:
    """The epoch's sample order shared by every rank: ``DistributedSampler``'s permutation (seeded ``seed + epoch``).

    Independent of ``world_size``; ``list(range(n))`` without ``shuffle``.
    """
    if not shuffle:
        return list(range(n))
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


class ContiguousBatchSampler(Sampler[list[int]]):
    """Batches of one rank: at step ``k`` the ``rank``-th contiguous slice of global batch ``G_k`` (module docstring).

    Same global order, padding and step count as ``DistributedSampler`` + ``DataLoader``; only the assignment of a
    global batch's samples to ranks differs (contiguous slices instead of round-robin).
    """

    def __init__(self, n: int, batch_size: int, *, rank: int, world_size: int, shuffle: bool, seed: int,
                 drop_last: bool = False) -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (call before iterating, as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = self.n // self.world_size if self.drop_last else -(-self.n // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = global_order(self.n, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        w, step = self.world_size, self.world_size * self.batch_size
        if self.drop_last:
            order = order[: (self.n // step) * step]
        else:
            total = -(-self.n // w) * w
            order = (order * -(-total // self.n))[:total]  # wrap around, as DistributedSampler pads
        for start in range(0, len(order), step):
            g = order[start : start + step]
            b = len(g) // w
            yield g[self.rank * b : (self.rank + 1) * b]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pad_token_id: int,
    drop_last: bool = False,
    epoch: int = 0,
    contiguous: bool = False,
    pad_to_multiple_of: int | None = None,
) -> DataLoader:
    """A ``DataLoader`` over rank ``rank``'s shard of ``dataset``, ``batch_size`` samples per rank and step.

    Default: ``DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
    drop_last=drop_last)`` with ``set_epoch(epoch)``; ``contiguous=True`` uses ``ContiguousBatchSampler`` instead.
    Either way step ``k`` of all ranks together is exactly step ``k`` of one worker with batch
    ``world_size * batch_size`` (see the module docstring for the exact relation and the padded last step).
    ``drop_last`` also drops each rank's incomplete last batch, i.e. the incomplete global batch. ``num_workers=0``.
    For later epochs build a new loader or call ``set_epoch(loader, epoch)``.
    """
    for key, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("seed", seed, None)):
        if not _is_int(value) or (low is not None and value < low):
            raise ConfigError(f"{key} must be an int{f' >= {low}' if low else ''}, got {value!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an int in [0, {world_size - 1}], got {rank!r}")
    if not _is_int(epoch) or epoch < 0:
        raise ConfigError(f"epoch must be an int >= 0, got {epoch!r}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ConfigError("dataset is empty; nothing to load")
    if drop_last and n < world_size * batch_size:
        raise ConfigError(
            f"drop_last=True leaves no batch: {n} samples < world_size * batch_size = {world_size * batch_size}"
        )
    if not _is_int(pad_token_id):
        raise ConfigError(f"pad_token_id must be an int, got {pad_token_id!r}; see vtrans.data.pad_token_id_of")
    collate_fn = functools.partial(collate, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    if contiguous:
        batch_sampler = ContiguousBatchSampler(n, batch_size, rank=rank, world_size=world_size, shuffle=shuffle,
                                               seed=seed, drop_last=drop_last)
        batch_sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=0)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=0,
                      drop_last=drop_last)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Switch a ``make_loader`` loader to another epoch's permutation (either sampler kind)."""
    for sampler in (loader.batch_sampler, loader.sampler):
        if isinstance(sampler, (ContiguousBatchSampler, DistributedSampler)):
            sampler.set_epoch(epoch)
            return
    raise ConfigError(f"loader was not built by make_loader: its sampler is {type(loader.sampler).__name__}")

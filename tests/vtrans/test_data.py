"""Task data: validation, stratified subsets, tokenized datasets, collation and the data-parallel sharding relation.

Unit tests use a 20-token WordLevel tokenizer built here; integration tests use the real MiniLM tokenizer and the
built-in Rotten Tomatoes and Wikipedia data.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data import DistributedSampler
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vtrans import assets
from vtrans.data import (
    IGNORE_INDEX,
    CausalLMDataset,
    ClassificationDataset,
    ContiguousBatchSampler,
    TextClassificationData,
    collate,
    global_order,
    make_loader,
    pad_token_id_of,
    rotten_tomatoes,
    set_epoch,
    stratified_subset,
    train_test_split,
    wikipedia_documents,
)
from vtrans.errors import ConfigError

WORDS = "the a movie film good bad great awful plot actor story was is very not".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
VOCAB = {t: i for i, t in enumerate([*SPECIALS, *WORDS])}  # [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 </s>=4 the=5 ...
PAD, UNK, CLS, SEP, EOS = range(5)


def tiny_tokenizer(eos: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace WordLevel tokenizer over WORDS; adds [CLS] ... [SEP] as BERT does."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    kw = {"eos_token": "</s>"} if eos else {}
    if pad:
        kw["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", **kw)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def ids_of(text: str) -> list[int]:
    return [VOCAB.get(w, UNK) for w in text.split()]


# ---------------------------------------------------------------------------------------------------------------------
# TextClassificationData
# ---------------------------------------------------------------------------------------------------------------------


def test_classification_data_defaults_and_subset() -> None:
    data = TextClassificationData(["a", "b", "c", "d"], [0, 2, 1, 2])
    assert data.ids == [0, 1, 2, 3] and len(data) == 4 and data.num_labels == 3
    sub = data.subset([3, 1])
    assert sub.texts == ["d", "b"] and sub.labels == [2, 2] and sub.ids == [3, 1]
    assert sub.subset([1]).ids == [1]  # ids survive nested subsets


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"texts": ["x"] * 20, "labels": [0] * 17 + ["pos", 0, 0]},
         "data.labels[17] must be a non-negative int, got 'pos'"),
        ({"texts": ["x", "y"], "labels": [0, -1]}, "data.labels[1] must be a non-negative int, got -1"),
        ({"texts": ["x", "y"], "labels": [True, 0]}, "data.labels[0] must be a non-negative int, got True"),
        ({"texts": ["x", "y"], "labels": [0, 1.0]}, "data.labels[1] must be a non-negative int, got 1.0"),
        ({"texts": ["x", "y"], "labels": [0]}, "data.labels must have one entry per text (2), got 1"),
        ({"texts": [], "labels": []}, "data.texts must be non-empty, got []"),
        ({"texts": ["x", None], "labels": [0, 1]}, "data.texts[1] must be a str, got None"),
        ({"texts": ["x", "y"], "labels": [0, 1], "ids": [5]}, "data.ids must have one entry per text (2), got 1"),
        ({"texts": ["x", "y"], "labels": [0, 1], "ids": [5, 5]}, "data.ids[1] repeats sample id 5; ids must be unique"),
        ({"texts": ["x", "y"], "labels": [0, 1], "ids": [5, "6"]}, "data.ids[1] must be an int, got '6'"),
    ],
)
def test_classification_data_rejects_bad_values_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        TextClassificationData(**kwargs)
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------------------------------
# stratified_subset / train_test_split
# ---------------------------------------------------------------------------------------------------------------------

LABELS = [0] * 600 + [1] * 300 + [2] * 97  # n = 997, interleaved below so positions do not encode the class
LABELS = [LABELS[(i * 389) % 997] for i in range(997)]


def test_stratified_subset_hand_checked_counts() -> None:
    # T = floor(0.1 * 997 + 0.5) = 100; exact shares 60.18, 30.09, 9.73 -> floors 60, 30, 9; leftover 1 -> class 2.
    idx = stratified_subset(LABELS, fraction=0.1, seed=0)
    assert len(idx) == 100
    assert Counter(LABELS[i] for i in idx) == {0: 60, 1: 30, 2: 10}
    assert idx == sorted(set(idx))


@pytest.mark.parametrize("fraction", [0.01, 0.03, 0.05, 0.13, 0.25, 0.5, 0.77, 0.999, 1.0])
def test_stratified_subset_keeps_each_class_share_within_one(fraction: float) -> None:
    n = len(LABELS)
    idx = stratified_subset(LABELS, fraction=fraction, seed=3)
    total = math.floor(fraction * n + 0.5)
    assert len(idx) == total
    got = Counter(LABELS[i] for i in idx)
    for cls, n_c in Counter(LABELS).items():
        assert abs(got[cls] - total * n_c / n) < 1
    if fraction == 1.0:
        assert idx == list(range(n))


def test_stratified_subset_count_determinism_and_seed() -> None:
    a = stratified_subset(LABELS, count=50, seed=7)
    assert a == stratified_subset(LABELS, count=50, seed=7)
    assert a != stratified_subset(LABELS, count=50, seed=8)
    assert len(a) == 50 and Counter(LABELS[i] for i in a) == {0: 30, 1: 15, 2: 5}


def test_stratified_subset_keeps_at_least_one_per_class() -> None:
    labels = [0] * 1000 + [1]
    idx = stratified_subset(labels, fraction=0.01, seed=0)  # T = 10: shares 9.99 / 0.01 -> 10 / 0, then rare gets 1
    assert len(idx) == 11 and 1000 in idx
    assert Counter(labels[i] for i in idx) == {0: 10, 1: 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of calibration.fraction or calibration.count, got fraction=None, count=None"),
        ({"fraction": 0.1, "count": 3}, "give exactly one of calibration.fraction or calibration.count, "
                                        "got fraction=0.1, count=3"),
        ({"fraction": 0.0}, "calibration.fraction must be a number in (0, 1], got 0.0"),
        ({"fraction": 1.5}, "calibration.fraction must be a number in (0, 1], got 1.5"),
        ({"fraction": True}, "calibration.fraction must be a number in (0, 1], got True"),
        ({"count": 0}, "calibration.count must be an int >= 1, got 0"),
        ({"count": 2.5}, "calibration.count must be an int >= 1, got 2.5"),
        ({"count": 998}, "calibration.count must be at most the number of samples (997), got 998"),
    ],
)
def test_stratified_subset_errors_name_the_key_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        stratified_subset(LABELS, **kwargs)
    assert str(info.value) == message


def test_stratified_subset_rejects_empty_and_non_int_labels() -> None:
    with pytest.raises(ConfigError, match=r"calibration.labels must be non-empty"):
        stratified_subset([], fraction=0.5)
    with pytest.raises(ConfigError, match=r"calibration.labels must be a sequence of ints, got 'pos'"):
        stratified_subset([0, "pos"], fraction=0.5)


def test_train_test_split_partitions_and_stratifies() -> None:
    train, test = train_test_split(len(LABELS), 0.2, seed=1, labels=LABELS)
    assert sorted(train + test) == list(range(len(LABELS))) and not set(train) & set(test)
    assert len(test) == 199  # floor(0.2 * 997 + 0.5); shares 120.36 / 60.18 / 19.46 -> 120 / 60 / 19
    assert Counter(LABELS[i] for i in test) == {0: 120, 1: 60, 2: 19}
    assert (train, test) == train_test_split(len(LABELS), 0.2, seed=1, labels=LABELS)
    train_u, test_u = train_test_split(10, 0.25, seed=0)
    assert len(test_u) == 3 and sorted(train_u + test_u) == list(range(10))  # floor(2.5 + 0.5) = 3
    assert train_test_split(10, 0.25, seed=0) == (train_u, test_u) != train_test_split(10, 0.25, seed=1)
    assert len(train_test_split(3, 0.01, seed=0)[1]) == 1  # clamped to at least one test sample


def test_train_test_split_errors() -> None:
    with pytest.raises(ConfigError, match=r"data.test_fraction must be a number in \(0, 1\), got 1.0"):
        train_test_split(10, 1.0, seed=0)
    with pytest.raises(ConfigError, match=r"data.n must be an int >= 2 to split, got 1"):
        train_test_split(1, 0.5, seed=0)
    with pytest.raises(ConfigError, match=r"data.labels must have n=10 entries, got 3"):
        train_test_split(10, 0.5, seed=0, labels=[0, 1, 0])
    with pytest.raises(ConfigError, match=r"leaves no training sample"):
        train_test_split(3, 0.3, seed=0, labels=[0, 1, 2])


# ---------------------------------------------------------------------------------------------------------------------
# datasets and collate
# ---------------------------------------------------------------------------------------------------------------------


def test_classification_dataset_tokenizes_truncates_and_keeps_ids(tok: PreTrainedTokenizerFast) -> None:
    data = TextClassificationData(["the movie was very good", "bad plot", "not a great film is it"], [1, 0, 1],
                                  ids=[10, 11, 12])
    ds = ClassificationDataset(data, tok, max_length=5, indices=[2, 1])
    assert len(ds) == 2 and ds.num_labels == 2
    item = ds[0]
    # "not a great film is it" -> 6 words + [CLS]/[SEP]; truncated to 5 tokens, [SEP] kept; "it" is unknown.
    assert item["input_ids"].tolist() == [CLS, *ids_of("not a great"), SEP]
    assert item["input_ids"].dtype == torch.long
    assert item["labels"].shape == () and item["labels"].item() == 1 and item["sample_id"].item() == 12
    assert ds[1]["input_ids"].tolist() == [CLS, *ids_of("bad plot"), SEP] and ds[1]["sample_id"].item() == 11
    with pytest.raises(ConfigError, match=r"data.max_length must be an int >= 1, got 0"):
        ClassificationDataset(data, tok, max_length=0)


def test_classification_dataset_tokenizes_once_in_one_call(tok: PreTrainedTokenizerFast) -> None:
    calls: list[int] = []

    def counting(texts, **kwargs):  # a tokenizer that records each call's batch size
        calls.append(len(texts))
        return tok(texts, **kwargs)

    ds = ClassificationDataset(TextClassificationData(["a", "the film", "good"], [0, 1, 0]), counting)
    for i in range(len(ds)):
        ds[i]
    assert calls == [3]


def test_causal_lm_dataset_chunks_the_token_stream(tok: PreTrainedTokenizerFast) -> None:
    docs = ["the movie was good", "a bad film", "very great story is not awful plot"]
    stream = ids_of(docs[0]) + [EOS] + ids_of(docs[1]) + [EOS] + ids_of(docs[2]) + [EOS]  # 17 tokens
    ds = CausalLMDataset(docs, tok, seq_len=5)
    assert ds.num_tokens == 17 and len(ds) == 17 // 5 == 3
    for i in range(3):
        item = ds[i]
        assert item["input_ids"].tolist() == stream[5 * i : 5 * i + 5]
        assert torch.equal(item["labels"], item["input_ids"]) and item["sample_id"].item() == i
    assert len(CausalLMDataset(docs, tok, seq_len=5, max_chunks=2)) == 2
    assert len(CausalLMDataset(docs, tok, seq_len=6)) == 2 and len(CausalLMDataset(docs, tok, seq_len=17)) == 1
    no_eos = CausalLMDataset(docs, tiny_tokenizer(eos=False), seq_len=4)  # no separator: 14 tokens
    assert no_eos.num_tokens == 14 and len(no_eos) == 3
    assert no_eos[1]["input_ids"].tolist() == [t for d in docs for t in ids_of(d)][4:8]
    with pytest.raises(ConfigError, match=r"data.seq_len=18 is longer than the 17 tokens"):
        CausalLMDataset(docs, tok, seq_len=18)
    with pytest.raises(ConfigError, match=r"data.max_chunks must be an int >= 1 or None, got 0"):
        CausalLMDataset(docs, tok, seq_len=4, max_chunks=0)


def test_collate_classification_pads_right_with_mask(tok: PreTrainedTokenizerFast) -> None:
    ds = ClassificationDataset(TextClassificationData(["good", "the movie was bad", "a film"], [1, 0, 1]), tok)
    batch = collate([ds[0], ds[1], ds[2]], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [
        [CLS, VOCAB["good"], SEP, PAD, PAD, PAD],
        [CLS, *ids_of("the movie was bad"), SEP],
        [CLS, VOCAB["a"], VOCAB["film"], SEP, PAD, PAD],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0, 1] and batch["sample_id"].tolist() == [0, 1, 2]
    assert all(t.dtype == torch.long for t in batch.values())
    padded = collate([ds[0], ds[2]], pad_token_id=99, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (2, 8) and padded["input_ids"][0, 3:].tolist() == [99] * 5
    assert padded["attention_mask"].sum(1).tolist() == [3, 4]


def test_collate_pads_lm_labels_with_ignore_index() -> None:
    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7]), "sample_id": torch.tensor(4)},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "sample_id": torch.tensor(9)}]
    batch = collate(items, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and batch["sample_id"].tolist() == [4, 9]
    with pytest.raises(ConfigError, match=r"pad_token_id must be an int, got None"):
        collate(items, pad_token_id=None)  # type: ignore[arg-type]


def test_pad_token_id_of_falls_back_to_eos() -> None:
    assert pad_token_id_of(tiny_tokenizer()) == PAD
    assert pad_token_id_of(tiny_tokenizer(pad=False)) == EOS
    with pytest.raises(ConfigError, match=r"has neither a pad nor an eos token"):
        pad_token_id_of(tiny_tokenizer(pad=False, eos=False))


# ---------------------------------------------------------------------------------------------------------------------
# sharding: W ranks x batch B == 1 worker x batch W*B, step by step
# ---------------------------------------------------------------------------------------------------------------------


def _dataset(n: int, tok: PreTrainedTokenizerFast) -> ClassificationDataset:
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 4)) for i in range(n)]
    data = TextClassificationData(texts, [i % 3 for i in range(n)], ids=[1000 + i for i in range(n)])
    return ClassificationDataset(data, tok)


def _steps(ds: ClassificationDataset, batch_size: int, **kw) -> list[list[int]]:
    """Sample ids per step of one loader; also checks each batch's tokens belong to its ids."""
    out = []
    for batch in make_loader(ds, batch_size, pad_token_id=PAD, **kw):
        ids = batch["sample_id"].tolist()
        for row, sid in enumerate(ids):
            expect = ds[sid - 1000]["input_ids"]
            assert batch["input_ids"][row, : expect.numel()].tolist() == expect.tolist()
        out.append(ids)
    return out


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("n", "world_size", "batch_size"), [(48, 2, 4), (37, 2, 4), (37, 3, 5), (23, 4, 2)])
def test_rank_shards_equal_the_single_worker_global_batches(
    tok: PreTrainedTokenizerFast, n: int, world_size: int, batch_size: int, drop_last: bool, contiguous: bool
) -> None:
    ds = _dataset(n, tok)
    W, B = world_size, batch_size
    for epoch, shuffle in [(0, True), (1, True), (2, True), (0, False)]:
        common = {"shuffle": shuffle, "seed": 17, "epoch": epoch, "drop_last": drop_last}
        single = _steps(ds, W * B, **common)  # one worker, batch W*B
        ranks = [_steps(ds, B, rank=r, world_size=W, contiguous=contiguous, **common) for r in range(W)]
        n_steps = n // (W * B) if drop_last else math.ceil(n / (W * B))
        assert len(single) == n_steps and all(len(steps) == n_steps for steps in ranks)

        # The documented relation: G_k from global_order, padded (wrap-around) or cut, dealt to the ranks.
        order = [1000 + i for i in global_order(n, shuffle=shuffle, seed=17, epoch=epoch)]
        pad = (-n) % W
        assert [i for step in single for i in step] == (order[: n_steps * W * B] if drop_last else order)
        padded = order[: n_steps * W * B] if drop_last else order + order[:pad]
        for k in range(n_steps):
            g = padded[k * W * B : (k + 1) * W * B]
            b = len(g) // W
            for r in range(W):
                assert ranks[r][k] == (g[r * b : (r + 1) * b] if contiguous else g[r::W])
                assert len(ranks[r][k]) == b  # equal batch sizes on every rank: DDP's mean of means is the mean
            union = sorted(i for r in range(W) for i in ranks[r][k])
            last_padded = k == n_steps - 1 and not drop_last and pad
            assert union == sorted(single[k] + (order[:pad] if last_padded else []))
        # Every sample is seen in the epoch; with drop_last only the incomplete global batch is missing.
        seen = {i for steps in ranks for step in steps for i in step}
        assert seen == (set(order[: n_steps * W * B]) if drop_last else set(order))


def test_global_order_is_distributed_samplers_permutation(tok: PreTrainedTokenizerFast) -> None:
    ds = _dataset(29, tok)
    for epoch in range(3):
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
        sampler.set_epoch(epoch)
        assert list(sampler) == global_order(29, shuffle=True, seed=5, epoch=epoch)
    assert global_order(29, shuffle=True, seed=5, epoch=0) != global_order(29, shuffle=True, seed=5, epoch=1)
    assert global_order(5, shuffle=False, seed=5) == [0, 1, 2, 3, 4]


def test_set_epoch_and_len_for_both_sampler_kinds(tok: PreTrainedTokenizerFast) -> None:
    ds = _dataset(37, tok)
    for contiguous in (False, True):
        loader = make_loader(ds, 4, shuffle=True, seed=3, rank=1, world_size=2, pad_token_id=PAD,
                             contiguous=contiguous)
        assert len(loader) == math.ceil(math.ceil(37 / 2) / 4) == 5
        first = [b["sample_id"].tolist() for b in loader]
        set_epoch(loader, 1)
        assert [b["sample_id"].tolist() for b in loader] == _steps(ds, 4, shuffle=True, seed=3, rank=1, world_size=2,
                                                                    epoch=1, contiguous=contiguous) != first
    sampler = ContiguousBatchSampler(37, 4, rank=0, world_size=2, shuffle=False, seed=0, drop_last=True)
    assert len(sampler) == len(list(sampler)) == 37 // 8


def test_make_loader_errors(tok: PreTrainedTokenizerFast) -> None:
    ds = _dataset(10, tok)
    kw = {"shuffle": True, "seed": 0, "pad_token_id": PAD}
    with pytest.raises(ConfigError, match=r"rank must be an int in \[0, 1\], got 2"):
        make_loader(ds, 2, rank=2, world_size=2, **kw)
    with pytest.raises(ConfigError, match=r"batch_size must be an int >= 1, got 0"):
        make_loader(ds, 0, **kw)
    with pytest.raises(ConfigError, match=r"drop_last=True leaves no batch: 10 samples < world_size \* batch_size"):
        make_loader(ds, 4, world_size=3, drop_last=True, **kw)
    with pytest.raises(ConfigError, match=r"pad_token_id must be an int, got None"):
        make_loader(ds, 2, shuffle=True, seed=0, pad_token_id=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# integration: real data, real MiniLM tokenizer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(assets.resolve_model("minilm"))


@pytest.mark.integration
def test_rotten_tomatoes_and_its_calibration_subset(minilm_tokenizer) -> None:
    data = rotten_tomatoes()
    assert len(data) == 12_752 and data.num_labels == 2
    assert Counter(data.labels) == {1: 7_368, 0: 5_384}
    idx = stratified_subset(data.labels, fraction=0.03, seed=0)
    # T = floor(0.03 * 12752 + 0.5) = floor(383.06) = 383; shares 221.04 / 161.52 -> 221 + 161, leftover -> rotten.
    assert len(idx) == 383
    assert Counter(data.labels[i] for i in idx) == {1: 221, 0: 162}
    ds = ClassificationDataset(data, minilm_tokenizer, max_length=64, indices=idx)
    assert len(ds) == 383 and ds.sample_ids.tolist() == idx
    lengths = [ds[i]["input_ids"].numel() for i in range(len(ds))]
    assert max(lengths) <= 64 and min(lengths) >= 3
    assert all(ds[i]["input_ids"][0].item() == minilm_tokenizer.cls_token_id for i in range(len(ds)))
    batch = next(iter(make_loader(ds, 32, shuffle=True, seed=0, pad_token_id=pad_token_id_of(minilm_tokenizer))))
    assert batch["input_ids"].shape[0] == 32 and batch["attention_mask"].sum().item() == sum(
        lengths[idx.index(s)] for s in batch["sample_id"].tolist())


@pytest.mark.integration
def test_wikipedia_chunks_through_minilm_tokenizer(minilm_tokenizer) -> None:
    docs = wikipedia_documents()
    assert len(docs) == 106
    ds = CausalLMDataset(docs, minilm_tokenizer, seq_len=128)
    assert minilm_tokenizer.eos_token_id is None  # BERT has no eos: documents are concatenated without separator
    assert len(ds) == ds.num_tokens // 128 > 1000
    assert ds[len(ds) - 1]["input_ids"].shape == (128,)
    assert len(CausalLMDataset(docs[:3], minilm_tokenizer, seq_len=128, max_chunks=7)) == 7

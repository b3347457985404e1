"""The split is leak-free, balanced and reproducible; loaders read every supported layout; batching keeps windows."""

import numpy as np
import pytest

from conftest import ACLIMDB_SAMPLE, IMDB, needs_imdb, window_sampler
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.data import load_reviews, split_indices, stratified_subset


@pytest.fixture(scope="module")
def imdb():
    reviews = load_reviews(str(IMDB))
    return reviews["text"][:], np.asarray(reviews["label"][:])  # [:]: whole columns, not row by row


@needs_imdb
def test_real_split_has_no_shared_text_and_drops_the_418_duplicates(imdb):
    texts, labels = imdb
    split = split_indices(texts, labels, [9, 1, 1], seed=42)
    assert len(texts) == 50_000 and split["duplicates_dropped"] == 418
    as_text = {name: {texts[i] for i in split[name]} for name in ("train", "validation", "test")}
    assert not as_text["train"] & as_text["test"]
    assert not as_text["train"] & as_text["validation"]
    assert not as_text["validation"] & as_text["test"]
    assert sum(len(split[n]) for n in ("train", "validation", "test")) == 50_000 - 418


@needs_imdb
def test_real_split_is_balanced_9_1_1_and_seeded(imdb):
    texts, labels = imdb
    split = split_indices(texts, labels, [9, 1, 1], seed=42)
    sizes = np.array([len(split[n]) for n in ("train", "validation", "test")])
    assert np.allclose(sizes / sizes.sum(), [9 / 11, 1 / 11, 1 / 11], atol=0.001)
    for name in ("train", "validation", "test"):
        assert abs(labels[split[name]].mean() - 0.5) < 0.01
    assert split_indices(texts, labels, [9, 1, 1], seed=42) == split
    other = split_indices(texts, labels, [9, 1, 1], seed=43)
    assert other["test"] != split["test"]


@pytest.mark.skipif(not ACLIMDB_SAMPLE.is_dir(), reason=f"aclImdb sample not found at {ACLIMDB_SAMPLE}")
def test_aclimdb_folder_loader_reads_labels_from_folders():
    reviews = load_reviews(str(ACLIMDB_SAMPLE.parent))  # the folder that holds aclImdb/, as after `tar xf`
    assert len(reviews) == 400
    expected = []
    for split in ("train", "test"):
        for label, sentiment in enumerate(("neg", "pos")):
            files = sorted((ACLIMDB_SAMPLE / split / sentiment).glob("*.txt"), key=lambda f: int(f.name.split("_")[0]))
            expected += [(f.read_text(encoding="utf-8"), label) for f in files]
    assert list(zip(reviews["text"], reviews["label"])) == expected


def _with_duplicates(folder):
    """Synthetic reviews whose train and test files repeat texts: within train, across train and test, and once
    with the other label. What the real IMDB copy has (96, 199 and 123 duplicates), on data every clone has."""
    import csv

    from conftest import synthetic_reviews

    rows = synthetic_reviews(200, seed=3)
    train = rows[:120] + [rows[5], rows[6], rows[7]]  # three repeated within train
    test = rows[120:] + [rows[10], rows[11], {"text": rows[12]["text"], "label": 1 - rows[12]["label"]}]
    folder.mkdir()
    for name, part in (("train", train), ("test", test)):
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    return folder


@pytest.mark.parametrize("seed", [0, 42])
def test_every_text_lands_in_exactly_one_split_also_when_the_data_repeats_texts(tmp_path, seed):
    """Sabotage: keeping duplicates (no de-duplication), or a split that lets one index into two parts."""
    reviews = load_reviews(str(_with_duplicates(tmp_path / f"dup{seed}")))
    texts, labels = reviews["text"][:], np.asarray(reviews["label"][:])
    split = split_indices(texts, labels, [9, 1, 1], seed=seed)
    assert len(texts) == 206 and split["duplicates_dropped"] == 6 and split["label_conflicts"] == 1
    as_text = {name: [texts[i] for i in split[name]] for name in ("train", "validation", "test")}
    every = [t for part in as_text.values() for t in part]
    assert len(every) == len(set(every)) == len(set(texts)) == 200  # each distinct text once, none lost
    first = {}
    for i, text in enumerate(texts):
        first.setdefault(text, i)
    assert sorted(i for name in as_text for i in split[name]) == sorted(first.values())  # the first row of each


def test_the_split_is_the_documented_seeded_draw(tmp_path):
    """Pins which reviews are validation and which are test: per label, the unique rows shuffled by
    numpy.random.default_rng(split_seed) (label 0, then label 1), the first round(n/11) to validation and the next
    round(n/11) to test. Runs of other seeds share a test set only if this never changes; sabotage: validation and
    test swapped, which no size or overlap check sees."""
    reviews = load_reviews(str(_with_duplicates(tmp_path / "dup")))
    texts, labels = reviews["text"][:], np.asarray(reviews["label"][:])
    split = split_indices(texts, labels, [9, 1, 1], seed=7)
    first = {}
    for i, text in enumerate(texts):
        first.setdefault(text, i)
    unique = np.array(list(first.values()))
    rng, expected = np.random.default_rng(7), {"validation": [], "test": []}
    for label in (0, 1):
        rows = rng.permutation(unique[labels[unique] == label])
        n = round(len(rows) / 11)
        expected["validation"] += rows[:n].tolist()
        expected["test"] += rows[n:2 * n].tolist()
    assert split["validation"] == sorted(expected["validation"]) and split["test"] == sorted(expected["test"])


def test_csv_folder_loads_train_then_test(reviews_dir):
    reviews = load_reviews(str(reviews_dir))
    assert len(reviews) == 220 and reviews[0]["text"].startswith("review 0:") and reviews[120]["text"].startswith("review 120:")


@pytest.mark.parametrize("content, message", [
    ("text,label\nfine film,1\nbad film,2\n", "label 2 at row 1"),
    ("review,label\nfine film,1\n", r"lacks column\(s\) text"),
    ("text,label\n ,1\nbad film,0\n", "empty or missing text"),
])
def test_malformed_data_is_rejected_with_the_reason(tmp_path, content, message):
    (tmp_path / "train.csv").write_text(content)
    with pytest.raises(UserError, match=message):
        load_reviews(str(tmp_path))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        load_reviews(str(tmp_path / "nope"))


def test_stratified_subset_keeps_balance_and_size():
    labels = np.array([0] * 700 + [1] * 300)
    subset = stratified_subset(list(range(1000)), labels, 101, seed=1)
    assert len(subset) == 101 and len(set(subset)) == 101
    assert abs(labels[subset].mean() - 0.3) < 0.01
    assert stratified_subset(list(range(1000)), labels, 101, seed=1) == subset


def _windows(sampler):
    """Per optimizer step: the (index, weight) rows of all micro-batches of all processes."""
    sampler_list = sampler if isinstance(sampler, list) else [sampler]
    per_process = [list(s) for s in sampler_list]
    accum = sampler_list[0].layout.loader_batches
    steps = len(per_process[0]) // accum
    return [sorted(row for batches in per_process for batch in batches[s * accum:(s + 1) * accum] for row in batch)
            for s in range(steps)]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_same_samples_in_the_same_steps_however_the_window_is_cut(group_by_length):
    lengths = np.random.default_rng(0).integers(5, 500, size=103)
    kwargs = dict(seed=3, group_by_length=group_by_length)
    one_batch = window_sampler(lengths, 12, 1, **kwargs)
    accumulated = window_sampler(lengths, 4, 3, **kwargs)
    two_processes = [window_sampler(lengths, 2, 3, num_processes=2, process_index=p, **kwargs) for p in (0, 1)]
    for epoch in (1, 2):
        for s in [one_batch, accumulated, *two_processes]:
            s.set_epoch(epoch)
        reference = _windows(one_batch)
        assert _windows(accumulated) == reference
        assert _windows(two_processes) == reference
    assert len(reference) == 9  # 8 full windows of 12 and a last one of 7


def test_every_sample_once_per_epoch_and_window_weights_sum_to_one():
    lengths = np.arange(1, 31)
    for sampler in [window_sampler(lengths, 4, 3, seed=0), window_sampler(lengths, 4, 5, seed=0),
                    *[window_sampler(lengths, 1, 3, seed=0, num_processes=2, process_index=p) for p in (0, 1)]]:
        assert len(list(sampler)) == len(sampler)
    windows = _windows([window_sampler(lengths, 1, 3, seed=0, num_processes=2, process_index=p) for p in (0, 1)])
    # 30 samples in windows of 6: five full windows
    seen = [i for w in windows for i, weight in w if weight > 0]
    assert sorted(seen) == list(range(30))
    for w in windows:
        assert sum(weight for _, weight in w) == pytest.approx(1.0)
    # 30 samples in windows of 4 x 5 = 20: the last window (10 samples) still has 5 micro-batches
    last = list(window_sampler(lengths, 4, 5, seed=0))[5:]
    assert len(last) == 5 and sum(len(b) for b in last) == 10


def test_a_last_window_smaller_than_its_micro_batch_count_is_padded_with_zero_weight():
    lengths = np.arange(1, 8)  # 7 samples, windows of 2 x 3 = 6: the last window has one sample for 3 micro-batches
    batches = list(window_sampler(lengths, 2, 3, seed=0, group_by_length=False))
    last = batches[3:]
    assert [len(b) for b in last] == [1, 1, 1]
    assert [w for b in last for _, w in b] == [1.0, 0.0, 0.0]


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(0).integers(20, 512, size=2000)

    def padding_efficiency(sampler):
        batches = [[i for i, _ in b] for b in sampler]
        return sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    grouped = padding_efficiency(window_sampler(lengths, 16, 1, seed=0, group_by_length=True))
    random_order = padding_efficiency(window_sampler(lengths, 16, 1, seed=0, group_by_length=False))
    assert grouped > 0.97 and random_order < 0.7


def _prepare(tmp_path, model_dir, data_dir):
    from conftest import tiny_config
    from imdb_grad_accum.config import load_config
    from imdb_grad_accum.model import load_model

    cfg = load_config(tiny_config(tmp_path, model_dir, data_dir))
    tokenizer, model = load_model(cfg)
    return cfg, tokenizer, model


def test_second_start_reads_the_tokenisation_cache(tmp_path, reviews_dir, tiny_bert):
    from unittest import mock

    from imdb_grad_accum.data import prepare_data

    cfg, tokenizer, model = _prepare(tmp_path, tiny_bert, reviews_dir)
    first = prepare_data(cfg, tokenizer, model.input_names)
    with mock.patch.object(type(tokenizer), "__call__", side_effect=AssertionError("tokenised again")):
        second = prepare_data(cfg, tokenizer, model.input_names)
    assert second.train["input_ids"] == first.train["input_ids"]


def test_token_type_ids_are_kept_only_for_encoders_that_take_them(tmp_path, reviews_dir, tiny_bert, tiny_modernbert):
    from imdb_grad_accum.data import prepare_data

    for model_dir, expected in ((tiny_bert, True), (tiny_modernbert, False)):
        cfg, tokenizer, model = _prepare(tmp_path, model_dir, reviews_dir)
        splits = prepare_data(cfg, tokenizer, model.input_names)
        assert ("token_type_ids" in splits.train.column_names) is expected


def test_batches_are_padded_to_their_own_longest_review(tmp_path, reviews_dir, tiny_bert):
    from imdb_grad_accum.batching import make_eval_loader, make_train_loader
    from imdb_grad_accum.data import prepare_data

    cfg, tokenizer, model = _prepare(tmp_path, tiny_bert, reviews_dir)
    splits = prepare_data(cfg, tokenizer, model.input_names)
    sampler = window_sampler(splits.train["length"], 8, 1, seed=0)
    for loader in (make_train_loader(splits.train, sampler, tokenizer, cfg), make_eval_loader(splits.test, tokenizer, cfg)):
        for batch in loader:
            assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max() < cfg.data.max_length


@pytest.mark.parametrize("truncation", ["head", "tail", "head_tail"])
def test_truncation_keeps_the_chosen_ends_of_long_reviews(tiny_bert, truncation):
    import datasets
    from transformers import AutoTokenizer

    from imdb_grad_accum.data import tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    words = [f"w{i}" for i in range(300)]
    reviews = datasets.Dataset.from_dict({"text": [" ".join(words), "short review"], "label": [1, 0]})
    rows = tokenize(reviews, tokenizer, 34, ["input_ids", "attention_mask"], truncation)
    long, short = (tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") for ids in rows["input_ids"])
    assert 30 <= len(rows[0]["input_ids"]) <= 34 and short == "shortreview"  # cuts may split a word's pieces
    joined = "".join(words)
    if truncation == "head":
        assert joined.startswith(long) and len(rows[0]["input_ids"]) == 34
    elif truncation == "tail":
        assert joined.endswith(long) and long.endswith("w298w299") and not long.startswith("w0")
    else:  # 32 tokens of budget: about the first 8 and the last 24
        assert long.startswith("w0w1") and long.endswith("w298w299") and "w150" not in long


@pytest.mark.parametrize("truncation", ["head", "tail", "head_tail"])
def test_a_very_long_review_keeps_the_tokens_of_its_whole_tokenisation_without_tokenising_it_whole(
        tiny_bert, truncation, monkeypatch):
    """A review far longer than the budget is tokenised in pieces (a 49 MB one took 97 s and 7.7 GB whole): the
    tokens kept and its full length are those of tokenising it whole, and no call sees the whole text."""
    from transformers import AutoTokenizer

    from imdb_grad_accum import data

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    words = [f"w{i % 997}" for i in range(6000)]
    text = "  ".join(" ".join(words[i:i + 7]) + "." for i in range(0, len(words), 7))  # runs of whitespace too
    columns = ["input_ids", "attention_mask"]
    monkeypatch.setattr(data, "LONG_REVIEW", 10**9)
    whole = data.encode([text, "short"], tokenizer, 64, columns, truncation)
    seen, call = [], type(tokenizer).__call__

    def recorded(self, texts, *args, **kwargs):
        seen.extend(len(t) for t in (texts if isinstance(texts, list) else [texts]))
        return call(self, texts, *args, **kwargs)

    monkeypatch.setattr(data, "LONG_REVIEW", 2_000)
    monkeypatch.setattr(type(tokenizer), "__call__", recorded)
    pieces = data.encode([text, "short"], tokenizer, 64, columns, truncation)
    assert pieces == whole and max(seen) < len(text) / 4

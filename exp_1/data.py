"""IMDB data: load, de-duplicate, split once with a seed, tokenise with a cache, batch by optimizer-step windows.

The split is leak-free by construction: train and test of the source are combined, duplicate texts are dropped, and
one seeded stratified split assigns every remaining review to exactly one of train/validation/test.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import datasets
import numpy as np
import pyarrow
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from exp_1.config import StepLayout
from exp_1.errors import UserError
from exp_1.imdb_sentiment import keep_ends

SOURCE_SPLITS = ("train", "test")  # combined in this order; the hub's `unsupervised` split has no labels
ACLIMDB_FILE = re.compile(r"^(\d+)_(\d+)\.txt$")


# ----------------------------------------------------------------------------------------------- loading

def load_reviews(path: str) -> datasets.Dataset:
    """All labelled reviews of a source as one Dataset(text, label): source train rows, then source test rows.

    `path` is a hub dataset id (stanfordnlp/imdb), or a local folder holding the hub's parquet layout, an `aclImdb`
    folder from the official tarball, or csv/jsonl/parquet files with `text` and `label` columns.
    """
    folder = Path(path).expanduser()
    looks_local = folder.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "no such folder"
        raise UserError(f"data.path={path}: {problem}; point it at a folder of IMDB files or a hub dataset id")
    if looks_local and (folder / "aclImdb").is_dir():
        folder = folder / "aclImdb"
    if looks_local and (folder / "train" / "pos").is_dir():
        parts = [_read_aclimdb_split(folder / split) for split in SOURCE_SPLITS if (folder / split).is_dir()]
        return _check_reviews(datasets.concatenate_datasets(parts), path)

    quiet = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log lines would precede our one line
    try:
        loaded = datasets.load_dataset(str(folder) if looks_local else path)
    except (OSError, ValueError, datasets.exceptions.DatasetsError, pyarrow.ArrowException) as err:
        # what datasets raises for a missing hub dataset (ConnectionError, DatasetNotFoundError) or unreadable files
        if looks_local:
            _name_non_utf8_file(folder)
            cause = err.__cause__ or err  # DatasetGenerationError wraps the reader's own error
            raise UserError(f"data.path={path}: cannot read data files there ({type(cause).__name__}: "
                            f"{_first_line(cause)}); expected parquet/csv/jsonl files with text and label") from None
        raise UserError(f"data.path={path}: cannot load it from the HF hub and no cached copy exists "
                        f"({type(err).__name__}); check the id and your connection, or set data.path to a local "
                        "folder, e.g. data.path=/path/to/imdb") from None
    finally:
        datasets.logging.set_verbosity(quiet)
    names = [s for s in SOURCE_SPLITS if s in loaded] or [s for s in loaded if s != "unsupervised"]
    if not names:
        raise UserError(f"data.path={path}: no labelled split found (splits: {', '.join(loaded)})")
    parts = []
    for name in names:
        part = loaded[name]
        missing = {"text", "label"} - set(part.column_names)
        if missing:
            raise UserError(f"data.path={path}: split '{name}' lacks column(s) {', '.join(sorted(missing))}; "
                            f"found {', '.join(part.column_names)}")
        parts.append(_labels_as_0_1(part.select_columns(["text", "label"]), path, name))
    return _check_reviews(datasets.concatenate_datasets(parts), path)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _read_aclimdb_split(split_dir: Path) -> datasets.Dataset:
    """Negatives then positives, each by file id: the order of the hub's parquet files."""
    texts, labels = [], []
    for label, sentiment in enumerate(("neg", "pos")):
        files = [(int(m.group(1)), f) for f in (split_dir / sentiment).iterdir() if (m := ACLIMDB_FILE.match(f.name))]
        for _, file in sorted(files):
            try:
                texts.append(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError as err:
                raise UserError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8 "
                                "or remove it") from None
            labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels},
                                      features=datasets.Features(text=datasets.Value("string"),
                                                                 label=datasets.Value("int64")))


LABEL_NAMES = {"0": 0, "1": 1, "neg": 0, "pos": 1, "negative": 0, "positive": 1}  # case-insensitive


def _labels_as_0_1(part: datasets.Dataset, path: str, split: str) -> datasets.Dataset:
    """Labels as int64 0/1. Integers 0/1 stay; the names neg/pos and negative/positive, as strings or as the names of
    a ClassLabel (the hub's IMDB), become 0/1; anything else is named in one line."""
    values = part["label"][:]
    feature = part.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        values = [feature.int2str(int(v)) for v in values]
    numbers = []
    for row, value in enumerate(values):
        number = _label_number(value)
        if number is None:
            raise UserError(f"data.path={path}: split '{split}' has label {value!r} at row {row}; labels must be 0 "
                            "(negative) or 1 (positive), or the names neg/pos or negative/positive")
        numbers.append(number)
    return part.remove_columns("label").add_column("label", numbers, feature=datasets.Value("int64"))


def _label_number(value) -> Optional[int]:
    if isinstance(value, str):
        return LABEL_NAMES.get(value.strip().lower())
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and value in (0, 1):
        return int(value)
    return None


def _name_non_utf8_file(folder: Path) -> None:
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix.lower() in (".csv", ".json", ".jsonl", ".txt", ".tsv"):
            try:
                file.read_bytes().decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8 "
                                "or remove it") from None


def _check_reviews(reviews: datasets.Dataset, path: str) -> datasets.Dataset:
    if len(reviews) == 0:
        raise UserError(f"data.path={path}: no reviews found")
    labels = np.asarray(reviews["label"][:])  # [:] reads the whole column at once; iterating a Column goes row by row
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise UserError(f"data.path={path}: label {labels[bad[0]]} at row {bad[0]}; labels must be 0 (negative) "
                        "or 1 (positive)")
    empty = [i for i, t in enumerate(reviews["text"][:]) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise UserError(f"data.path={path}: {len(empty)} empty or missing text(s), first at row {empty[0]}; "
                        "remove them from the data")
    return reviews


# ----------------------------------------------------------------------------------------------- splitting

def content_sha256(texts: list[str], labels) -> str:
    """A fingerprint of the reviews themselves, so that a resume notices data that changed under the same indices."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels):
        digest.update(f"{int(label)}\0{text}\0".encode())
    return digest.hexdigest()


def split_indices(texts: list[str], labels: np.ndarray, weights, seed: int) -> dict:
    """One seeded, stratified train/validation/test split of the unique texts.

    Returns {"train", "validation", "test": sorted row indices, "duplicates_dropped": N}. Only the first occurrence
    of each text is kept, so no review can land in two splits.
    """
    first_seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        first_seen.setdefault(text, i)
    unique = np.fromiter(first_seen.values(), dtype=np.int64)
    rng = np.random.default_rng(seed)
    fractions = np.asarray(weights, dtype=float) / sum(weights)
    parts: dict[str, list] = {"train": [], "validation": [], "test": []}
    for label in (0, 1):
        rows = rng.permutation(unique[labels[unique] == label])
        n_val, n_test = (int(round(len(rows) * f)) for f in fractions[1:])
        parts["validation"].append(rows[:n_val])
        parts["test"].append(rows[n_val:n_val + n_test])
        parts["train"].append(rows[n_val + n_test:])
    result = {name: np.sort(np.concatenate(chunks)).tolist() for name, chunks in parts.items()}
    result["duplicates_dropped"] = len(texts) - len(unique)
    return result


def stratified_subset(indices: list[int], labels: np.ndarray, size: Optional[int], seed: int) -> list[int]:
    """`size` rows of `indices` with the same class balance (largest remainder), chosen by the seed."""
    if size is None or size >= len(indices):
        return list(indices)
    indices = np.asarray(indices)
    rng = np.random.default_rng(seed)
    by_class = [indices[labels[indices] == label] for label in (0, 1)]
    quotas = np.array([size * len(rows) / len(indices) for rows in by_class])
    counts = np.floor(quotas).astype(int)
    counts[np.argmax(quotas - counts)] += size - counts.sum()
    chosen = [rng.choice(rows, count, replace=False) for rows, count in zip(by_class, counts)]
    return np.sort(np.concatenate(chosen)).tolist()


# ----------------------------------------------------------------------------------------------- tokenising

@dataclass
class Splits:
    train: datasets.Dataset  # tokenised: input_ids, attention_mask, [token_type_ids], label, length, full_length
    validation: datasets.Dataset  # the same, plus index (the review's row in the combined reviews)
    test: datasets.Dataset
    record: dict  # written to split.json
    reviews: datasets.Dataset  # the combined reviews (text, label) the indices point into


def prepare_data(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, columns: list[str]) -> Splits:
    """The run's split of the reviews (drawn by data.split_seed), tokenised into `columns` (the model's inputs)."""
    seed = cfg.data.split_seed
    reviews = load_reviews(cfg.data.path)
    labels, texts = np.asarray(reviews["label"][:]), reviews["text"][:]
    record = split_indices(texts, labels, cfg.data.split, seed)
    for name in ("train", "validation", "test"):
        if not record[name]:
            raise UserError(f"data.split={list(cfg.data.split)} leaves no {name} reviews out of {len(reviews)}; "
                            "use more data or larger weights")
    record["full_sizes"] = {name: len(record[name]) for name in ("train", "validation", "test")}
    limits = {"train": cfg.data.max_train_samples, "validation": cfg.data.max_val_samples,
              "test": cfg.data.max_test_samples}
    for name, limit in limits.items():
        record[name] = stratified_subset(record[name], labels, limit, seed)
    if len(set(labels[record["train"]])) < 2:
        raise UserError(f"data.path={cfg.data.path}: the training reviews are all of one class; a classifier needs "
                        "both negative (0) and positive (1) reviews")
    record.update(source=cfg.data.path, split_seed=seed, split_weights=list(cfg.data.split), combined_size=len(reviews),
                  data_sha256=content_sha256(texts, labels))

    tokenized = {}
    for name in ("train", "validation", "test"):
        rows = tokenize(reviews.select(record[name]), tokenizer, cfg.data.max_length, columns, cfg.data.truncation)
        tokenized[name] = rows if name == "train" else rows.add_column("index", record[name])
    if max(tokenized["train"]["length"][:]) > cfg.data.max_length:  # a tokenizer that ignores max_length
        raise UserError(f"data.max_length={cfg.data.max_length}: {cfg.model.name}'s tokenizer does not cut reviews to "
                        "it; choose another max_length or model")
    return Splits(**tokenized, record=record, reviews=reviews)


def tokenize(reviews: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, columns: list[str],
             truncation: str = "head") -> datasets.Dataset:
    """Batched fast tokenisation through `datasets.map`, cached on disk by content, tokenizer, max_length and
    truncation, so the second start of the same config does not tokenise again."""
    key = hashlib.sha256()
    backend = tokenizer.backend_tokenizer
    backend.no_truncation(), backend.no_padding()  # call state, which every tokenising call sets again
    key.update(backend.to_str().encode())  # the string as is: parsing it (a whole vocabulary) took longer than the rest
    key.update(f"{max_length}|{columns}|{truncation}|full_length".encode())
    for text, label in zip(reviews["text"][:], reviews["label"][:]):
        key.update(f"{label}\0{text}\0".encode())
    cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "imdb_tokenized"
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = key.hexdigest()[:32]  # also the fingerprint, so datasets need not hash the tokenizer `map` is given
    return reviews.map(lambda batch: encode(batch["text"], tokenizer, max_length, columns, truncation), batched=True,
                       remove_columns=["text"], desc="Tokenising", new_fingerprint=name,
                       cache_file_name=str(cache_dir / f"{name}.arrow"), load_from_cache_file=True)


def encode(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int, columns: list[str],
           truncation: str = "head") -> dict:
    """Model inputs of reviews as training sees them (`columns`, cut to max_length the `truncation` way), plus their
    `length` in tokens and the `full_length` they would have uncut."""
    whole = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=truncation != "head", verbose=False)
    if truncation != "head":
        budget = max_length - tokenizer.num_special_tokens_to_add()
        texts = keep_ends(texts, whole["offset_mapping"], budget, truncation)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    out = {name: encoded[name] for name in columns if name in encoded}  # RoBERTa's returns no token types
    out["length"] = [len(ids) for ids in encoded["input_ids"]]
    special = tokenizer.num_special_tokens_to_add()
    out["full_length"] = [len(ids) + special for ids in whole["input_ids"]]
    return out


# ----------------------------------------------------------------------------------------------- batching

class WindowBatchSampler:
    """Micro-batches for one process, grouped into optimizer-step windows.

    An epoch's order depends only on the seed, the epoch and the effective batch (micro-batch x accumulation x
    processes): the samples are shuffled, optionally grouped by length, and cut into windows of one effective batch.
    Each window is then cut into exactly `layout.loader_batches x processes` micro-batches, dealt round-robin to processes,
    so `batch_size=12` and `batch_size=4, grad_accum_steps=3` put the same samples in the same optimizer steps.

    Every sample carries `loss_weight = 1 / (samples in its window)`: the weighted loss sums to the window's mean, so
    a step over k micro-batches equals a step over one batch, also for the smaller last window of an epoch. A last
    window with fewer samples than micro-batches is filled with copies of weight 0, which add nothing to the gradient.
    """

    GROUP_WINDOWS = 50  # windows per length-sorted chunk: enough to group lengths, few enough to stay random

    def __init__(self, lengths, layout: StepLayout, seed: int, process_index: int = 0, group_by_length: bool = True):
        self.lengths = np.asarray(lengths)
        self.layout, self.seed, self.process_index = layout, seed, process_index
        self.group_by_length = group_by_length
        self.effective_batch = layout.effective_batch
        self.batches_per_step = layout.loader_batches  # loader batches (micro-batches) per optimizer step
        self.epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.effective_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    def window_totals(self) -> list[tuple[int, int]]:
        """(samples, real tokens) of each of the epoch's optimizer steps, over all processes."""
        return [(len(window), int(self.lengths[window].sum())) for window in self.windows()]

    def windows(self) -> list[np.ndarray]:
        """The epoch's optimizer steps, as arrays of dataset indices (global, across processes)."""
        size = self.effective_batch
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths))
        if self.group_by_length:
            chunk = size * self.GROUP_WINDOWS
            order = np.concatenate([
                part[np.argsort(-self.lengths[part], kind="stable")] for part in np.split(order, range(chunk, len(order), chunk))
            ])
        windows = [order[i:i + size] for i in range(0, len(order), size)]
        if self.group_by_length:
            full = [w for w in windows if len(w) == size]
            perm = np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(full))
            windows = [full[i] for i in perm] + [w for w in windows if len(w) < size]
        return windows

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batches_per_step

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        processes = self.layout.processes
        parts = self.batches_per_step * processes
        for window in self.windows():
            weight = 1.0 / len(window)
            if len(window) < parts:  # pad with weight-0 copies so every process gets its batches_per_step batches
                rows = [(int(i), weight) for i in window] + [(int(window[0]), 0.0)] * (parts - len(window))
                micro_batches = [[row] for row in rows]
            else:
                micro_batches = [[(int(i), weight) for i in chunk] for chunk in np.array_split(window, parts)]
            yield from micro_batches[self.process_index::processes]


class WeightedRows(torch.utils.data.Dataset):
    """Reads the rows a WindowBatchSampler names, attaching each row's loss weight."""

    def __init__(self, rows: datasets.Dataset):
        self.rows = rows.remove_columns(["length", "full_length"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, keys: list[tuple[int, float]]) -> list[dict]:
        columns = self.rows[[index for index, _ in keys]]
        return [{**{name: values[i] for name, values in columns.items()}, "loss_weight": keys[i][1]}
                for i in range(len(keys))]


class PackedRows(torch.utils.data.Dataset):
    """The training rows as flat token arrays, read by a WindowBatchSampler: each micro-batch comes out as one packed
    row (exp_1/packing.py), gathered with numpy in a few vectorised operations, without a Python loop over reviews
    or tokens or a tensor built from lists (what a GPU step at batch 32 otherwise waits for).

    With `slots` (train.cuda_graphs: the most reviews a micro-batch holds) every row has a fixed layout, so that a
    compiled step sees only a few shapes and no changing number: the tokens are padded to a multiple of
    packing.BUCKET, the boundaries have `slots` review entries (unused ones empty) and then the padding cut into
    sequences of at most `max_length` tokens, max_seqlen is `max_length`, and unused slots get loss weight 0."""

    def __init__(self, rows: datasets.Dataset, slots: int | None = None, max_length: int = 512):
        self.slots, self.max_length = slots, max_length
        table = rows.with_format("arrow")[:]
        ids = table.column("input_ids").combine_chunks()
        offsets = ids.offsets.to_numpy().astype(np.int64)
        self.offsets = offsets - offsets[0]
        self.tokens = ids.flatten().to_numpy().astype(np.int32)
        self.token_types = (table.column("token_type_ids").combine_chunks().flatten().to_numpy().astype(np.int8)
                            if "token_type_ids" in table.column_names else None)
        self.labels = table.column("label").to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, keys: list[tuple[int, float]]) -> dict:
        index = np.fromiter((i for i, _ in keys), dtype=np.int64, count=len(keys))
        starts, lengths = self.offsets[index], self.offsets[index + 1] - self.offsets[index]
        cu_seqlens = np.zeros(len(keys) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        positions = np.arange(cu_seqlens[-1], dtype=np.int64) - np.repeat(cu_seqlens[:-1], lengths)
        gather = np.repeat(starts, lengths) + positions
        labels, weights = self.labels[index], np.fromiter((w for _, w in keys), dtype=np.float32, count=len(keys))
        batch = {"input_ids": self.tokens[gather].astype(np.int64), "position_ids": positions,
                 "cu_seqlens": cu_seqlens, "max_seqlen": int(lengths.max()), "labels": labels, "loss_weight": weights}
        if self.token_types is not None:
            batch["token_type_ids"] = self.token_types[gather].astype(np.int64)
        if self.slots:
            batch = self._bucketed(batch)
        batch["num_tokens"] = len(batch["input_ids"])
        for name in ("input_ids", "position_ids", "token_type_ids"):
            if name in batch:
                batch[name] = torch.from_numpy(batch[name])[None]
        for name in ("cu_seqlens", "labels", "loss_weight"):
            batch[name] = torch.from_numpy(batch[name])
        return batch

    def _bucketed(self, batch: dict) -> dict:
        from exp_1.packing import BUCKET

        n, real = len(batch["labels"]), int(batch["cu_seqlens"][-1])
        pad = -(-real // BUCKET) * BUCKET - real
        segments = -(-(BUCKET - 1) // self.max_length)  # enough sequences of <= max_length for any padding
        cu = np.full(self.slots + 1 + segments, real, dtype=np.int32)
        cu[:n + 1] = batch["cu_seqlens"]
        cu[self.slots + 1:] = real + np.minimum(self.max_length * np.arange(1, segments + 1), pad)
        fill = np.zeros(pad, dtype=np.int64)
        out = {"input_ids": np.concatenate([batch["input_ids"], fill]),
               "position_ids": np.concatenate([batch["position_ids"], np.arange(pad) % self.max_length]),
               "cu_seqlens": cu, "max_seqlen": self.max_length, "num_reviews": self.slots,
               "labels": np.zeros(self.slots, dtype=np.int64), "loss_weight": np.zeros(self.slots, dtype=np.float32)}
        out["labels"][:n], out["loss_weight"][:n] = batch["labels"], batch["loss_weight"]
        if "token_type_ids" in batch:
            out["token_type_ids"] = np.concatenate([batch["token_type_ids"], fill])
        return out


@dataclass
class Loaders:
    sampler: WindowBatchSampler  # call sampler.set_epoch(epoch) before each epoch
    train: DataLoader
    validation: DataLoader
    test: DataLoader


# Each loader has its own generator: starting to iterate a DataLoader draws a seed from its generator, and from the
# global one that dropout uses if it has none, which would make a resumed run's dropout masks differ.
def make_loaders(splits: Splits, tokenizer, cfg: DictConfig, layout: StepLayout, process_index: int = 0,
                 device: torch.device = torch.device("cpu"), packed: bool = False) -> Loaders:
    """Training batches cut by `layout` for process `process_index`. `packed`: training batches are packed rows
    (exp_1/packing.py); evaluation always pads."""
    parts = layout.loader_batches * layout.processes
    if parts > len(splits.train):  # windows would be mostly weight-0 filler micro-batches
        raise UserError(f"an optimizer step of {layout.loader_batches} micro-batch(es) x {layout.processes} "
                        f"process(es) needs at least as many training reviews, and there are {len(splits.train)}; "
                        "lower train.grad_accum_steps (or train.effective_batch_size), or train on more reviews")
    sampler = WindowBatchSampler(splits.train["length"][:], layout, cfg.seed, process_index, cfg.data.group_by_length)
    return Loaders(sampler, make_train_loader(splits.train, sampler, tokenizer, cfg, device, packed),
                   make_eval_loader(splits.validation, tokenizer, cfg, device),
                   make_eval_loader(splits.test, tokenizer, cfg, device))


def make_train_loader(rows: datasets.Dataset, sampler: WindowBatchSampler, tokenizer, cfg: DictConfig,
                      device: torch.device = torch.device("cpu"), packed: bool = False) -> DataLoader:
    """Padded micro-batches (dynamic padding), or packed rows when `packed`, which come out of PackedRows whole (in
    fixed-shape buckets with train.cuda_graphs)."""
    slots = sampler.layout.loader_batch_size if cfg.train.cuda_graphs else None
    dataset, collate = ((PackedRows(rows, slots, cfg.data.max_length), _whole) if packed else
                        (WeightedRows(rows), make_collator(tokenizer, cfg, device)))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator())


def _whole(batch: dict) -> dict:
    return batch


def make_eval_loader(rows: datasets.Dataset, tokenizer, cfg: DictConfig,
                     device: torch.device = torch.device("cpu")) -> DataLoader:
    """Longest reviews first, so each batch pads little and memory peaks at the start. Batches carry each review's
    `index` and `full_length` for the prediction files."""
    by_length = rows.select(np.argsort(-np.asarray(rows["length"][:]), kind="stable")).remove_columns("length")
    return DataLoader(by_length, batch_size=cfg.train.batch_size * 2, shuffle=False,
                      collate_fn=make_collator(tokenizer, cfg, device), num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator())


def make_collator(tokenizer, cfg: DictConfig, device: torch.device) -> DataCollatorWithPadding:
    """Pads each batch to its own longest review (dynamic padding). On GPUs, to a multiple of 64 unless
    data.pad_to_multiple_of says otherwise: cuDNN attention plans each new sequence length anew (measured on an
    H100: 3x slower steps while lengths are new), and multiples of 64 leave few lengths to plan."""
    multiple = cfg.data.pad_to_multiple_of or (64 if device.type == "cuda" else None)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, return_tensors="pt")


def review_starts(reviews: datasets.Dataset, indices) -> list[str]:
    """The first 200 characters of the reviews at `indices` (rows of the combined reviews), for prediction files."""
    return [text[:200] for text in reviews.select([int(i) for i in indices])["text"][:]]

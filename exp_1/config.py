"""Experiment configuration: one typed schema, YAML files on top of it, `dotted.key=value` overrides on top of those.

Every mistake a user can make in a config (unknown key, wrong type, value out of range, missing file) becomes a
`UserError` with a one-line message that names the key and the fix.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

PROJECT_NAME = "imdb-grad-accum"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
MAX_SEED = 2**32 - 1  # numpy's legacy seeding and CUDA's generators take no more
MAX_SIZE = 2**31 - 1  # sizes and counts: more would overflow the loaders' index arithmetic


class UserError(Exception):
    """A mistake in the user's input: reported as one line and exit code 2, never as a traceback."""


class RunStopped(Exception):
    """The run stopped before its end (a diverging loss, a full disk, a signal, a lost peer process): one line, its own
    exit code, and every file saved before kept usable."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ModelConfig:
    name: str = "bert-base-uncased"  # hub id or local folder
    pooling: str = "mean"  # mean (attention-masked) | cls
    dropout: float = 0.1  # before the linear head
    encoder_dropout: Optional[float] = None  # null keeps the checkpoint's; 0 makes training deterministic
    attention_dropout: Optional[float] = None  # null keeps the checkpoint's; 0 keeps CPU attention on its fast path
    attn_implementation: Optional[str] = None  # null lets transformers choose (sdpa where available)
    trust_remote_code: bool = False  # run model code from the hub: only for models you trust


@dataclass
class DataConfig:
    path: str = "stanfordnlp/imdb"  # hub dataset id or local folder
    split: List[float] = field(default_factory=lambda: [9.0, 1.0, 1.0])  # train:validation:test weights
    split_seed: int = 42  # draws the split (and subsets): runs with other training seeds share one test set
    max_length: int = 512  # tokens per review, special tokens included; longer reviews are cut (data.truncation)
    truncation: str = "head"  # head | tail | head_tail: which tokens of a long review to keep (see README)
    max_train_samples: Optional[int] = None  # a stratified subset of the training split (null: all of it)
    max_val_samples: Optional[int] = None  # a stratified subset of the validation split (null: all of it)
    max_test_samples: Optional[int] = None  # a stratified subset of the test split (null: all of it)
    group_by_length: bool = True  # batches of similar length: far less padding, same samples per optimizer step
    pad_to_multiple_of: Optional[int] = None  # null: 64 on GPUs (few distinct shapes), none on CPU
    num_workers: int = 0  # DataLoader worker processes; collation is light, 0 is fine on CPU


@dataclass
class TrainConfig:
    batch_size: int = 16  # reviews per forward pass (micro-batch) per device; with micro_batch_tokens, the step's batch_size x grad_accum_steps reviews are cut by tokens instead
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    effective_batch_size: Optional[int] = None  # if set: grad_accum_steps = this / (batch_size * processes)
    micro_batch_tokens: Optional[str] = None  # a number or auto: cut each step's reviews into forward passes of at most that many tokens (auto: as many as fit; out-of-memory splits further); null: batch_size reviews per pass
    epochs: int = 3  # passes over the training split
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 2e-5  # peak learning rate, reached after warmup
    lr_scaling: str = "none"  # none | sqrt | linear: scale lr by effective batch / lr_reference_batch
    lr_reference_batch: int = 32  # the effective batch that `lr` was tuned for
    weight_decay: float = 0.01  # AdamW decay of weight matrices (not of biases and norms)
    warmup_ratio: float = 0.1  # share of the optimizer steps spent raising the lr from 0
    scheduler: str = "linear"  # linear | cosine | constant
    max_grad_norm: Optional[float] = 1.0  # null disables clipping
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | mps
    log_every: int = 1  # optimizer steps per logged train loss (the mean over them)
    compile: bool = False  # torch.compile the model: pays a compile at the start (and per new shape) for faster steps
    packing: str = "auto"  # auto | true | false: padding-free packed micro-batches (auto: on CUDA in bf16/fp16, no attention dropout)
    peer_timeout: int = 900  # seconds: several processes end the run when one stops answering for this long


@dataclass
class CheckpointConfig:
    best_metric: str = "accuracy"  # validation metric that picks the best epoch: accuracy | f1 | loss
    every_steps: Optional[int] = None  # also save a resume point every N optimizer steps (epoch ends always do)


@dataclass
class TrackingConfig:
    # Unset (null) keys fall back to WandB's environment variables, then to the defaults named here.
    wandb_mode: Optional[str] = None  # auto | online | offline | disabled; null: $WANDB_MODE, else auto
    wandb_project: Optional[str] = None  # null: $WANDB_PROJECT, else imdb-grad-accum
    wandb_entity: Optional[str] = None  # null: $WANDB_ENTITY, else your default entity
    group: Optional[str] = None  # null: $WANDB_RUN_GROUP; exp_1/sweep.py passes its sweep's name
    tags: List[str] = field(default_factory=list)  # added to the automatic model / effective batch / seed tags; [] adds $WANDB_TAGS
    log_model: Optional[str] = None  # best: upload the best checkpoint and model/ as a WandB artifact at the end


@dataclass
class Config:
    name: str = "run"  # the run's folder name, and its WandB name
    output_dir: str = "runs"  # the run directory is output_dir/name
    seed: int = 42  # model initialisation, data order and dropout (the split has data.split_seed)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


CHOICES = {
    "model.pooling": ("mean", "cls"),
    "data.truncation": ("head", "tail", "head_tail"),
    "train.optimizer": ("adamw", "adam"),
    "train.lr_scaling": ("none", "sqrt", "linear"),
    "train.scheduler": ("linear", "cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "checkpoint.best_metric": ("accuracy", "f1", "loss"),
    "tracking.wandb_mode": (None, "auto", "online", "offline", "disabled"),
    "tracking.log_model": (None, "best"),
    "train.packing": ("auto", "true", "false"),
}
POSITIVE_INTS = ("data.max_length", "train.batch_size", "train.grad_accum_steps", "train.epochs",
                 "train.log_every", "train.lr_reference_batch", "train.peer_timeout")
OPTIONAL_POSITIVE_INTS = ("data.max_train_samples", "data.max_val_samples", "data.max_test_samples",
                          "data.pad_to_multiple_of", "train.effective_batch_size", "checkpoint.every_steps")
FRACTIONS = ("model.dropout", "model.encoder_dropout", "model.attention_dropout", "train.warmup_ratio")


def load_config(path: Path, overrides: List[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file <- overrides, validated. Raises UserError naming the key or file."""
    values = _read_yaml(Path(path))
    cfg = OmegaConf.structured(Config)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like dotted.key=value, e.g. train.lr=3e-5")
        key = item.split("=", 1)[0]
        if isinstance(OmegaConf.select(cfg, key, default=None), DictConfig):
            raise UserError(f"override {item!r}: {key} is a section; set its keys, e.g. {key}."
                            f"{next(iter(OmegaConf.select(cfg, key)))}=...")
    for source, layer in ((str(path), values), ("command line", overrides)):
        try:
            update = OmegaConf.create(values) if layer is values else OmegaConf.from_dotlist(list(layer))
            cfg = OmegaConf.merge(cfg, update)
        except ConfigKeyError as err:
            raise UserError(_unknown_key_message(err, source)) from None
        except ValidationError as err:
            if "Incompatible value 'None'" in str(err):  # `key=` or `key: ` left empty
                raise UserError(f"{source}: {err.full_key} is empty; give it a value") from None
            raise UserError(f"{source}: {err.full_key}: {_first_line(err)}") from None
        except OmegaConfBaseException as err:
            raise UserError(f"{source}: {_first_line(err)}") from None
    try:  # ${...} interpolations become values now, so a bad one is named here rather than failing mid-run
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise UserError(f"{err.full_key or 'config'}: cannot resolve it ({_first_line(err)})") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A config file's values; `base: other.yaml` (relative to the file) is read first and overridden by the rest."""
    if path.is_dir():
        raise UserError(f"config path {path} is a directory; pass a YAML file such as {CONFIG_DIR / 'quickstart.yaml'}")
    if not path.is_file():
        hint = f"; shipped configs are in {CONFIG_DIR}" if not path.is_absolute() else ""
        raise UserError(f"config file {path} not found{hint}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML: {getattr(err, 'problem', None) or _first_line(err)}"
                        f"{where}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    base_path = path.parent / str(base)
    if base_path.resolve() in seen:
        raise UserError(f"config file {path}: base {base} includes itself")
    merged = OmegaConf.merge(_read_yaml(base_path, seen + (path.resolve(),)), values)
    return OmegaConf.to_container(merged)


def validate(cfg: DictConfig) -> None:
    for key, value in _leaves(to_plain_dict(cfg)):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value} must be a finite number")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        value = value.lower() if key == "train.packing" else value  # YAML's true/false arrive as "True"/"False"
        if value not in allowed:
            names = ", ".join(str(a) for a in allowed if a is not None) + (" or null" if None in allowed else "")
            raise UserError(f"{key}={value!r} is not one of {names}")
    for key in POSITIVE_INTS + OPTIONAL_POSITIVE_INTS:
        value = OmegaConf.select(cfg, key)
        if value is None and key in OPTIONAL_POSITIVE_INTS:
            continue
        if not 1 <= value <= MAX_SIZE:
            raise UserError(f"{key}={value} must be a positive integer up to {MAX_SIZE}"
                            + (" or null" if key in OPTIONAL_POSITIVE_INTS else ""))
    for key in ("seed", "data.split_seed"):
        if not 0 <= OmegaConf.select(cfg, key) <= MAX_SEED:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)} must be between 0 and {MAX_SEED}")
    tokens = cfg.train.micro_batch_tokens
    if tokens is not None and tokens != "auto" and not (str(tokens).isdigit() and 1 <= int(tokens) <= MAX_SIZE):
        raise UserError(f"train.micro_batch_tokens={tokens} must be a positive number of tokens, auto, or null")
    if cfg.data.num_workers < 0:
        raise UserError(f"data.num_workers={cfg.data.num_workers} must be 0 (load in the training process) or more")
    for key in FRACTIONS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0 <= value < 1:
            raise UserError(f"{key}={value} must be in [0, 1)")
    if not cfg.train.lr > 0:
        raise UserError(f"train.lr={cfg.train.lr} must be a positive number")
    if cfg.train.weight_decay < 0:
        raise UserError(f"train.weight_decay={cfg.train.weight_decay} must be >= 0")
    if cfg.train.max_grad_norm is not None and cfg.train.max_grad_norm <= 0:
        raise UserError(f"train.max_grad_norm={cfg.train.max_grad_norm} must be positive, or null to disable clipping")
    weights = list(cfg.data.split)
    if len(weights) != 3 or min(weights) <= 0:
        raise UserError(f"data.split={weights} must be three positive train:validation:test weights, e.g. [9, 1, 1]")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", "..") or cfg.name.startswith("~"):
        raise UserError(f"name={cfg.name!r} must be a plain folder name (it becomes output_dir/name)")
    if not cfg.output_dir:
        raise UserError("output_dir is empty; give the folder that holds run directories, e.g. output_dir=runs")


def _leaves(values: dict, prefix: str = ""):
    """(dotted key, value) of every scalar in a nested config, list items included."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            yield from ((f"{prefix}{key}[{i}]", item) for i, item in enumerate(value))
        else:
            yield f"{prefix}{key}", value


def _unknown_key_message(err: ConfigKeyError, source: str) -> str:
    key = err.full_key or str(err.key)
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(OmegaConf.structured(Config), parent) if parent else OmegaConf.structured(Config)
    known = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else (
        f"known keys here: {', '.join(known)}")
    return f"{source}: unknown config key '{key}'; {hint}"


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def to_plain_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def grad_accum_steps(train: TrainConfig, num_processes: int = 1) -> int:
    """Micro-batches per optimizer step, from `grad_accum_steps` or from `effective_batch_size` when that is set."""
    if train.effective_batch_size is None:
        return train.grad_accum_steps
    if train.grad_accum_steps != 1:
        raise UserError("set train.grad_accum_steps or train.effective_batch_size, not both")
    per_step = train.batch_size * num_processes
    if train.effective_batch_size % per_step:
        raise UserError(
            f"train.effective_batch_size={train.effective_batch_size} is not a multiple of train.batch_size="
            f"{train.batch_size} x {num_processes} process(es) = {per_step}; change one of them")
    return train.effective_batch_size // per_step


def window_layout(train: TrainConfig, num_processes: int = 1) -> tuple[int, int]:
    """(reviews per loader batch, loader batches per optimizer step) on each process. With micro_batch_tokens each
    loader batch is the process's whole share of the step, and training cuts it into forward passes by tokens."""
    accum = grad_accum_steps(train, num_processes)
    return (train.batch_size, accum) if train.micro_batch_tokens is None else (train.batch_size * accum, 1)


def scaled_lr(train: TrainConfig, effective_batch: int) -> float:
    """`train.lr` was tuned for `lr_reference_batch`; scale it to the effective batch as `lr_scaling` says."""
    ratio = effective_batch / train.lr_reference_batch
    return train.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[train.lr_scaling]

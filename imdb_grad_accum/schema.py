"""The config schema: each key's type, default and meaning (its line's comment, shown by --help), and the checks."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from imdb_grad_accum.errors import UserError

MAX_SEED = 2**32 - 1  # numpy's legacy seeding and CUDA's generators take no more
MAX_SIZE = 2**31 - 1  # sizes and counts: more would overflow the loaders' index arithmetic
MAX_NAME = 255  # bytes in a file or folder name (Linux, macOS)
MAX_PATH = 4096 - 100  # bytes in a path (Linux), less room for the longest name a run directory holds


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
    path: str = "stanfordnlp/imdb"  # hub dataset id, local folder or file
    split: List[float] = field(default_factory=lambda: [9.0, 1.0, 1.0])  # train:validation:test weights
    split_seed: int = 42  # draws the split (and subsets): runs with other training seeds share one test set
    max_length: int = 512  # tokens per review, special tokens included, at most the model's limit; longer ones are cut
    truncation: str = "head"  # head | tail | head_tail: which tokens of a long review to keep (head_tail: 1/4 + 3/4)
    max_train_samples: Optional[int] = None  # a stratified subset of the training split (null: all of it)
    max_val_samples: Optional[int] = None  # a stratified subset of the validation split (null: all of it)
    max_test_samples: Optional[int] = None  # a stratified subset of the test split (null: all of it)
    group_by_length: bool = True  # batches of similar length: far less padding, same samples per optimizer step
    pad_to_multiple_of: Optional[int] = None  # null: 64 on GPUs (few distinct shapes), none on CPU
    num_workers: int = 0  # DataLoader worker processes; collation is light, 0 is fine on CPU


@dataclass
class TrainConfig:
    batch_size: int = 16  # reviews per forward pass (micro-batch) per device; micro_batch_tokens cuts by tokens instead
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    effective_batch_size: Optional[int] = None  # if set: grad_accum_steps = this / (batch_size * processes)
    micro_batch_tokens: Optional[str] = None  # N or auto (as many as fit): passes of at most N tokens; null: off
    epochs: int = 3  # passes over the training split
    optimizer: str = "adamw"  # adamw | adam (Adam with L2 decay added to the gradient, as torch.optim.Adam does)
    lr: float = 2e-5  # peak learning rate of the top of the model (head), reached after warmup
    lr_scaling: str = "none"  # none | sqrt | linear: scale lr by effective batch / lr_reference_batch
    lr_reference_batch: int = 32  # the effective batch that `lr` was tuned for
    layer_lr_decay: Optional[float] = None  # (0, 1]: each layer's lr is the one above's x this, e.g. 0.95; null: one lr
    freeze: Optional[str] = None  # embeddings | encoder (a linear probe) | N (embeddings + lowest N layers); null: none
    label_smoothing: float = 0.0  # in [0, 1): cross-entropy against labels smoothed towards uniform (0: off)
    weight_decay: float = 0.01  # decay of weight matrices (not of biases and norms): decoupled with adamw, L2 with adam
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam(W)'s moment decay rates, in [0, 1)
    adam_eps: float = 1e-8  # Adam(W)'s epsilon, added to the root of the second moment
    warmup_ratio: float = 0.1  # share of the optimizer steps spent raising the lr from 0
    scheduler: str = "linear"  # linear | cosine | constant
    max_grad_norm: Optional[float] = 1.0  # null disables clipping
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | mps
    eval_every_steps: Optional[int] = None  # also validate (and save a resume point) every N steps; null: epoch ends
    early_stopping_patience: Optional[int] = None  # stop after N validations in a row gaining <= min_delta; null: off
    early_stopping_min_delta: float = 0.0  # the improvement that counts for early stopping (in the metric's units)
    activation_checkpointing: bool = False  # recompute the encoder's activations in backward: less memory, slower
    log_every: int = 1  # optimizer steps per logged train loss (the mean over them)
    progress: str = "auto"  # auto | bar | lines | none (auto: a bar on a terminal, else plain lines)
    compile: bool = False  # torch.compile the model: pays a compile at the start (and per new shape) for faster steps
    cuda_graphs: bool = False  # with compile and packing: fixed-size packed rows, steps replayed as CUDA graphs (GPU)
    packing: str = "auto"  # auto | true | false: pack batches without padding (auto: CUDA, bf16/fp16, no attn dropout)
    peer_timeout: int = 900  # seconds: several processes end the run when one stops answering for this long


@dataclass
class CheckpointConfig:
    best_metric: str = "accuracy"  # validation metric that picks the best checkpoint: accuracy | f1 | loss
    every_steps: Optional[int] = None  # also save a resume point every N optimizer steps (every validation does)
    keep_resume_points: bool = False  # keep resume points (optimizer state: ~2x the weights) after the run finished


@dataclass
class TrackingConfig:
    wandb_mode: Optional[str] = None  # auto | online | offline | disabled; null: $WANDB_MODE or auto (online if able)
    wandb_project: Optional[str] = None  # null: $WANDB_PROJECT, else imdb-grad-accum
    wandb_entity: Optional[str] = None  # null: $WANDB_ENTITY, else your default entity
    group: Optional[str] = None  # null: $WANDB_RUN_GROUP; the sweep passes its study's name
    tags: List[str] = field(default_factory=list)  # added to the automatic model/batch/seed tags; []: $WANDB_TAGS
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


# Keys that do not change what is trained: a resume may change them, and runs differing only in them are seeds.
UNTRAINED_KEYS = ("name", "output_dir", "train.progress", "data.num_workers", "train.peer_timeout",
                  "checkpoint.keep_resume_points", "tracking")

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
    "train.progress": ("auto", "bar", "lines", "none"),
}
POSITIVE_INTS = ("data.max_length", "train.batch_size", "train.grad_accum_steps", "train.epochs",
                 "train.log_every", "train.lr_reference_batch", "train.peer_timeout")
OPTIONAL_POSITIVE_INTS = ("data.max_train_samples", "data.max_val_samples", "data.max_test_samples",
                          "data.pad_to_multiple_of", "train.effective_batch_size", "checkpoint.every_steps",
                          "train.eval_every_steps", "train.early_stopping_patience")
FRACTIONS = ("model.dropout", "model.encoder_dropout", "model.attention_dropout", "train.warmup_ratio",
             "train.label_smoothing")


def flatten(values: dict, prefix: str = "", lists: bool = False) -> dict:
    """{dotted.key: value} of a nested mapping; with `lists`, list items too, as key[i]."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}.", lists))
        elif lists and isinstance(value, list):
            flat.update({f"{prefix}{key}[{i}]": item for i, item in enumerate(value)})
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check(cfg: DictConfig, keys, valid, what: str) -> None:
    for key in keys:
        if not valid(OmegaConf.select(cfg, key)):
            raise UserError(f"{key}={OmegaConf.select(cfg, key)} must be {what}")


def validate(cfg: DictConfig) -> None:
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True), lists=True).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value} must be a finite number")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        value = value.lower() if key == "train.packing" else value  # YAML's true/false arrive as "True"/"False"
        if value not in allowed:
            names = ", ".join(str(a) for a in allowed if a is not None) + (" or null" if None in allowed else "")
            raise UserError(f"{key}={value!r} is not one of {names}")
    _check(cfg, POSITIVE_INTS, lambda v: 1 <= v <= MAX_SIZE, f"a positive integer up to {MAX_SIZE}")
    _check(cfg, OPTIONAL_POSITIVE_INTS, lambda v: v is None or 1 <= v <= MAX_SIZE,
           f"a positive integer up to {MAX_SIZE} or null")
    _check(cfg, ("seed", "data.split_seed"), lambda v: 0 <= v <= MAX_SEED, f"between 0 and {MAX_SEED}")
    _check(cfg, FRACTIONS, lambda v: v is None or 0 <= v < 1, "in [0, 1)")
    train = cfg.train
    tokens = train.micro_batch_tokens
    if tokens is not None and tokens != "auto" and not (str(tokens).isdigit() and 1 <= int(tokens) <= MAX_SIZE):
        raise UserError(f"train.micro_batch_tokens={tokens} must be a positive number of tokens, auto, or null")
    if train.cuda_graphs and not train.compile:
        raise UserError("train.cuda_graphs replays compiled steps: it needs train.compile=true")
    if train.cuda_graphs and tokens is not None:
        raise UserError("train.cuda_graphs takes whole fixed-shape steps; set train.micro_batch_tokens=null with it")
    if train.freeze is not None and train.freeze not in ("embeddings", "encoder") and not (
            str(train.freeze).isdigit() and int(train.freeze) >= 1):
        raise UserError(f"train.freeze={train.freeze} must be embeddings, encoder, a number of encoder layers (1 or "
                        "more), or null")
    _check(cfg, ("train.layer_lr_decay",), lambda v: v is None or 0 < v <= 1,
           "in (0, 1] (0.95: each layer 5% below the one above), or null")
    _check(cfg, ("data.num_workers", "train.weight_decay", "train.early_stopping_min_delta"), lambda v: v >= 0,
           "0 or more")
    _check(cfg, ("train.lr",), lambda v: v > 0, "a positive number")
    betas = list(train.adam_betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserError(f"train.adam_betas={betas} must be two decay rates in [0, 1), e.g. [0.9, 0.999]")
    _check(cfg, ("train.adam_eps",), lambda v: v > 0, "a positive number, e.g. 1e-8")
    _check(cfg, ("train.max_grad_norm",), lambda v: v is None or v > 0, "positive, or null to disable clipping")
    weights = list(cfg.data.split)
    if len(weights) != 3 or min(weights) <= 0:
        raise UserError(f"data.split={weights} must be three positive train:validation:test weights, e.g. [9, 1, 1]")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", "..") or cfg.name.startswith("~") or any(
            ord(c) < 32 for c in cfg.name):
        raise UserError(f"name={cfg.name!r} must be a plain folder name (it becomes output_dir/name)")
    if len(cfg.name.encode()) > MAX_NAME:
        raise UserError(f"name is {len(cfg.name.encode())} bytes long; folder names take at most {MAX_NAME}")
    if not cfg.output_dir:
        raise UserError("output_dir is empty; give the folder that holds run directories, e.g. output_dir=runs")
    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    if any(len(part.encode()) > MAX_NAME for part in run_dir.parts) or len(str(run_dir.absolute()).encode()) > MAX_PATH:
        raise UserError(f"output_dir/name is too long for the filesystem (at most {MAX_NAME} bytes a folder name and "
                        f"{MAX_PATH} bytes in all, leaving room for the files in it); choose a shorter one")

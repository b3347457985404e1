"""The config schema: every key with its type, default and meaning (the comment on its line is what --help shows),
and the checks of the values a run refuses. How to add a key: docs/design.md."""

from __future__ import annotations

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
    max_length: int = 512  # tokens per review, special tokens included, up to the model's position limit; longer reviews are cut (data.truncation)
    truncation: str = "head"  # head | tail | head_tail: which tokens of a long review to keep (head_tail: a quarter of the budget from the start, three quarters from the end)
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
    optimizer: str = "adamw"  # adamw | adam (Adam with L2 decay added to the gradient, as torch.optim.Adam does)
    lr: float = 2e-5  # peak learning rate of the top of the model (head), reached after warmup
    lr_scaling: str = "none"  # none | sqrt | linear: scale lr by effective batch / lr_reference_batch
    lr_reference_batch: int = 32  # the effective batch that `lr` was tuned for
    layer_lr_decay: Optional[float] = None  # in (0, 1]: each encoder layer's lr is the one above it x this, counting down from the head, embeddings lowest (Sun et al. 2019: 0.95); null: one lr
    freeze: Optional[str] = None  # embeddings | encoder (a linear probe: only the head trains) | N (the embeddings and the lowest N encoder layers); null: train everything
    label_smoothing: float = 0.0  # in [0, 1): cross-entropy against labels smoothed towards uniform (0: off)
    weight_decay: float = 0.01  # decay of weight matrices (not of biases and norms): decoupled with adamw, L2 with adam
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam(W)'s moment decay rates, each in [0, 1)
    adam_eps: float = 1e-8  # Adam(W)'s epsilon, added to the root of the second moment
    warmup_ratio: float = 0.1  # share of the optimizer steps spent raising the lr from 0
    scheduler: str = "linear"  # linear | cosine | constant
    max_grad_norm: Optional[float] = 1.0  # null disables clipping
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | mps
    eval_every_steps: Optional[int] = None  # also validate (and save a resume point) every N optimizer steps; null: at epoch ends only
    early_stopping_patience: Optional[int] = None  # stop after this many validations in a row without improving checkpoint.best_metric by more than early_stopping_min_delta; null: off
    early_stopping_min_delta: float = 0.0  # the improvement that counts for early stopping (in the metric's units)
    activation_checkpointing: bool = False  # recompute the encoder's activations in the backward pass: less memory, slower steps
    log_every: int = 1  # optimizer steps per logged train loss (the mean over them)
    progress: str = "auto"  # auto | bar | lines | none: a progress bar, or plain lines (auto: a bar on a terminal, lines when output goes to a file)
    compile: bool = False  # torch.compile the model: pays a compile at the start (and per new shape) for faster steps
    cuda_graphs: bool = False  # with compile and packing: pad packed rows to fixed token buckets and replay each step as a CUDA graph (GPU only)
    packing: str = "auto"  # auto | true | false: padding-free packed micro-batches (auto: on CUDA in bf16/fp16, no attention dropout)
    peer_timeout: int = 900  # seconds: several processes end the run when one stops answering for this long


@dataclass
class CheckpointConfig:
    best_metric: str = "accuracy"  # validation metric that picks the best checkpoint: accuracy | f1 | loss
    every_steps: Optional[int] = None  # also save a resume point every N optimizer steps (every validation does)
    keep_resume_points: bool = False  # keep the resume points (optimizer state: about twice the weights) once the run has finished; a finished run is never resumed


@dataclass
class TrackingConfig:
    # Unset (null) keys fall back to WandB's environment variables, then to the defaults named here.
    wandb_mode: Optional[str] = None  # auto | online | offline | disabled; null: $WANDB_MODE, else auto (online when WandB can start online, else offline)
    wandb_project: Optional[str] = None  # null: $WANDB_PROJECT, else imdb-grad-accum
    wandb_entity: Optional[str] = None  # null: $WANDB_ENTITY, else your default entity
    group: Optional[str] = None  # null: $WANDB_RUN_GROUP; the sweep passes its study's name
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


# Keys that do not change what is trained: where the run lives, how it shows progress, loads data, waits for peers,
# keeps files and is tracked. A resume may change them, and runs that differ only in them (and the seed) are seeds
# of one configuration.
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


def validate(cfg: DictConfig) -> None:
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
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
    for key in FRACTIONS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0 <= value < 1:
            raise UserError(f"{key}={value} must be in [0, 1)")
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
    if train.layer_lr_decay is not None and not 0 < train.layer_lr_decay <= 1:
        raise UserError(f"train.layer_lr_decay={train.layer_lr_decay} must be in (0, 1] (0.95: each layer 5% below "
                        "the one above), or null")
    for key, value, floor in (("data.num_workers", cfg.data.num_workers, 0), ("train.weight_decay", train.weight_decay, 0),
                              ("train.early_stopping_min_delta", train.early_stopping_min_delta, 0)):
        if value < floor:
            raise UserError(f"{key}={value} must be {floor} or more")
    if not train.lr > 0:
        raise UserError(f"train.lr={train.lr} must be a positive number")
    betas = list(train.adam_betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserError(f"train.adam_betas={betas} must be two decay rates in [0, 1), e.g. [0.9, 0.999]")
    if not train.adam_eps > 0:
        raise UserError(f"train.adam_eps={train.adam_eps} must be a positive number, e.g. 1e-8")
    if train.max_grad_norm is not None and train.max_grad_norm <= 0:
        raise UserError(f"train.max_grad_norm={train.max_grad_norm} must be positive, or null to disable clipping")
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




def _leaves(values: dict, prefix: str = ""):
    """(dotted key, value) of every scalar, list items included (key[i])."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            yield from ((f"{prefix}{key}[{i}]", item) for i, item in enumerate(value))
        else:
            yield f"{prefix}{key}", value

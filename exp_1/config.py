"""Experiment configuration: one typed schema, YAML files on top of it, `dotted.key=value` overrides on top of those.

Every mistake a user can make in a config (unknown key, wrong type, value out of range, missing file) becomes a
`UserError` with a one-line message that names the key and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from exp_1.errors import UserError

PROJECT_NAME = "imdb-grad-accum"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
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
    path: str = "stanfordnlp/imdb"  # hub dataset id or local folder
    split: List[float] = field(default_factory=lambda: [9.0, 1.0, 1.0])  # train:validation:test weights
    split_seed: int = 42  # draws the split (and subsets): runs with other training seeds share one test set
    max_length: int = 512  # tokens per review, special tokens included; longer reviews are cut (data.truncation)
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
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 2e-5  # peak learning rate, reached after warmup
    lr_scaling: str = "none"  # none | sqrt | linear: scale lr by effective batch / lr_reference_batch
    lr_reference_batch: int = 32  # the effective batch that `lr` was tuned for
    weight_decay: float = 0.01  # AdamW decay of weight matrices (not of biases and norms)
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
    "train.progress": ("auto", "bar", "lines", "none"),
}
POSITIVE_INTS = ("data.max_length", "train.batch_size", "train.grad_accum_steps", "train.epochs",
                 "train.log_every", "train.lr_reference_batch", "train.peer_timeout")
OPTIONAL_POSITIVE_INTS = ("data.max_train_samples", "data.max_val_samples", "data.max_test_samples",
                          "data.pad_to_multiple_of", "train.effective_batch_size", "checkpoint.every_steps",
                          "train.eval_every_steps", "train.early_stopping_patience")
FRACTIONS = ("model.dropout", "model.encoder_dropout", "model.attention_dropout", "train.warmup_ratio")


def load_config(path: Path, overrides: List[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file <- overrides, validated. Raises UserError naming the key or file."""
    values = _read_yaml(Path(path))
    cfg = OmegaConf.structured(Config)
    for item in overrides:
        _check_override(item, cfg)
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
        except (OmegaConfBaseException, TypeError) as err:  # TypeError: a list where the schema has a section
            raise UserError(f"{source}: {_first_line(err)}") from None
    try:  # ${...} interpolations become values now, so a bad one is named here rather than failing mid-run
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise UserError(f"{err.full_key or 'config'}: cannot resolve it ({_first_line(err)})") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _check_override(item: str, cfg: DictConfig) -> None:
    """An override is `dotted.key=value`, its value one line of YAML: anything else is named here, before OmegaConf
    (which would take `train..lr` for a key named '' and raise YAML's own errors)."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like dotted.key=value, e.g. train.lr=3e-5")
    key, value = item.split("=", 1)
    if not DOTTED_KEY.fullmatch(key):
        raise UserError(f"override {item!r}: {key!r} is not a dotted config key; write e.g. train.lr=3e-5 (python "
                        "exp_1/main.py --help lists the keys)")
    try:
        parsed = yaml.load(value, Loader=StrictLoader)
    except yaml.YAMLError as err:
        raise UserError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
    except RecursionError:
        raise UserError(f"override {item!r}: the value is nested too deeply") from None
    if isinstance(OmegaConf.select(cfg, key, default=None), DictConfig) and not isinstance(parsed, dict):
        raise UserError(f"override {item!r}: {key} is a section; set its keys, e.g. {key}."
                        f"{next(iter(OmegaConf.select(cfg, key)))}=..., or give a mapping, {key}={{...}}")


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: PyYAML would keep the last silently."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden, as in safe_load
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = key in first_line
            except TypeError:  # a list or mapping as a key
                raise yaml.constructor.ConstructorError(None, None, f"a key at line {line} is not a name",
                                                        key_node.start_mark) from None
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice, at lines {first_line[key]} and {line}; keep one",
                    key_node.start_mark)
            first_line[key] = line
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or _first_line(err)}{where}"


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A config file's values; `base: other.yaml` (relative to the file) is read first and overridden by the rest."""
    if path.is_dir():
        raise UserError(f"config path {path} is a directory; pass a YAML file such as {CONFIG_DIR / 'quickstart.yaml'}")
    if not path.is_file():
        hint = f"; shipped configs are in {CONFIG_DIR}" if not path.is_absolute() else ""
        raise UserError(f"config file {path} not found{hint}")
    try:
        values = yaml.load(path.read_text(), Loader=StrictLoader) or {}
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        if "appears twice" in str(getattr(err, "problem", "")):
            raise UserError(f"config file {path}: {err.problem}") from None
        raise UserError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise UserError(f"config file {path} is nested too deeply to be a config") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    base_path = path.parent / str(base)
    if base_path.resolve() in seen:
        raise UserError(f"config file {path}: base {base} includes itself")
    try:
        merged = OmegaConf.merge(_read_yaml(base_path, seen + (path.resolve(),)), values)
    except OmegaConfBaseException as err:
        raise UserError(f"config file {path}: {_first_line(err)}") from None
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
    betas = list(cfg.train.adam_betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserError(f"train.adam_betas={betas} must be two decay rates in [0, 1), e.g. [0.9, 0.999]")
    if not cfg.train.adam_eps > 0:
        raise UserError(f"train.adam_eps={cfg.train.adam_eps} must be a positive number, e.g. 1e-8")
    if cfg.train.early_stopping_min_delta < 0:
        raise UserError(f"train.early_stopping_min_delta={cfg.train.early_stopping_min_delta} must be >= 0")
    if cfg.train.max_grad_norm is not None and cfg.train.max_grad_norm <= 0:
        raise UserError(f"train.max_grad_norm={cfg.train.max_grad_norm} must be positive, or null to disable clipping")
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


@dataclass(frozen=True)
class StepLayout:
    """How one optimizer step is made: decided once from the config and the number of processes, and used by the
    sampler, the loops, the resume points and every record of the run."""

    effective_batch: int  # reviews per optimizer step, all processes together
    processes: int
    grad_accum_steps: int  # micro-batches per step on each process, as configured (or from train.effective_batch_size)
    micro_batch_tokens: Optional[str]  # None: forward passes of train.batch_size reviews; a number or auto: cut by tokens

    @property
    def loader_batches(self) -> int:
        """Loader batches per optimizer step on each process: with micro_batch_tokens, one (the process's whole share
        of the step, which training cuts into forward passes by tokens); else one per micro-batch."""
        return self.grad_accum_steps if self.micro_batch_tokens is None else 1

    @property
    def loader_batch_size(self) -> int:
        return self.effective_batch // (self.processes * self.loader_batches)


def step_layout(train: TrainConfig, processes: int = 1) -> StepLayout:
    """The optimizer step of `train` on `processes` processes; a batch size that does not divide is named here."""
    accum = train.grad_accum_steps
    if train.effective_batch_size is not None:
        if train.grad_accum_steps != 1:
            raise UserError("set train.grad_accum_steps or train.effective_batch_size, not both")
        per_step = train.batch_size * processes
        if train.effective_batch_size % per_step:
            raise UserError(
                f"train.effective_batch_size={train.effective_batch_size} is not a multiple of train.batch_size="
                f"{train.batch_size} x {processes} process(es) = {per_step}; change one of them")
        accum = train.effective_batch_size // per_step
    return StepLayout(train.batch_size * accum * processes, processes, accum,
                      None if train.micro_batch_tokens is None else str(train.micro_batch_tokens))


def scaled_lr(train: TrainConfig, effective_batch: int) -> float:
    """`train.lr` was tuned for `lr_reference_batch`; scale it to the effective batch as `lr_scaling` says."""
    ratio = effective_batch / train.lr_reference_batch
    return train.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[train.lr_scaling]


NAME_EXCLUDES = ("name", "output_dir")  # where a run lives, not what it is


def run_name(base: str, overrides: List[str]) -> str:
    """A readable, stable name for a run of `base` with these overrides (a sweep's grid point and seed, a WandB
    agent's parameters): `<base>_<key><value>...`, each key by its last part, a section's mapping by its keys, the
    seed last, e.g. quickstart_lr3e-5_epochs2_seed1."""
    parts, seed = [], None
    for item in overrides:
        key, value = item.split("=", 1)
        if key in NAME_EXCLUDES or key.startswith("tracking."):
            continue
        if key == "seed":
            seed = value
            continue
        parsed = yaml.safe_load(value) if value.strip().startswith("{") else None
        pairs = parsed.items() if isinstance(parsed, dict) else [(key.rsplit(".", 1)[-1], value)]
        parts += [f"{leaf}{_name_safe(str(v))}" for leaf, v in pairs]
    name = "_".join([base, *parts] + ([f"seed{seed}"] if seed is not None else []))
    if len(name.encode()) > MAX_NAME:
        raise UserError(f"the run name {name[:60]}... made from the overrides is longer than {MAX_NAME} bytes; give "
                        "the runs shorter values or set name=")
    return name


def _name_safe(value: str) -> str:
    """The value as it can stand in a folder name; one that had to change gets a short hash of itself, so that two
    values never make one name (/a/b and /a-b)."""
    safe = re.sub(r"[^\w.+-]", "-", value.replace(" ", "")).strip("-")
    return safe if safe == value else f"{safe}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"

"""Experiment configuration (schema <- YAML <- `key=value` overrides, mistakes one line), and the optimizer step."""

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from imdb_grad_accum.errors import UserError, first_line
from imdb_grad_accum.schema import UNTRAINED_KEYS, Config, TrainConfig, flatten, validate

PROJECT_NAME = "imdb-grad-accum"
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when the package is used from one
CONFIG_DIR = PROJECT_ROOT / "configs"
DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


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
            key = err.full_key or "a key"
            node = OmegaConf.select(OmegaConf.structured(Config), key.split("[")[0], default=None)
            if OmegaConf.is_list(node):
                raise UserError(f"{source}: {key} takes a list, e.g. {key}={OmegaConf.to_container(node)}") from None
            raise UserError(f"{source}: {key}: {first_line(err)}") from None
        except (OmegaConfBaseException, TypeError) as err:  # TypeError: a list where the schema has a section
            raise UserError(f"{source}: {first_line(err)}") from None
    try:  # ${...} interpolations become values now, so a bad one is named here rather than failing mid-run
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise UserError(f"{err.full_key or 'config'}: cannot resolve it ({first_line(err)})") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_override(item: str, cfg: DictConfig) -> None:
    """`dotted.key=value`, its value one line of YAML: checked before OmegaConf, which takes `train..lr` for ''."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like dotted.key=value, e.g. train.lr=3e-5")
    key, value = item.split("=", 1)
    if not DOTTED_KEY.fullmatch(key):
        raise UserError(f"override {item!r}: {key!r} is not a dotted config key; write e.g. train.lr=3e-5 (--help "
                        "lists the keys)")
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
    """yaml.safe_load, but a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen_at = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden, as in safe_load
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = key in seen_at
            except TypeError:  # a list or mapping as a key
                raise yaml.constructor.ConstructorError(None, None, f"a key at line {line} is not a name",
                                                        key_node.start_mark) from None
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice, at lines {seen_at[key]} and {line}; keep one",
                    key_node.start_mark)
            seen_at[key] = line
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or first_line(err)}{where}"


def _read_yaml(path: Path, named_by: Optional[Path] = None, seen: tuple = ()) -> dict:
    """A config file's values; `base: other.yaml` (relative to the file) is read first and overridden by the rest."""
    where = f" (named by base: in {named_by})" if named_by else ""
    if path.is_dir():
        raise UserError(f"config path {path}{where} is a directory; pass a YAML file such as "
                        f"{CONFIG_DIR / 'quickstart.yaml'}")
    if not path.is_file():
        hint = f"; shipped configs are in {CONFIG_DIR}" if not path.is_absolute() and not named_by else ""
        raise UserError(f"config file {path}{where} not found{hint}")
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
    if not isinstance(base, str):
        raise UserError(f"config file {path}: base: takes one file name, e.g. base: quickstart.yaml")
    base_path = path.parent / base
    if base_path.resolve() in seen:
        raise UserError(f"config file {path}: base {base} includes itself")
    try:
        merged = OmegaConf.merge(_read_yaml(base_path, path, seen + (path.resolve(),)), values)
    except OmegaConfBaseException as err:
        raise UserError(f"config file {path}: {first_line(err)}") from None
    return OmegaConf.to_container(merged)


def _unknown_key_message(err: ConfigKeyError, source: str) -> str:
    key = err.full_key or str(err.key)
    parent, _, leaf = key.rpartition(".")
    schema = OmegaConf.structured(Config)
    node = OmegaConf.select(schema, parent) if parent else schema
    known = list(node.keys()) if isinstance(node, DictConfig) else []
    close = [f"{parent}.{c}" if parent else c for c in difflib.get_close_matches(leaf, known, n=1)]
    if not close and not parent:  # a key of a section given at the top, e.g. `lr:` for train.lr
        close = [f"{section}.{leaf}" for section in known
                 if isinstance(schema[section], DictConfig) and leaf in schema[section]][:1]
    hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
    return f"{source}: unknown config key '{key}'; {hint}"


def to_plain_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def trained_config(values: dict) -> dict[str, Any]:
    """The flat config without the keys that do not change what is trained (UNTRAINED_KEYS)."""
    return {k: v for k, v in flatten(values).items()
            if not any(k == u or k.startswith(u + ".") for u in UNTRAINED_KEYS)}


def config_changes(saved: dict, current: dict) -> list[str]:
    a, b = trained_config(saved), trained_config(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@dataclass(frozen=True)
class StepLayout:
    """How one optimizer step is made, from the config and the number of processes."""

    effective_batch: int  # reviews per optimizer step, all processes together
    processes: int
    grad_accum_steps: int  # micro-batches per step on each process, as configured (or from train.effective_batch_size)
    micro_batch_tokens: Optional[str]  # None: passes of train.batch_size reviews; a number or auto: cut by tokens

    @property
    def loader_batches(self) -> int:
        """Loader batches per process and step: one per micro-batch, or one whole share to be cut by tokens."""
        return self.grad_accum_steps if self.micro_batch_tokens is None else 1

    @property
    def loader_batch_size(self) -> int:
        return self.effective_batch // (self.processes * self.loader_batches)


def step_layout(train: TrainConfig, processes: int = 1) -> StepLayout:
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
    return StepLayout(train.batch_size * accum * processes, processes, accum, train.micro_batch_tokens)


def scaled_lr(train: TrainConfig, effective_batch: int) -> float:
    """`train.lr` was tuned for `lr_reference_batch`; scale it to the effective batch as `lr_scaling` says."""
    ratio = effective_batch / train.lr_reference_batch
    return train.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[train.lr_scaling]

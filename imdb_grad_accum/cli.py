"""The command line of every command: arguments, --help from the schema, and one line and an exit code at the end.
Imports no torch, so --help and config errors answer at once."""

import argparse
import ast
import contextlib
import ctypes
import hashlib
import io
import os
import re
import signal
import sys
import tokenize
from pathlib import Path
from typing import Any, Callable, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from imdb_grad_accum import schema
from imdb_grad_accum.config import load_config
from imdb_grad_accum.schema import MAX_NAME, Config, flatten
from imdb_grad_accum.errors import RunStopped, UserError
from imdb_grad_accum.rundir import RunDir


class CliParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other input error
        raise UserError(f"{message} (see --help)")

    def format_help(self):
        if callable(self.epilog):  # made only for --help: it parses schema.py's source
            self.epilog = self.epilog()
        return super().format_help()


def command_parser(doc: str, **options) -> CliParser:
    return CliParser(description=doc.strip(), formatter_class=argparse.RawDescriptionHelpFormatter, **options)


def parse_and_load(argv: Optional[List[str]], doc: str, default_config: Path,
                   check: Callable[[DictConfig], Any]) -> tuple[argparse.Namespace, DictConfig]:
    """A training script's arguments (`mode`: start, resume, overwrite or continue) and config, checked by `check`."""
    parser = command_parser(doc, prog=Path(sys.argv[0]).name if sys.argv[0].endswith(".py") else None,
                            epilog=config_help)
    parser.add_argument("--config", type=Path, default=default_config,
                        help=f"YAML config file (default: {default_config})")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--resume", dest="mode", action="store_const", const="resume",
                      help="continue the run output_dir/name from its newest resume point (same config)")
    runs.add_argument("--overwrite", dest="mode", action="store_const", const="overwrite",
                      help="replace an existing run directory of the same name")
    runs.add_argument("--continue", dest="mode", action="store_const", const="continue",
                      help="resume the run from its newest resume point if it has one, start it (again) if it has "
                      "none, and do nothing if it has finished: what sweeps and WandB agents run")
    parser.add_argument("--print-config", action="store_true", help="check the config as a run would, print it "
                        "resolved (after base: files and overrides) and exit")
    parser.add_argument("--device-check", action="store_true",
                        help="print the device and precision this run would use, and why, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-5")
    parser.set_defaults(mode="start")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if os.environ.get("WANDB_SWEEP_ID") and not any(o.startswith("name=") for o in args.overrides):
        # a WandB sweep agent passes its parameters as overrides: each run gets a name of its own from them
        params = sweep_parameters()
        named = [o for o in args.overrides if params is None or o.split("=", 1)[0] in params]
        args.overrides.append(f"name={run_name(cfg.name, named)}")
        cfg = load_config(args.config, args.overrides)
    check(cfg)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        raise SystemExit(0)
    if args.device_check:
        from imdb_grad_accum.device import device_report

        report = device_report(cfg)
        print(report)
        raise SystemExit(2 if "this run would stop" in report else 0)
    run = RunDir.of(cfg)
    if args.mode == "continue" and run.is_finished():  # answered before torch loads: sweeps skip runs fast
        run.refuse_other_config(cfg)
        print(f"{run.path} has finished (metrics.json exists); nothing to do")
        raise SystemExit(0)
    return args, cfg


def run_name(base: str, overrides: List[str]) -> str:
    """A readable, stable name for a run of `base` with these overrides, e.g. quickstart_lr3e-5_epochs2_seed1."""
    parts, seed = [], None
    for item in overrides:
        key, value = item.split("=", 1)
        if key in ("name", "output_dir") or key.startswith("tracking."):
            continue
        if key == "seed":
            seed = value
            continue
        parsed = yaml.safe_load(value) if value.strip().startswith("{") else None
        pairs = flatten(parsed).items() if isinstance(parsed, dict) else [(key, value)]
        parts += [f"{leaf.rsplit('.', 1)[-1]}{_name_safe(str(v))}" for leaf, v in pairs]
    name = "_".join([base, *parts] + ([f"seed{seed}"] if seed is not None else []))
    if len(name.encode()) > MAX_NAME:
        raise UserError(f"the run name {name[:60]}... made from the overrides is longer than {MAX_NAME} bytes; give "
                        "the runs shorter values or set name=")
    return name


def _name_safe(value: str) -> str:
    """The value as it can stand in a folder name, with a short hash when it had to change (/a/b and /a-b differ)."""
    safe = re.sub(r"[^\w.+-]", "-", value.replace(" ", "")).strip("-")
    return safe if safe == value else f"{safe}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"


def sweep_parameters() -> set[str] | None:
    """The parameters a WandB sweep agent chose for this run (WANDB_SWEEP_PARAM_PATH), or None if unreadable."""
    try:
        params = yaml.safe_load(Path(os.environ["WANDB_SWEEP_PARAM_PATH"]).read_text())
    except (KeyError, OSError, yaml.YAMLError):
        return None
    return {key for key in params if key != "wandb_version"} if isinstance(params, dict) else None


def config_help() -> str:
    """Every config key's type, default and meaning, from schema.py and the comment on each field's line."""
    source = Path(schema.__file__).read_text()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    keys = []

    def walk(class_name: str, prefix: str) -> None:
        for node in classes[class_name].body:
            if not isinstance(node, ast.AnnAssign):
                continue
            key, kind = prefix + node.target.id, ast.unparse(node.annotation)
            if kind in classes:
                walk(kind, key + ".")
                continue
            shown = kind.replace("Optional[", "").replace("List[", "list of ").rstrip("]")
            shown += " or null" if "Optional[" in kind else ""
            default = "null" if defaults[key] is None else str(defaults[key])
            keys.append((key, shown, default, comments.get(node.lineno, "")))

    walk("Config", "")
    width = max(len(key) for key, *_ in keys)
    lines = ["config keys (set them in the YAML file, or override with key=value; type, default, meaning):"]
    lines += [f"  {key:<{width}}  {kind}, default {default}: {meaning}" for key, kind, default, meaning in keys]
    return "\n".join(lines)


class Preemption:
    """SIGTERM only sets `requested`; the loop then saves a resume point and stops (exit 143). Set by `run_cli`."""

    requested = False

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(cls, "requested", True))


def run_cli(main: Callable[[list[str]], Any]) -> None:
    """Call `main(sys.argv[1:])`; bad input ends in one line and exit code 2, a stopped run in its own, Ctrl-C 130."""
    Preemption.install()
    try:
        main(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): what was saved is kept; continue with the same command and --resume (or "
              "start again if no resume point was saved yet)", file=sys.stderr)
        sys.exit(130)


def die_with_parent() -> None:
    """SIGTERM when the parent dies (a killed sweep or launcher), so no orphan keeps a GPU busy; Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

"""The command-line boundary of every entry script: arguments, --help generated from the config schema,
--print-config, --device-check, and how a run ends (one line and an exit code for every way it can stop).

Nothing here imports torch, so --help, --print-config and config errors answer in well under a second.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import io
import os
import signal
import sys
import tokenize
from pathlib import Path
from typing import Any, Callable, List, Optional

from omegaconf import DictConfig, OmegaConf

from exp_1 import config as schema
from exp_1.config import Config, load_config
from exp_1.errors import RunStopped, UserError
from exp_1.rundir import RunDir


class CliParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other input error
        raise UserError(f"{message} (see --help)")


def parse_and_load(argv: Optional[List[str]], doc: str, default_config: Path,
                   launcher: bool = False) -> tuple[argparse.Namespace, DictConfig]:
    """The arguments and the resolved config of an entry script. --help, --print-config and --device-check answer
    here and exit 0; nothing has been written then. `launcher`: the script takes the mixed precision of
    `accelerate launch` / `accelerate config` (exp_2/main_accelerate.py)."""
    parser = CliParser(prog=Path(sys.argv[0]).name if sys.argv[0].endswith(".py") else None,
                       description=doc.strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=config_help())
    parser.add_argument("--config", type=Path, default=default_config, help=f"YAML config file (default: {default_config})")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true",
                      help="continue the run output_dir/name from its newest resume point (same config)")
    runs.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    runs.add_argument("--continue", dest="continue_run", action="store_true",
                      help="resume the run from its newest resume point if it has one, start it (again) if it has "
                      "none, and do nothing if it has finished: what sweeps and WandB agents run")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (after base: files and overrides) and exit")
    parser.add_argument("--device-check", action="store_true",
                        help="print the device and precision this run would use, and why, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-5")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if os.environ.get("WANDB_SWEEP_ID") and not any(o.startswith("name=") for o in args.overrides):
        # a WandB sweep agent passes its parameters as overrides: each run gets a name of its own from them
        params = sweep_parameters()
        named = [o for o in args.overrides if params is None or o.split("=", 1)[0] in params]
        args.overrides.append(f"name={schema.run_name(cfg.name, named)}")
        cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        raise SystemExit(0)
    if args.device_check:
        from exp_1.device import device_report
        from exp_1.precision import launcher_precision

        report = device_report(cfg, launcher_precision() if launcher else None)
        print(report)
        raise SystemExit(2 if "this run would stop" in report else 0)
    if args.continue_run:
        run = RunDir.of(cfg)
        if run.is_finished():
            changed = run.config_changes(cfg)
            if changed:
                raise UserError(f"--continue: {run.path} has finished with another config (it differs in "
                                f"{', '.join(changed)}); give this config another name= or output_dir=")
            print(f"{run.path} has finished (metrics.json exists); nothing to do")
            raise SystemExit(0)
        args.resume = bool(run.resume_points())
        args.overwrite = not args.resume and run.is_run() and run.has_results()
    return args, cfg


def sweep_parameters() -> set[str] | None:
    """The names of the parameters a WandB sweep agent chose for this run (the file it names in
    WANDB_SWEEP_PARAM_PATH), or None when it cannot be read."""
    import yaml

    try:
        params = yaml.safe_load(Path(os.environ["WANDB_SWEEP_PARAM_PATH"]).read_text())
    except (KeyError, OSError, yaml.YAMLError):
        return None
    return {key for key in params if key != "wandb_version"} if isinstance(params, dict) else None


def config_keys() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every config key, read from the schema itself: the dataclasses in
    config.py and the comment on each field's line, so --help cannot drift from it."""
    source = Path(schema.__file__).read_text()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    defaults = OmegaConf.structured(Config)
    keys = []

    def walk(class_name: str, prefix: str) -> None:
        for node in classes[class_name].body:
            if not isinstance(node, ast.AnnAssign):
                continue
            key, kind = prefix + node.target.id, ast.unparse(node.annotation)
            if kind in classes:
                walk(kind, key + ".")
                continue
            kind = kind.replace("Optional[", "").replace("List[", "list of ").rstrip("]")
            nullable = "Optional[" in ast.unparse(node.annotation)
            keys.append((key, kind + (" or null" if nullable else ""),
                         _show(OmegaConf.select(defaults, key)), comments.get(node.lineno, "")))

    walk("Config", "")
    return keys


def _show(value: Any) -> str:
    value = OmegaConf.to_container(value) if isinstance(value, DictConfig) or OmegaConf.is_list(value) else value
    return "null" if value is None else str(value)


def config_help() -> str:
    rows = config_keys()
    width = max(len(key) for key, *_ in rows)
    lines = ["config keys (set them in the YAML file, or override with key=value; type, default, meaning):"]
    lines += [f"  {key:<{width}}  {kind}, default {default}: {meaning}" for key, kind, default, meaning in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- how a run ends

class Preemption:
    """SIGTERM, which pre-emptible clouds send shortly before a kill, only sets `requested`: the training loop acts
    on it at the next optimizer step that logs, validates or saves (every step with train.log_every=1), saves a
    resume point there and stops with exit code 143 (errors.Preempted). Installed by `run_cli`, so in-process callers
    (tests, notebooks) keep their own handlers."""

    requested = False

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(cls, "requested", True))


def run_cli(main: Callable[[list[str]], Any]) -> None:
    """Call `main(sys.argv[1:])` and end every way it can stop with one line: bad input with exit code 2, a stopped
    run with its own code (1: diverged, out of space, a lost peer process; 143: SIGTERM), Ctrl-C with 130."""
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
    """Ask Linux to send this process SIGTERM when its parent dies (a killed sweep or `accelerate launch`), so no
    orphan keeps writing a run directory; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

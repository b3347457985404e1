"""Run plumbing shared by every entry script: CLI errors, device and precision, seeding, the run directory, logging."""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import random
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml
from accelerate.tracking import GeneralTracker
from omegaconf import DictConfig
from tqdm import tqdm

from exp_1.config import TrainingStopped, UserError, to_plain_dict


def run_cli(main: Callable[[list[str]], Any]) -> None:
    """Call `main(sys.argv[1:])`; a UserError becomes one line on stderr and exit code 2, a stopped training
    exit code 1."""
    try:
        main(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise UserError(f"train.device={name} but no {name} device is available here; use train.device=auto")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """'fp32' | 'bf16' | 'fp16'. auto: bf16 on GPUs that support it, fp16 on older GPUs, bf16 on CPUs with native
    bf16 matmuls (AMX or AVX512-BF16: several times the fp32 matmul rate, same quickstart accuracy), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("train.precision=fp16 needs a GPU; on CPU use bf16 or fp32")
    return name


def cpu_has_fast_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private in torch.cpu, hence the care
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class RunDir:
    """output_dir/name: config.yaml, split.json, history.jsonl, metrics.json, model/ and checkpoints/."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.model_dir = self.path / "model"  # encoder config and tokenizer: what inference needs besides weights
        self.checkpoints = self.path / "checkpoints"
        self.resume_dir = self.checkpoints / "resume"  # full training state, replaced atomically
        self.history = self.path / "history.jsonl"

    @classmethod
    def check(cls, cfg: DictConfig, overwrite: bool, resume: bool) -> "RunDir":
        """output_dir/name, if it can be started, replaced (`overwrite`) or continued (`resume`). Writes nothing."""
        run = cls(Path(cfg.output_dir) / cfg.name)
        if run.path.exists() and not (run.path / "config.yaml").is_file() and any(run.path.iterdir()):
            raise UserError(f"{run.path} exists and is not a run directory (no config.yaml); choose another name= "
                            "or output_dir=")
        if resume:
            if not (run.path / "config.yaml").is_file():
                raise UserError(f"--resume: there is no run at {run.path}; start it without --resume")
            if (run.path / "metrics.json").exists():
                raise UserError(f"--resume: {run.path} has finished (metrics.json exists); use --overwrite to train it "
                                "again, or another name=")
            if run.resume_point() is None:
                raise UserError(f"--resume: {run.path} has no resume point yet (one is saved after each epoch and every "
                                "checkpoint.every_steps steps); start it again with --overwrite")
            changed = run.config_changes(cfg)
            if changed:
                raise UserError(f"--resume: the config differs from {run.path / 'config.yaml'} in {', '.join(changed)}; "
                                "resume with the run's own config")
        elif run.has_results() and not overwrite:
            raise UserError(f"run directory {run.path} already holds results; pass --resume to continue it, "
                            "--overwrite to replace it, or choose another name=")
        return run

    def create(self, cfg: DictConfig) -> None:
        """Start afresh (main process only, once every input has been checked by `check`)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.checkpoints.mkdir(parents=True)
        write_atomic(self.path / "config.yaml", yaml.safe_dump(to_plain_dict(cfg), sort_keys=False))

    def config_changes(self, cfg: DictConfig) -> list[str]:
        """The keys in which `cfg` differs from the config this run was started with."""
        return _changed_keys(yaml.safe_load((self.path / "config.yaml").read_text()), to_plain_dict(cfg))

    def has_results(self) -> bool:
        return (self.history.exists() or (self.path / "metrics.json").exists()
                or any(self.checkpoints.glob("*.safetensors")) or self.resume_point() is not None)

    def resume_point(self) -> Optional[Path]:
        """The latest complete resume point; `resume.old` exists only if a kill hit the swap of a new one."""
        for folder in (self.resume_dir, self.resume_dir.with_name("resume.old")):
            if (folder / "trainer.json").is_file():
                return folder
        return None

    def write_json(self, name: str, payload: Any, indent: int | None = 1) -> None:
        write_atomic(self.path / name, json.dumps(payload, indent=indent) + "\n")


def _changed_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader or a kill never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunLogger(GeneralTracker):
    """history.jsonl plus WandB, as an Accelerate tracker (so `accelerator.log` drives it on the main process).

    WandB is best effort: no account, no network or a failing service never stops or stalls training; the run then
    lands offline in run_dir/wandb, for `wandb sync` later. It starts in a background thread, since its import and
    start take over a second that training need not wait for; the first WandB call waits for it.
    """

    name = "run_logger"
    requires_logging_directory = False

    def __init__(self, run: RunDir, cfg: DictConfig):
        super().__init__()
        self.history_path = run.history
        self.run_dir, self.cfg = run.path, cfg
        self.wandb_run = None
        self._starting: Optional[threading.Thread] = None
        self._started_message = ""

    @property
    def tracker(self):
        return self._wandb()

    def start(self) -> None:
        """Starts WandB with the run's config; `store_init_configuration` is only needed for other values."""
        self._starting = threading.Thread(target=self._start_wandb, name="wandb-start", daemon=True)
        self._starting.start()

    def _start_wandb(self) -> None:
        mode = resolve_wandb_mode(self.cfg.tracking.wandb_mode)
        if mode == "disabled":
            return
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                import wandb

                self.wandb_run = wandb.init(
                    project=self.cfg.tracking.wandb_project, entity=self.cfg.tracking.wandb_entity,
                    name=self.cfg.name, dir=str(self.run_dir), mode=attempt, config=to_plain_dict(self.cfg),
                    settings=wandb.Settings(init_timeout=30, silent=True),
                )
            except Exception as err:  # wandb raises many types; none of them may stop training
                self._wandb_failed(err)
                continue
            self._started_message = (f"WandB: {attempt} run in {self.run_dir / 'wandb'}"
                                     + (" (upload it later with `wandb sync`)" if attempt == "offline" else ""))
            return

    def _wandb(self):
        """The WandB run once its start has finished; None when disabled or unavailable."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
            if self._started_message:
                tqdm.write(self._started_message)  # above a progress bar, not through it
        return self.wandb_run

    def store_init_configuration(self, values: dict) -> None:
        if self._wandb() is not None:
            with self._guard():
                self.wandb_run.config.update(values)

    def log(self, values: dict, step: Optional[int] = None, **kwargs) -> None:
        record = {"step": step, **values, "time": round(time.time(), 3)}
        with self.history_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb() is not None:
            with self._guard():
                self.wandb_run.log(values, step=step)

    def summary(self, values: dict) -> None:
        if self._wandb() is not None:
            with self._guard():
                self.wandb_run.summary.update(values)

    def finish(self) -> None:
        if self._wandb() is not None:
            with self._guard():
                self.wandb_run.finish()
            self.wandb_run = None

    @contextlib.contextmanager
    def _guard(self):
        try:
            yield
        except Exception as err:
            self._wandb_failed(err)
            self.wandb_run = None

    @staticmethod
    def _wandb_failed(err: Exception) -> None:
        print(f"WandB unavailable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
              "training continues, history.jsonl still records everything", file=sys.stderr)


def resolve_wandb_mode(mode: str) -> str:
    """auto: online when an API key is configured and the service answers within 2 s, else offline."""
    if mode != "auto":
        return mode
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urllib.parse.urlparse(base_url).hostname or ""
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        with contextlib.suppress(Exception):
            has_key = netrc.netrc().authenticators(host) is not None
    if not has_key:
        return "offline"
    try:
        urllib.request.urlopen(base_url, timeout=2).close()
    except urllib.error.HTTPError:
        pass  # the service answered, even if with an error status
    except Exception:
        return "offline"
    return "online"

"""The run directory, output_dir/name: what a run writes there, who may write it, and the resume points that let a
killed run continue exactly.

    run.json              marker: this project made the folder (nothing else is ever deleted), and the WandB run id
    .lock                 held by the one process that writes the run; the operating system releases it on death
    config.yaml, split.json, history.jsonl, metrics.json, predictions/, model/, wandb/
    checkpoints/best.safetensors, last.safetensors   verified after writing, checksums kept in the resume points
    checkpoints/resume/000012/                        resume points, the newest two kept, each with manifest.json

Every file is written under a temporary name, flushed to disk and renamed into place, so a kill never leaves half a
file under a real name. A write that fails for lack of space names its file (`OutOfSpace`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from safetensors.torch import load as load_safetensors, save as save_safetensors

from exp_1.config import PROJECT_NAME, RunStopped, UserError, to_plain_dict
from exp_1.model import Weights, load_weights

MARKER = "run.json"
LOCK = ".lock"
# What the project writes at the top of a run directory: --overwrite removes these and refuses when others are there.
OWN_ENTRIES = {MARKER, LOCK, "config.yaml", "split.json", "history.jsonl", "metrics.json", "predictions", "model",
               "checkpoints", "wandb"}
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OutOfSpace(RunStopped):
    """A write failed for lack of disk space (or a file-size limit): exit code 1, saved files stay usable."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(f"cannot write {path}: {err.strerror or err}; what was saved before stays usable: free "
                         "some space, then continue with --resume (or start again with --overwrite if no resume point "
                         "was saved yet)", exit_code=1)


# ----------------------------------------------------------------------------------------------- files

def write_file(path: Path, data: bytes | str) -> str:
    """Write `data` under a temporary name, flush it to disk and rename it into place; returns its sha256."""
    data = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in SPACE_ERRORS:
            raise OutOfSpace(path, err) from None
        raise
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, payload: Any, indent: int | None = 1) -> str:
    return write_file(path, json.dumps(payload, indent=indent) + "\n")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def appending(path: Path, line: str) -> None:
    """Append one line (history.jsonl), naming the file when the disk is full."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError as err:
        if err.errno in SPACE_ERRORS:
            raise OutOfSpace(path, err) from None
        raise


PREDICTION_COLUMNS = ["index", "label", "predicted", "prob_positive", "loss", "tokens", "truncated", "text"]


def write_predictions(path: Path, rows: dict, texts: list[str], max_length: int) -> None:
    """predictions/<split>.csv: one row per review, by its index into the combined reviews: label, predicted label,
    probability of positive, loss, its full length in tokens, whether max_length cut it, and its first 200
    characters. Floats are written exactly (repr), so the file reproduces the run's metrics."""
    import csv
    import io

    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(PREDICTION_COLUMNS)
    for i, text in enumerate(texts):
        writer.writerow([int(rows["index"][i]), int(rows["label"][i]), int(rows["predicted"][i]),
                         repr(float(rows["prob_positive"][i])), repr(float(rows["loss"][i])), int(rows["tokens"][i]),
                         int(rows["tokens"][i] > max_length), " ".join(text[:200].split())])
    path.parent.mkdir(exist_ok=True)
    write_file(path, table.getvalue())


def run_path(cfg) -> Path:
    return Path(cfg.output_dir).expanduser() / cfg.name


# ----------------------------------------------------------------------------------------------- the run directory

class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.model_dir = self.path / "model"  # encoder config and tokenizer: what inference needs besides weights
        self.checkpoints = self.path / "checkpoints"
        self.best = self.checkpoints / "best.safetensors"
        self.last = self.checkpoints / "last.safetensors"
        self.resume_dir = self.checkpoints / "resume"
        self.history = self.path / "history.jsonl"
        self.predictions = self.path / "predictions"

    _held: dict[Path, int] = {}  # locks this process holds, by run directory

    @classmethod
    def of(cls, cfg) -> "RunDir":
        return cls(run_path(cfg))

    # --- what is there

    def is_run(self) -> bool:
        """Made by this project: its marker is there and says so."""
        try:
            return json.loads((self.path / MARKER).read_text()).get("project") == PROJECT_NAME
        except (OSError, ValueError, AttributeError):
            return False

    def marker(self) -> dict:
        return json.loads((self.path / MARKER).read_text())

    def is_finished(self) -> bool:
        return (self.path / "metrics.json").is_file()

    def has_results(self) -> bool:
        return self.history.exists() or self.is_finished() or self.best.exists() or bool(self.resume_points())

    def resume_points(self) -> list[Path]:
        """Complete-looking resume points, newest first (a folder is renamed into place only once complete)."""
        if not self.resume_dir.is_dir():
            return []
        return sorted((p for p in self.resume_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)

    def foreign_entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name not in OWN_ENTRIES and not p.name.endswith(".tmp"))

    def config_changes(self, cfg) -> list[str]:
        """The keys in which `cfg` differs from the config this run was started with. Where the run lives (name,
        output_dir) may change, since a run directory can be moved, and so may tracking, which trains nothing."""
        saved = yaml.safe_load((self.path / "config.yaml").read_text()) or {}
        return [key for key in _changed_keys(saved, to_plain_dict(cfg))
                if key not in ("name", "output_dir") and not key.startswith("tracking.")]

    # --- checks (read only), the lock, creation

    def check(self, cfg, resume: bool, overwrite: bool) -> None:
        """Refuses now, before anything is loaded or written, what could not be started, replaced or continued."""
        output_dir = self.path.parent
        if output_dir.exists() and not output_dir.is_dir():
            raise UserError(f"output_dir={cfg.output_dir} is a file; choose a folder")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} is a file; choose another name= or output_dir=")
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"output_dir={cfg.output_dir}: {existing} is a file; choose a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"output_dir={cfg.output_dir}: {existing} is not writable; choose a folder you can write to")
        if self.path.is_dir() and not self.is_run() and set(os.listdir(self.path)) - {LOCK}:
            if (self.path / MARKER).exists():
                raise UserError(f"{self.path / MARKER} is damaged or not this project's, so {self.path} is not taken "
                                "for a run; restore the file if it was, or choose another name= or output_dir=")
            raise UserError(f"{self.path} exists and is not a run directory of this project (no {MARKER}); choose "
                            "another name= or output_dir=")
        holder = self.holder()
        if holder:
            raise UserError(f"{self.path} is in use by {holder}; wait for it to end, or stop it first")
        if resume:
            if not self.is_run():
                raise UserError(f"--resume: there is no run at {self.path}; start it without --resume")
            if self.is_finished():
                raise UserError(f"--resume: {self.path} has finished (metrics.json exists); use --overwrite to train "
                                "it again, or another name=")
            if not self.resume_points():
                raise UserError(f"--resume: {self.path} has no resume point yet (one is saved after each epoch and "
                                "every checkpoint.every_steps steps); start it again with --overwrite")
            changed = self.config_changes(cfg)
            if changed:
                raise UserError(f"--resume: the config differs from {self.path / 'config.yaml'} in "
                                f"{', '.join(changed)}; resume with the run's own config")
        elif self.is_run() and self.has_results():
            if not overwrite and self.is_finished():
                raise UserError(f"run directory {self.path} holds a finished run; pass --overwrite to train it again, "
                                "or choose another name=")
            if not overwrite:
                raise UserError(f"run directory {self.path} already holds results; pass --resume to continue it, "
                                "--overwrite to replace it, or choose another name=")
            if self.foreign_entries():
                raise UserError(f"--overwrite: {self.path} holds files this project did not write "
                                f"({', '.join(self.foreign_entries())}); move them away or choose another name=")

    def holder(self) -> str:
        """Who else holds the lock (its process and command), or '' when nobody does."""
        lock = self.path / LOCK
        if not lock.exists() or self.path.resolve() in self._held:
            return ""
        pid = _flock_holder(lock)
        if pid is None:
            return ""
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            command = ""
        return f"process {pid}" + (f" ({command[:160]})" if command else "") if pid else "another process"

    def lock(self) -> None:
        """Become the run's only writer until this process ends; the OS releases the lock when it dies. A run started
        again in the same process (tests, notebooks) takes over its own earlier lock. The lock file is written once
        and never changed, so a refused start changes nothing."""
        earlier = self._held.pop(self.path.resolve(), None)
        if earlier is not None:
            os.close(earlier)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot create the run directory {self.path}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.path} is in use by {self.holder() or 'another process'}; wait for it to end, or "
                            "stop it first") from None
        self._held[self.path.resolve()] = fd

    def create(self, cfg, resume: bool, overwrite: bool) -> None:
        """Take the lock and check again under it (another process may have just written the run); then, unless
        resuming, start afresh: remove what an overwritten run wrote, write the marker and the config."""
        self.lock()
        self.check(cfg, resume, overwrite)
        if resume:
            return
        for name in OWN_ENTRIES - {LOCK}:
            entry = self.path / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
        self.checkpoints.mkdir()
        write_json(self.path / MARKER, {"project": PROJECT_NAME, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                        "wandb_id": secrets.token_hex(6)})
        write_file(self.path / "config.yaml", yaml.safe_dump(to_plain_dict(cfg), sort_keys=False))

    def write_json(self, name: str, payload: Any, indent: int | None = 1) -> str:
        return write_json(self.path / name, payload, indent)

    def save_checkpoints(self, weights: Weights, best: bool) -> None:
        """last.safetensors, and best.safetensors when this epoch is the best: each read back and verified."""
        for path in (self.last, self.best) if best else (self.last,):
            write_file(path, weights.data)
            if sha256_of(path) != weights.sha256:
                raise RunStopped(f"{path} reads back differently from what was written: the disk may be failing; the "
                                 "last resume point is kept, continue with --resume", exit_code=1)


def _flock_holder(lock: Path) -> Optional[int]:
    """The process holding an exclusive flock on `lock` (0 when one does but /proc cannot say which), or None."""
    try:
        inode = os.stat(lock).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and fields[-3].endswith(f":{inode}"):
                return int(fields[-4])
        return None
    except (OSError, ValueError, IndexError):
        pass
    fd = os.open(lock, os.O_RDONLY)  # no /proc/locks: try the lock itself
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return 0
    finally:
        os.close(fd)


def _changed_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


# ----------------------------------------------------------------------------------------------- resume points

class ResumePoints:
    """checkpoints/resume/NNNNNN/: everything needed to continue a run exactly. That is the model and optimizer, every
    process's RNG states, the schedule, the grad scaler, where training stands (`state`), and the history up to that
    moment.

    A point is written into a temporary folder; its manifest.json, the sha256 of every file, is written last, and only
    then is the folder renamed into place. `load` verifies the newest point against its manifest and falls back to the
    one before (the newest two are kept), saying so in one line; it never continues from a damaged file.
    `layout` (script, processes, accumulation) must match on resume: a position in the data order means nothing
    otherwise."""

    KEEP = 2

    def __init__(self, run: RunDir, layout: dict, process_index: int = 0, barrier: Callable[[], None] = lambda: None):
        self.run, self.layout = run, layout
        self.process_index, self.barrier = process_index, barrier
        self.is_main = process_index == 0

    def save(self, weights: Optional[Weights], optimizer, scheduler, scaler, state) -> None:
        """`weights` (the main process's model, serialised) may be None on other processes."""
        points = self.run.resume_points()
        number = f"{int(points[0].name) + 1 if points else 1:06d}"
        tmp = self.run.resume_dir / f".{number}.tmp"
        if self.is_main:
            for stale in self.run.resume_dir.glob(".*.tmp"):
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        self.barrier()
        rng = f"rng_{self.process_index}.safetensors"
        write_file(tmp / rng, save_safetensors(_rng_states()))
        self.barrier()
        if self.is_main:
            trainer = {"layout": self.layout, "state": asdict(state), "scheduler": scheduler.state_dict(),
                       "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
            files = {"model.safetensors": write_file(tmp / "model.safetensors", weights.data),
                     "optimizer.safetensors": write_file(tmp / "optimizer.safetensors", _optimizer_bytes(optimizer)),
                     "trainer.json": write_json(tmp / "trainer.json", trainer),
                     "history.jsonl": write_file(tmp / "history.jsonl",
                                                 self.run.history.read_bytes() if self.run.history.exists() else b"")}
            for rank in range(self.layout["processes"]):
                files[f"rng_{rank}.safetensors"] = sha256_of(tmp / f"rng_{rank}.safetensors")
            write_json(tmp / "manifest.json", {"files": files})  # last: it marks the point complete
            os.replace(tmp, self.run.resume_dir / number)
            _fsync_dir(self.run.resume_dir)
            for old in self.run.resume_points()[self.KEEP:]:
                shutil.rmtree(old)
        self.barrier()

    def load(self, model: torch.nn.Module, optimizer, scheduler, scaler) -> dict:
        """Restores the newest usable point into the given objects and returns its `state`; the history is cut back
        to what it held at that point."""
        folder, trainer, files = self._newest_usable()
        if trainer["layout"] != self.layout:
            raise UserError(f"--resume: {self.run.path} was saved with {trainer['layout']}, this run has {self.layout}; "
                            "resume it with the same script and number of processes")
        load_weights(model, folder / "model.safetensors")
        optimizer.load_state_dict(_optimizer_state(folder / "optimizer.safetensors"))
        scheduler.load_state_dict(trainer["scheduler"])
        if trainer["scaler"] is not None:
            scaler.load_state_dict(trainer["scaler"])
        _set_rng_states(load_safetensors((folder / f"rng_{self.process_index}.safetensors").read_bytes()))
        state = trainer["state"]
        if self.is_main:
            write_file(self.run.history, (folder / "history.jsonl").read_bytes())
            self._check_best(folder, files, state)
            print(f"resuming {self.run.path} from resume point {folder.name}: epoch {state['epoch']}, micro-batch "
                  f"{state['batches_done']}, optimizer step {state['step']}")
        self.barrier()
        return state

    def _newest_usable(self) -> tuple[Path, dict, dict]:
        problems = []
        for folder in self.run.resume_points():
            problem = self._verify(folder)
            if problem is None:
                trainer = json.loads((folder / "trainer.json").read_text())
                files = json.loads((folder / "manifest.json").read_text())["files"]
                if problems and self.is_main:
                    print(f"resume point {'; '.join(problems)}; using the previous one, {folder.name}")
                return folder, trainer, files
            problems.append(f"{folder.name} is unusable ({problem})")
        raise UserError(f"--resume: no usable resume point in {self.run.resume_dir} ({'; '.join(problems)}); start "
                        "the run again with --overwrite")

    def _verify(self, folder: Path) -> Optional[str]:
        """Why the point at `folder` cannot be used, or None when every file matches its manifest."""
        try:
            files = json.loads((folder / "manifest.json").read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return "manifest.json is missing or damaged"
        # every process's RNG file is listed when a point is saved; a layout with other processes is refused by load
        needed = {"model.safetensors", "optimizer.safetensors", "trainer.json", "history.jsonl", "rng_0.safetensors"}
        if needed - set(files):
            return f"it lacks {', '.join(sorted(needed - set(files)))}"
        for name, digest in files.items():
            try:
                if sha256_of(folder / name) != digest:
                    return f"{name}: checksum differs"
            except OSError as err:
                return f"{name}: {err.strerror}"
        return None

    def _check_best(self, folder: Path, files: dict, state: dict) -> None:
        """best.safetensors must be the best epoch's weights recorded in the point. A kill between an epoch-end point
        and the checkpoint written after it is repaired from the point's own weights (the same bytes)."""
        recorded = state["best_sha256"]
        if recorded is None or (self.run.best.is_file() and sha256_of(self.run.best) == recorded):
            return
        if files["model.safetensors"] == recorded:
            write_file(self.run.best, (folder / "model.safetensors").read_bytes())
            write_file(self.run.last, (folder / "model.safetensors").read_bytes())
            return
        if _saved_epoch(self.run.best) > state["best_epoch"]:
            return  # written after this point (the newer point was unusable): replaying that epoch writes it again
        raise UserError(f"--resume: {self.run.best} is damaged or missing (its checksum differs from the one recorded "
                        "when it was written) and cannot be restored; start the run again with --overwrite")


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"cuda{i}" in states:  # a point saved on another machine may have other GPUs
            torch.cuda.set_rng_state(states[f"cuda{i}"], i)


def _optimizer_bytes(optimizer) -> bytes:
    """The optimizer's tensors as safetensors, its other values (step counts, param groups) as JSON metadata."""
    state = optimizer.state_dict()
    tensors = {f"{param}/{name}": value.detach().contiguous().cpu() for param, values in state["state"].items()
               for name, value in values.items() if torch.is_tensor(value)}
    others = {str(param): {name: value for name, value in values.items() if not torch.is_tensor(value)}
              for param, values in state["state"].items()}
    return save_safetensors(tensors, metadata={"param_groups": json.dumps(state["param_groups"]),
                                               "others": json.dumps(others)})


def _optimizer_state(path: Path) -> dict:
    data = path.read_bytes()
    metadata = _safetensors_metadata(data)
    params: dict[int, dict] = {int(p): values for p, values in json.loads(metadata["others"]).items()}
    for key, tensor in load_safetensors(data).items():
        param, name = key.split("/", 1)
        params.setdefault(int(param), {})[name] = tensor
    return {"state": params, "param_groups": json.loads(metadata["param_groups"])}


def _safetensors_metadata(data: bytes) -> dict:
    header_length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_length]).get("__metadata__", {})


def _saved_epoch(path: Path) -> int:
    """The epoch a checkpoint file says it holds; 0 when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            header = f.read(8)
            metadata = _safetensors_metadata(header + f.read(int.from_bytes(header, "little")))
            return int(json.loads(metadata.get("checkpoint", "{}")).get("epoch", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The run directory, output_dir/name: what a run writes there and who may write it (exp_1/resume.py: the resume
points that let a killed run continue exactly; docs/run-directory.md has the reference, docs/crash-safety.md the
promises). Imports no torch, so results and sweeps that only read run directories start fast.

    run.json              marker: this project made the folder, the run's id, and the files it wrote in model/
    .lock                 held, with the folder itself, by the one process that writes the run
    config.yaml, split.json, history.jsonl, metrics.json, predictions/, model/, wandb/, train.log
    checkpoints/best.safetensors, last.safetensors      verified after writing, checksums in the resume points
    checkpoints/resume/point-000012/                    resume points, the newest two kept, each with manifest.json

Every file is written under a temporary name, flushed to disk and renamed into place (exp_1/files.py), so a kill
never leaves half a file under a real name. Only files this project writes are ever deleted.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import yaml

from exp_1.config import PROJECT_NAME, to_plain_dict
from exp_1.errors import RunStopped, UserError, WriteFailed, WriterReplaced
from exp_1.files import append_line, sha256_of, write_file

MARKER = "run.json"
LOCK = ".lock"
RESUME_ADVICE = "continue with --resume (or start again with --overwrite if no resume point was saved yet)"
POINT = re.compile(r"point-\d{6,}")
POINT_FILES = re.compile(r"(model|optimizer|best|rng_\d+)\.safetensors|trainer\.json|history\.jsonl|manifest\.json")
OWN_TOP = {MARKER, LOCK, "config.yaml", "split.json", "history.jsonl", "metrics.json", "train.log"}
WANDB_RUN = re.compile(r"(offline-)?run-\d{8}_\d{6}-[\w-]+")
WANDB_LINKS = {"latest-run", "debug.log", "debug-internal.log"}
# config keys that a resumed run may change: where the run lives, and how it shows progress, loads data, waits
NOT_TRAINING = ("name", "output_dir", "train.progress", "data.num_workers", "train.peer_timeout")


def _written(name: str, names) -> bool:
    """`name` is one of `names`, or the temporary file write_file makes for one of them."""
    return name in names or (name.startswith(".") and name.endswith(".tmp") and name[1:-4] in names)


PREDICTION_COLUMNS = ["index", "label", "predicted", "prob_positive", "loss", "tokens", "truncated", "text"]


def predictions_csv(rows: dict, texts: list[str], max_length: int) -> str:
    """predictions/<split>.csv: one row per review, by its index into the combined reviews: label, predicted label,
    probability of positive, loss, its full length in tokens, whether max_length cut it, and its first 200
    characters. Floats are written exactly (repr), so the file reproduces the run's metrics."""
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(PREDICTION_COLUMNS)
    for i, text in enumerate(texts):
        writer.writerow([int(rows["index"][i]), int(rows["label"][i]), int(rows["predicted"][i]),
                         repr(float(rows["prob_positive"][i])), repr(float(rows["loss"][i])), int(rows["tokens"][i]),
                         int(rows["tokens"][i] > max_length), " ".join(text[:200].split())])
    return table.getvalue()


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
        self._lock: Optional[_Lock] = None

    @classmethod
    def of(cls, cfg) -> "RunDir":
        return cls(run_path(cfg))

    # --- what is there

    def marker(self) -> dict:
        """run.json, or {} when it is missing or not this project's."""
        try:
            marker = json.loads((self.path / MARKER).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return marker if isinstance(marker, dict) and marker.get("project") == PROJECT_NAME else {}

    def is_run(self) -> bool:
        """Made by this project: its marker is there and says so."""
        return bool(self.marker())

    def is_finished(self) -> bool:
        return self.is_run() and (self.path / "metrics.json").is_file()

    def has_results(self) -> bool:
        return self.history.exists() or self.is_finished() or self.best.exists() or bool(self.resume_points())

    def resume_points(self) -> list[Path]:
        """This project's complete-looking resume points, newest first (a point is renamed into place only once
        complete); anything else in checkpoints/resume is ignored."""
        if not self.resume_dir.is_dir() or self.resume_dir.is_symlink():
            return []
        points = [p for p in self.resume_dir.iterdir() if POINT.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(points, key=lambda p: int(p.name.split("-")[1]), reverse=True)

    def saved_config(self) -> dict:
        """config.yaml, the config this run was started with; a damaged one is one line."""
        try:
            saved = yaml.safe_load((self.path / "config.yaml").read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
            raise UserError(f"{self.path / 'config.yaml'} is missing or damaged ({type(err).__name__}), so this run "
                            "cannot be compared with the config given; restore the file, or start it again with "
                            "--overwrite") from None
        if not isinstance(saved, dict):
            raise UserError(f"{self.path / 'config.yaml'} is damaged (not a mapping of keys); restore it, or start "
                            "the run again with --overwrite")
        return saved

    def config_changes(self, cfg) -> list[str]:
        """The keys in which `cfg` differs from the config this run was started with. Where the run lives (name,
        output_dir) may change, since a run directory can be moved, and so may what does not touch what is trained
        (NOT_TRAINING)."""
        return [key for key in _changed_keys(self.saved_config(), to_plain_dict(cfg))
                if key not in NOT_TRAINING and not key.startswith("tracking.")]

    def foreign_files(self) -> list[str]:
        """Everything in the tree that this project did not write (relative paths), which --overwrite would
        otherwise delete. A link counts as the project's only where WandB makes one; none is ever followed."""
        model_files = self.marker().get("model_files")
        foreign = []
        for root, folders, files in os.walk(self.path):
            rel = PurePosixPath(os.path.relpath(root, self.path))
            for name in sorted(folders) + sorted(files):
                entry = PurePosixPath(name) if str(rel) == "." else rel / name
                link = os.path.islink(os.path.join(root, name))
                if not _owned(entry, model_files) or (link and not _wandb_link(entry)):
                    foreign.append(str(entry))
            folders[:] = [f for f in folders if not os.path.islink(os.path.join(root, f))
                          and str(rel / f if str(rel) != "." else f) not in foreign]
        return foreign

    # --- checks (read only), the writer, creation

    def refuse_foreign_folder(self, cfg) -> None:
        """The run directory may be written here: it is a folder (or can become one) that is writable and is this
        project's run or empty (but for a lock or the log a sweep writes)."""
        try:
            output_dir = self.path.parent
            if output_dir.exists() and not output_dir.is_dir():
                raise UserError(f"output_dir={cfg.output_dir} is a file; choose a folder")
            if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
                raise UserError(f"{self.path} is a file or a link; choose another name= or output_dir=")
            existing = next(p for p in (self.path, *self.path.parents) if p.exists())
            if not existing.is_dir():
                raise UserError(f"output_dir={cfg.output_dir}: {existing} is a file; choose a folder")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise UserError(f"output_dir={cfg.output_dir}: {existing} is not writable; choose a folder you can "
                                "write to")
            entries = set(os.listdir(self.path)) if self.path.is_dir() else set()
        except OSError as err:  # a folder on the way that may not be searched
            raise UserError(f"output_dir={cfg.output_dir}: {err.filename or self.path}: {err.strerror}") from None
        if entries - {LOCK, "train.log"} and not self.is_run():
            if MARKER in entries:
                raise UserError(f"{self.path / MARKER} is damaged or not this project's, so {self.path} is not taken "
                                "for a run; restore the file if it was, or choose another name= or output_dir=")
            raise UserError(f"{self.path} exists and is not a run directory of this project (no {MARKER}); choose "
                            "another name= or output_dir=")

    def check(self, cfg, resume: bool, overwrite: bool, locked: bool = False) -> None:
        """Refuses now, before anything is loaded or written, what could not be started, replaced or continued.
        `locked`: this process holds the run's lock already (the check again under it)."""
        self.refuse_foreign_folder(cfg)
        holder = "" if locked else self.holder()
        if holder:
            raise UserError(f"{self.path} is in use by {holder}; wait for it to end, or stop it first")
        if resume:
            if not self.is_run():
                raise UserError(f"--resume: there is no run at {self.path}; start it without --resume")
            if self.is_finished():
                raise UserError(f"--resume: {self.path} has finished (metrics.json exists); use --overwrite to train "
                                "it again, or another name=")
            if not self.resume_points():
                raise UserError(f"--resume: {self.path} has no resume point yet (one is saved at each validation and "
                                "every checkpoint.every_steps steps); start it again with --overwrite")
            changed = self.config_changes(cfg)
            if changed:
                raise UserError(f"--resume: the config differs from {self.path / 'config.yaml'} in "
                                f"{', '.join(changed)}; resume with the run's own config")
        elif self.is_run():
            if not overwrite and self.is_finished():
                raise UserError(f"run directory {self.path} holds a finished run; pass --overwrite to train it again, "
                                "or choose another name=")
            if not overwrite and self.has_results():
                raise UserError(f"run directory {self.path} already holds results; pass --resume to continue it, "
                                "--overwrite to replace it, or choose another name=")
            foreign = self.foreign_files()  # starting afresh removes what the project wrote, and only that
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise UserError(f"{'--overwrite: ' if overwrite else ''}{self.path} holds files this project did not "
                                f"write ({shown}); move them away or choose another name=")

    def holder(self) -> str:
        """Who holds the run's lock (its process and command), or '' when nobody does."""
        pid = _flock_holder(self.path, self.path / LOCK)
        return "" if pid is None else _describe(pid)

    @contextlib.contextmanager
    def writer(self, cfg, resume: bool, overwrite: bool, split: Optional[dict] = None):
        """This process is the run's only writer inside the block: it takes the lock, checks again under it (another
        process may have just written the run), verifies on --resume that the data gives the split the run was
        started on (`split`: the split record this run drew), and otherwise starts afresh: removes what an
        overwritten run wrote and writes the marker and the config. The lock is released when the block ends."""
        self._lock = _Lock.take(self.path)
        try:
            self.check(cfg, resume, overwrite, locked=True)
            if resume:
                self._check_split(split)
            else:
                self._start_afresh(cfg)
            yield self
        finally:
            self._lock.release()
            self._lock = None

    def _check_split(self, split: Optional[dict]) -> None:
        if split is None:
            return
        try:
            saved = json.loads((self.path / "split.json").read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--resume: {self.path / 'split.json'} is missing or damaged ({type(err).__name__}), so "
                            "the data cannot be checked against the run's split; start the run again with "
                            "--overwrite") from None
        keys = ("train", "validation", "test", "combined_size", "data_sha256")
        differ = [key for key in keys if not isinstance(saved, dict) or saved.get(key) != split.get(key)]
        if differ:
            raise UserError(f"--resume: data.path={split.get('source')} now gives another split than the one this run "
                            f"was started on ({', '.join(differ)} differ from split.json): the data changed since; "
                            "restore it, or start the run again with --overwrite")

    def _start_afresh(self, cfg) -> None:
        """Removes what an overwritten run wrote (never following a link, the marker kept to the last, so an
        interrupted --overwrite can be repeated; train.log, which a sweep is writing, kept), then writes the marker
        and the config."""
        model_files = self.marker().get("model_files")
        for name in ("metrics.json", "history.jsonl"):  # first: a run cut short here is not taken for finished
            (self.path / name).unlink(missing_ok=True)
        for root, folders, files in os.walk(self.path, topdown=False):
            for name in files + folders:
                entry = Path(root) / name
                rel = PurePosixPath(entry.relative_to(self.path).as_posix())
                if str(rel) in (MARKER, LOCK, "train.log") or not _owned(rel, model_files):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    with contextlib.suppress(OSError):  # not empty: it held what was not ours (refused before)
                        entry.rmdir()
                else:
                    entry.unlink()
        self.checkpoints.mkdir(exist_ok=True)
        self.write_json(MARKER, {"project": PROJECT_NAME, "id": secrets.token_hex(8),
                                 "created": time.strftime("%Y-%m-%d %H:%M:%S"), "wandb_id": secrets.token_hex(6)})
        self.write_file("config.yaml", yaml.safe_dump(to_plain_dict(cfg), sort_keys=False))

    # --- writing, only by the writer

    def check_writer(self) -> None:
        """Before every write: the lock this process holds is still the run's (nobody removed or replaced the
        folder or its .lock, which would let a second process start writing too)."""
        if self._lock is not None and not self._lock.intact():
            raise WriterReplaced(self.path / LOCK)

    def write_file(self, name: str, data: bytes | str) -> str:
        self.check_writer()
        try:
            return write_file(self.path / name, data)
        except WriteFailed as err:
            raise WriteFailed(err.path, err.err, RESUME_ADVICE) from None

    def write_json(self, name: str, payload: Any, indent: int | None = 1) -> str:
        return self.write_file(name, json.dumps(payload, indent=indent) + "\n")

    def append_history(self, record: dict) -> None:
        self.check_writer()
        try:
            append_line(self.history, json.dumps(record) + "\n")
        except WriteFailed as err:
            raise WriteFailed(err.path, err.err, RESUME_ADVICE) from None

    def write_predictions(self, split: str, rows: dict, texts: list[str], max_length: int) -> None:
        self.predictions.mkdir(exist_ok=True)
        self.write_file(f"predictions/{split}.csv", predictions_csv(rows, texts, max_length))

    def save_model_parts(self, model, tokenizer) -> None:
        """model/: the encoder config and tokenizer, written into a temporary folder and renamed into place, and
        their names recorded in the marker (what --overwrite may remove there)."""
        from exp_1.model import save_pretrained_parts

        self.check_writer()
        tmp = self.path / ".model.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained_parts(model, tokenizer, tmp)
            for file in tmp.iterdir():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            if self.model_dir.is_dir():
                shutil.rmtree(self.model_dir)
            os.replace(tmp, self.model_dir)
        except Exception as err:  # the tokenizers library raises a bare Exception "... (os error N)" for I/O errors
            code = re.search(r"os error (\d+)", str(err))
            if not isinstance(err, OSError) and code is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            cause = err if isinstance(err, OSError) else OSError(int(code.group(1)), os.strerror(int(code.group(1))))
            raise WriteFailed(self.model_dir, cause, RESUME_ADVICE) from None
        self.write_json(MARKER, {**self.marker(), "model_files": sorted(p.name for p in self.model_dir.iterdir())})

    def save_checkpoints(self, weights, best: bool) -> None:
        """last.safetensors, and best.safetensors when this validation is the best: each read back and verified."""
        for path in (self.last, self.best) if best else (self.last,):
            self.write_file(str(path.relative_to(self.path)), weights.data)
            if sha256_of(path) != weights.sha256:
                raise RunStopped(f"{path} reads back differently from what was written: the disk may be failing; the "
                                 "last resume point is kept, continue with --resume")


def _wandb_link(rel: PurePosixPath) -> bool:
    return len(rel.parts) == 2 and rel.parts[0] == "wandb" and rel.parts[1] in WANDB_LINKS


def _owned(rel: PurePosixPath, model_files: Optional[list]) -> bool:
    """Whether the project writes the file or folder at `rel` (relative to the run directory)."""
    parts = rel.parts
    top = parts[0]
    if len(parts) == 1:
        return _written(top, OWN_TOP) or top in ("predictions", "model", "checkpoints", "wandb", ".model.tmp")
    if top == ".model.tmp":
        return True
    if top == "predictions":
        return len(parts) == 2 and _written(parts[1], {"test.csv", "validation.csv"})
    if top == "model":
        return len(parts) == 2 and (model_files is None or _written(parts[1], set(model_files)))
    if top == "checkpoints":
        if len(parts) == 2:
            return _written(parts[1], {"best.safetensors", "last.safetensors"}) or parts[1] == "resume"
        folder = parts[2]
        if parts[1] != "resume" or not (POINT.fullmatch(folder) or re.fullmatch(r"\.point-\d{6,}\.tmp", folder)):
            return False
        return len(parts) == 3 or (len(parts) == 4 and bool(
            POINT_FILES.fullmatch(parts[3]) or POINT_FILES.fullmatch(parts[3].removeprefix(".").removesuffix(".tmp"))))
    if top == "wandb":
        return (len(parts) == 2 and parts[1] in WANDB_LINKS) or bool(WANDB_RUN.fullmatch(parts[1]))
    return False


class _Lock:
    """An exclusive flock on the run directory itself and on its .lock file, held for the life of the writer; the
    operating system releases both when the process ends, even by SIGKILL. The folder's lock survives the removal
    or replacement of .lock (tidying tools, syncs); the file's works where folders cannot be locked (NFS)."""

    def __init__(self):
        self.folder_fd = self.file_fd = None
        self.ids = {}

    @classmethod
    def take(cls, path: Path) -> "_Lock":
        lock = cls()
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock.folder_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            _flock(lock.folder_fd, path, path, optional=True)
            lock.file_fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            _flock(lock.file_fd, path, path / LOCK)
        except BaseException:
            lock.release()
            raise
        lock.ids = {path: _identity(os.fstat(lock.folder_fd)), path / LOCK: _identity(os.fstat(lock.file_fd))}
        return lock

    def intact(self) -> bool:
        try:
            return all(_identity(os.stat(p)) == ident for p, ident in self.ids.items())
        except OSError:
            return False

    def release(self) -> None:
        for fd in (self.file_fd, self.folder_fd):
            if fd is not None:
                os.close(fd)
        self.folder_fd = self.file_fd = None


def _describe(pid: Optional[int]) -> str:
    if not pid:
        return "another process"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f"process {pid}" + (f" ({command[:160]})" if command else "")


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _flock(fd: int, run: Path, locked: Path, optional: bool = False) -> None:
    """Lock `fd` (open on `locked`, the run directory or its .lock) or say who holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{run} is in use by {_describe(_flock_holder(locked))}; wait for it to end, or stop it "
                        "first") from None
    except OSError as err:
        if optional and err.errno in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return  # a filesystem that cannot lock folders (NFS): the .lock file's lock still stands
        raise UserError(f"cannot lock {run}: {err.strerror}") from None


def _flock_holder(*paths: Path) -> Optional[int]:
    """The process holding an exclusive lock on one of `paths` (0 when one does but /proc cannot say which), or
    None. /proc/locks names a lock by device and inode, so both must match."""
    targets = set()
    for path in paths:
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            targets.add((os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino))
    if not targets:
        return None
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        lines = None
    if lines is not None:
        for line in lines:
            fields = line.split()
            try:
                major, minor, inode = fields[-3].split(":")
                if (int(major, 16), int(minor, 16), int(inode)) in targets:
                    return int(fields[-4])
            except (ValueError, IndexError):
                continue
        return None
    for path in paths:  # no /proc/locks: try the locks themselves
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            finally:
                os.close(fd)
    return None


def _changed_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys

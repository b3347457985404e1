"""Writing a run directory: what may be started, replaced or continued, the one writer's lock, and every write."""

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

import yaml

from imdb_grad_accum.config import PROJECT_NAME, config_changes, to_plain_dict
from imdb_grad_accum.errors import RunStopped, UserError, WriteFailed, WriterReplaced
from imdb_grad_accum.files import append_line, sha256_of, write_file, write_folder
from imdb_grad_accum.lock import LOCK, RunLock
from imdb_grad_accum.rundir import LOG, MARKER, SCRATCH, RunDir, check_same_data, history_line, predictions_csv

RESUME_ADVICE = "continue with --resume (or start again with --overwrite if no resume point was saved yet)"
WANDB_LINKS = ("latest-run", "debug.log", "debug-internal.log")  # links WandB makes in wandb/, into its run folder
WANDB_RUN = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-(.+)")  # the folder WandB makes for the run of id group 1


@contextlib.contextmanager
def resume_advice() -> Iterator[None]:
    """A failed write of a run says how to continue it."""
    try:
        yield
    except WriteFailed as err:
        raise WriteFailed(err.path, err.err, RESUME_ADVICE) from None


class RunWriter(RunDir):
    def __init__(self, path: Path):
        super().__init__(path)
        self.lock: Optional[RunLock] = None
        self._marker: dict = {}
        self._announced = False

    def check(self, cfg, mode: str, locked: bool = False) -> str:
        """Refuses, before anything is loaded or written, what `mode` (start, resume, overwrite or continue) cannot
        do; returns start, resume or finished. `locked`: this process holds the lock, so the answer is final."""
        self._refuse_foreign_folder(cfg)
        holder = "" if locked else self.holder()
        if holder:
            raise UserError(f"{self.path} is in use by {holder}; wait for it to end, or stop it first")
        if mode == "continue":
            mode = "finished" if self.is_finished() else "resume" if self.resume_points() else "overwrite"
            if mode == "finished":
                self.refuse_other_config(cfg)
                return mode
        if mode == "resume":
            if not self.is_run():
                raise UserError(f"--resume: there is no run at {self.path}; start it without --resume")
            if self.is_finished():
                raise UserError(f"--resume: {self.path} has finished (metrics.json exists); use --overwrite to train "
                                "it again, or another name=")
            if not self.resume_points():
                raise UserError(f"--resume: {self.path} has no resume point yet (one is saved at each validation and "
                                "every checkpoint.every_steps steps); start it again with --overwrite")
            changed = config_changes(self.saved_config(), to_plain_dict(cfg))
            if changed:
                raise UserError(f"--resume: the config differs from {self.path / 'config.yaml'} in "
                                f"{', '.join(changed)}; resume with the run's own config")
            return "resume"
        if self.is_run():
            if mode == "start" and self.is_finished():
                raise UserError(f"run directory {self.path} holds a finished run; pass --overwrite to train it again, "
                                "or choose another name=")
            if mode == "start" and (self.history_path.exists() or self.best.exists() or self.resume_points()):
                raise UserError(f"run directory {self.path} already holds results; pass --resume to continue it, "
                                "--overwrite to replace it, or choose another name=")
            foreign = self.foreign_entries()  # starting afresh removes what the run wrote, and only that
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise UserError(f"{'--overwrite: ' if mode == 'overwrite' else ''}{self.path} holds files this project "
                                f"did not write ({shown}); move them away or choose another name=")
            self._refuse_unremovable()
        return "start"

    def _refuse_foreign_folder(self, cfg) -> None:
        """The run directory is (or can be) a writable folder that is this project's run, or as good as empty."""
        try:
            if self.path.parent.exists() and not self.path.parent.is_dir():
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
            scratch = os.listdir(self.scratch) if SCRATCH in entries and self.scratch.is_dir() else []
        except OSError as err:  # a folder on the way that may not be searched
            raise UserError(f"output_dir={cfg.output_dir}: {err.filename or self.path}: {err.strerror}") from None
        only_ours = entries <= {LOCK, LOG, SCRATCH} and all(name.startswith(f".{MARKER}.") for name in scratch)
        if entries and not only_ours and not self.is_run():
            if MARKER in entries:
                raise UserError(f"{self.path / MARKER} is damaged or not this project's, so {self.path} is not taken "
                                "for a run; restore the file if it was, or choose another name= or output_dir=")
            raise UserError(f"{self.path} exists and is not a run directory of this project (no {MARKER}); choose "
                            "another name= or output_dir=")

    def _wholes(self) -> set[str]:
        """Folders owned with everything in them: the scratch folder, and WandB's run folders of this run's ids."""
        ids = self.marker().get("wandb_ids") or []
        wandb = self.path / "wandb"
        names = os.listdir(wandb) if wandb.is_dir() and not wandb.is_symlink() else []
        runs = {name: WANDB_RUN.fullmatch(name) for name in names if not os.path.islink(wandb / name)}
        return {SCRATCH} | {f"wandb/{name}" for name, match in runs.items() if match and match[1] in ids}

    def foreign_entries(self) -> list[str]:
        """What in the tree the run did not write; of links only WandB's into its run folder count, none followed."""
        recorded, wholes = self.recorded(), self._wholes()
        foreign = []
        for root, folders, files in os.walk(self.path):  # os.walk never enters a linked folder
            base = os.path.relpath(root, self.path)
            prefix = "" if base == "." else f"{base}/"
            for name in sorted(folders + files):
                rel = prefix + name
                full = os.path.join(root, name)
                if rel in wholes:
                    ours = not any(MARKER in f for _, _, f in os.walk(full))  # else another run was made inside it
                elif os.path.islink(full):
                    ours = self._wandb_link(rel, wholes)
                else:
                    ours = rel in recorded or rel in (MARKER, LOCK, LOG)
                if not ours:
                    foreign.append(rel)
            folders[:] = [f for f in folders if prefix + f not in wholes | set(foreign)]
        return foreign

    def _wandb_link(self, rel: str, wholes: set[str]) -> bool:
        folder, _, name = rel.partition("/")
        if folder != "wandb" or name not in WANDB_LINKS or not os.path.islink(self.path / rel):
            return False
        target = os.path.normpath(os.path.join("wandb", os.readlink(self.path / rel)))
        return any(target == w or target.startswith(w + "/") for w in wholes if w.startswith("wandb/"))

    def _owned_paths(self) -> list[Path]:
        """What --overwrite removes, deepest first: what the run recorded, and the folders it owns whole."""
        entries = (self.recorded() | self._wholes()) - {MARKER, LOCK, LOG}
        entries |= {f"wandb/{n}" for n in WANDB_LINKS if self._wandb_link(f"wandb/{n}", self._wholes())}
        paths = [self.path / e for e in entries if os.path.lexists(self.path / e)]
        return sorted(paths, key=lambda p: (p.name not in ("metrics.json", "history.jsonl"), -len(p.parts), str(p)))

    def _refuse_unremovable(self) -> None:
        for path in self._owned_paths():
            parent = path.parent
            read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
            if read_only or not os.access(parent, os.W_OK | os.X_OK):
                why = "read-only filesystem" if read_only else f"{parent} is not writable"
                raise UserError(f"--overwrite: {path} cannot be removed ({why}); fix that, or choose another name=")

    @contextlib.contextmanager
    def writing(self, cfg, mode: str, split: dict) -> Iterator[str]:
        """Holds the lock for the block, checks again under it and yields what it does (after doing it)."""
        self.lock = RunLock.take(self.path)
        try:
            decided = self.check(cfg, mode, locked=True)
            if decided == "resume":
                self._marker = self.marker()
                check_same_data(self.split(), split, self.path)
            elif decided == "start":
                self._start_afresh(cfg)
            yield decided
        finally:
            self.lock.release()
            self.lock = None

    def _start_afresh(self, cfg) -> None:
        """metrics.json goes first, run.json never: an interrupted --overwrite is not finished, and repeatable."""
        for path in self._owned_paths():
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path) if str(path.relative_to(self.path)) in self._wholes() else path.rmdir()
                else:
                    path.unlink()
            except OSError as err:
                raise WriteFailed(path, err, "repeat the command", verb="remove") from None
        self.scratch.mkdir(exist_ok=True)
        self._marker = {"project": PROJECT_NAME, "id": secrets.token_hex(8),
                        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "wandb_ids": [secrets.token_hex(6)],
                        "files": [SCRATCH]}
        self._write_marker()
        self.write_file("config.yaml", yaml.safe_dump(to_plain_dict(cfg), sort_keys=False))

    def check_writer(self) -> None:
        """Before every write: nobody replaced the folder or its .lock, which would let a second writer in."""
        if self.lock is not None and not self.lock.intact():
            raise WriterReplaced(self.path / LOCK)
        if self.lock is not None and not self._announced:
            self.lock.announce()
            self._announced = True

    def record(self, *paths: str) -> None:
        """Paths go into run.json before they are created: --overwrite deletes only what the run recorded."""
        new = set(paths) - set(self._marker["files"])
        if new:
            self._marker["files"] = sorted(set(self._marker["files"]) | new)
            self._write_marker()

    def forget(self, *paths: str) -> None:
        self._marker["files"] = sorted(set(self._marker["files"]) - set(paths))
        self._write_marker()

    def add_wandb_id(self, wandb_id: str) -> None:
        if wandb_id not in self._marker["wandb_ids"]:
            self._marker["wandb_ids"].append(wandb_id)
            self._write_marker()

    def _write_marker(self) -> None:
        self.check_writer()
        self._write(self.path / MARKER, json.dumps(self._marker, indent=1) + "\n")

    def folder(self, rel: str) -> Path:
        """A folder of the run, recorded and made if needed; never one reached through a link."""
        parts = Path(rel).parts
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if (self.path / sub).is_symlink():
                raise RunStopped(f"{self.path / sub} is a link, and this run writes only into its own folders; "
                                 f"remove the link, then {RESUME_ADVICE}")
            self.record(sub)
            (self.path / sub).mkdir(exist_ok=True)
        return self.path / rel

    def write_file(self, rel: str, data: bytes | str) -> str:
        self.check_writer()
        self.folder(os.path.dirname(rel))
        self.record(rel)
        return self._write(self.path / rel, data)

    def write_json(self, rel: str, payload, indent: int | None = 1) -> str:
        return self.write_file(rel, json.dumps(payload, indent=indent) + "\n")

    def _write(self, path: Path, data: bytes | str) -> str:
        self.scratch.mkdir(exist_ok=True)
        with resume_advice():
            return write_file(path, data, self.scratch)

    def append_history(self, step: int, values: dict) -> None:
        self.check_writer()
        self.record("history.jsonl")
        with resume_advice():
            append_line(self.history_path, history_line(step, values, time.time()))

    def write_predictions(self, split: str, rows: dict, texts: list[str], max_length: int) -> None:
        self.write_file(f"predictions/{split}.csv", predictions_csv(rows, texts, max_length))

    def write_model_parts(self, save) -> None:
        self.check_writer()
        self.scratch.mkdir(exist_ok=True)
        try:
            with resume_advice(), write_folder(self.model_dir, self.scratch) as tmp:
                save(tmp)
                self.record("model", *(f"model/{p.name}" for p in tmp.iterdir()))
        except Exception as err:  # the tokenizers library raises a bare Exception "... (os error N)" for I/O errors
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise WriteFailed(self.model_dir, OSError(int(code[1]), os.strerror(int(code[1]))), RESUME_ADVICE) from None

    def save_checkpoints(self, weights: Path, sha256: str, best: bool) -> None:
        self.link(weights, "checkpoints/last.safetensors", sha256)
        if best:
            self.link(weights, "checkpoints/best.safetensors", sha256)

    def link(self, source: Path, rel: str, sha256: str) -> None:
        """`rel` becomes `source`'s bytes: a hard link (on disk once), or a copy where links fail; then verified."""
        self.check_writer()
        self.record(rel)
        target = self.path / rel
        self.folder(os.path.dirname(rel))
        tmp = self.scratch / f"{target.name}.{secrets.token_hex(4)}.link"
        try:
            os.link(source, tmp)
            os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._write(target, source.read_bytes())
        if sha256_of(target) != sha256:
            raise RunStopped(f"{target} reads back differently from what was written: the disk may be failing; the "
                             "last resume point is kept, continue with --resume")

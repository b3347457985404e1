"""Resume points, checkpoints/resume/point-NNNNNN/: everything needed to continue a killed run exactly, written so
that a kill at any moment leaves either a complete, verifiable point or none.

A point holds the model and optimizer (safetensors), every process's RNG states, trainer.json (where training
stands, the schedule, the grad scaler, whether the point was saved at a validation, and whose run it is), the history
up to that moment and, hard-linked so that it costs no space, the best checkpoint of that moment. It is written into
the run's scratch folder; manifest.json, the sha256 of every file, is written last, and only then is the folder
renamed into place. The newest two are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save as save_safetensors

from imdb_grad_accum.config import StepLayout, trained_config
from imdb_grad_accum.errors import RunStopped, UserError, WriteFailed
from imdb_grad_accum.files import fsync_dir, sha256_of, write_folder
from imdb_grad_accum.loop import TrainingState
from imdb_grad_accum.model import Weights, load_weights
from imdb_grad_accum.writer import RESUME_ADVICE, RunWriter

KEEP = 2
NEEDED = ("model.safetensors", "optimizer.safetensors", "trainer.json", "history.jsonl", "rng_0.safetensors")


class ResumePoints:
    """`trainer` names the script that trains (an experiment id and its loop, e.g. ("exp_2", "accelerate")): it and
    the layout of an optimizer step must match on resume, since a position in the data order means nothing
    otherwise. Under several processes every process calls save and load (`barrier` keeps them together); the
    first writes."""

    def __init__(self, run: RunWriter, trainer: tuple[str, str], layout: StepLayout, model, optimizer, scheduler,
                 scaler, process_index: int = 0, barrier: Callable[[], None] = lambda: None):
        self.run, self.model, self.optimizer, self.scheduler, self.scaler = run, model, optimizer, scheduler, scaler
        self.layout = {"experiment": trainer[0], "trainer": trainer[1], **asdict(layout)}
        self.process_index, self.barrier = process_index, barrier
        self.is_main = process_index == 0
        self._identity: Optional[dict] = None

    def identity(self) -> dict:
        """The run a point belongs to: its id, and a checksum of what its config.yaml says about training (so that
        re-saving the file, or a key a resume may change, does not disown the points). Read once."""
        if self._identity is None:
            trained = json.dumps(trained_config(self.run.saved_config()), sort_keys=True, default=str)
            self._identity = {"run_id": self.run.marker().get("id"),
                              "config_sha256": hashlib.sha256(trained.encode()).hexdigest()}
        return self._identity

    def save(self, weights: Weights, state: TrainingState, validated: bool) -> Optional[Path]:
        """A new point with `weights` (every process passes its own serialisation; the first writes it) and `state`;
        `validated`: saved at a validation, whose weights last.safetensors must then be. Returns the point's weights
        file on the first process (the checkpoints are linked to it), else None."""
        points = self.run.resume_points()
        name = f"point-{int(points[0].name[6:]) + 1 if points else 1:06d}"
        point, tmp = self.run.resume_dir / name, self.run.scratch / name
        if self.is_main:
            self.run.check_writer()
            self.run.folder("checkpoints/resume")
        try:
            with write_folder(point, self.run.scratch, name) if self.is_main else contextlib.nullcontext(tmp):
                self.barrier()
                (tmp / f"rng_{self.process_index}.safetensors").write_bytes(save_safetensors(_rng_states()))
                self.barrier()
                if self.is_main:
                    self._write_point(tmp, weights, state, validated)
                    self.run.record(f"checkpoints/resume/{name}",
                                    *(f"checkpoints/resume/{name}/{f.name}" for f in tmp.iterdir()))
                    self.run.check_writer()
        except WriteFailed as err:
            raise WriteFailed(err.path, err.err, RESUME_ADVICE) from None
        except OSError as err:  # another process's RNG file
            raise WriteFailed(tmp, err, RESUME_ADVICE) from None
        if self.is_main:
            fsync_dir(self.run.resume_dir)
            for old in self.run.resume_points()[KEEP:]:
                self.remove(old)
        self.barrier()
        return point / "model.safetensors" if self.is_main else None

    def _write_point(self, folder: Path, weights: Weights, state: TrainingState, validated: bool) -> None:
        trainer = {"run": self.identity(), "layout": self.layout, "state": asdict(state), "validated": validated,
                   "scheduler": self.scheduler.state_dict(),
                   "scaler": self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else None}
        history = self.run.history_path.read_bytes() if self.run.history_path.exists() else b""
        contents = {"model.safetensors": weights.data, "optimizer.safetensors": _optimizer_bytes(self.optimizer),
                    "trainer.json": json.dumps(trainer, indent=1) + "\n", "history.jsonl": history}
        files = {name: _write(folder / name, data) for name, data in contents.items()}
        files.update({f"rng_{rank}.safetensors": sha256_of(folder / f"rng_{rank}.safetensors")
                      for rank in range(self.layout["processes"])})
        if state.best_sha256 not in (None, weights.sha256):  # an earlier validation's: kept with the point
            files["best.safetensors"] = self._keep_best(folder / "best.safetensors", state.best_sha256)
        _write(folder / "manifest.json", json.dumps({"files": files}, indent=1) + "\n")  # last: complete

    def remove_all(self) -> None:
        for point in self.run.resume_points():
            self.remove(point)

    def remove(self, point: Path) -> None:
        """Removes a point and drops it from the run's record (old points; all of them once a run has finished)."""
        shutil.rmtree(point)
        rel = f"checkpoints/resume/{point.name}"
        self.run.forget(*(p for p in self.run.recorded() if p == rel or p.startswith(rel + "/")))

    def _keep_best(self, link: Path, sha256: str) -> str:
        """best.safetensors into the point: a hard link (the same bytes, no space), or a copy where links fail."""
        if not self.run.best.is_file() or sha256_of(self.run.best) != sha256:
            raise RunStopped(f"{self.run.best} is damaged or missing (its checksum differs from the one recorded "
                             "when it was written); the last resume point is kept, continue with --resume")
        try:
            os.link(self.run.best, link)
        except OSError:
            _write(link, self.run.best.read_bytes())
        return sha256

    def load(self) -> TrainingState:
        """Restores the newest usable point into the model, optimizer, schedule, scaler and RNGs and returns where
        training stood; the history is cut back to what it held then, and best/last restored where they must be."""
        folder, trainer, files = self._newest_usable()
        if trainer["layout"] != self.layout:
            raise UserError(f"--resume: {self.run.path} was saved with {trainer['layout']}, this run has {self.layout}; "
                            "resume it with the same script and number of processes")
        load_weights(self.model, folder / "model.safetensors")
        self.optimizer.load_state_dict(_optimizer_state(folder / "optimizer.safetensors"))
        self.scheduler.load_state_dict(trainer["scheduler"])
        if trainer["scaler"] is not None:
            self.scaler.load_state_dict(trainer["scaler"])
        _set_rng_states(load_file(folder / f"rng_{self.process_index}.safetensors"))
        state = TrainingState(**trainer["state"])
        if self.is_main:
            self._restore_checkpoints(folder, files, state, trainer["validated"])
            self.run.write_file("history.jsonl", (folder / "history.jsonl").read_bytes())
            print(f"resuming {self.run.path} from resume point {folder.name}: epoch {state.epoch}, micro-batch "
                  f"{state.batches_done}, optimizer step {state.step}")
        self.barrier()
        return state

    def _newest_usable(self) -> tuple[Path, dict, dict]:
        problems = []
        for folder in self.run.resume_points():
            problem, trainer, files = self._verify(folder)
            if problem is None:
                if problems and self.is_main:
                    print(f"resume point {'; '.join(problems)}; using the previous one, {folder.name}")
                return folder, trainer, files
            problems.append(f"{folder.name} is unusable ({problem})")
        raise UserError(f"--resume: no usable resume point in {self.run.resume_dir} ({'; '.join(problems)}); start "
                        "the run again with --overwrite")

    def _verify(self, folder: Path) -> tuple[Optional[str], dict, dict]:
        """Why the point at `folder` cannot be used (None when every file matches its manifest and it is this run's),
        its trainer.json and its manifest. A kept best.safetensors is verified when it is needed."""
        try:
            files = json.loads((folder / "manifest.json").read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return "manifest.json is missing or damaged", {}, {}
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            return "manifest.json is damaged", {}, {}
        missing = [name for name in NEEDED if name not in files]
        if missing:
            return f"it lacks {', '.join(missing)}", {}, {}
        for name, digest in files.items():
            try:
                if name != "best.safetensors" and sha256_of(folder / name) != digest:
                    return f"{name}: checksum differs", {}, {}
            except OSError as err:
                return f"{name}: {err.strerror}", {}, {}
        trainer = json.loads((folder / "trainer.json").read_text())
        if not isinstance(trainer, dict) or not isinstance(trainer.get("state"), dict):
            return "trainer.json is not a resume point's", {}, {}
        if trainer.get("run", {}).get("run_id") != self.identity()["run_id"]:
            return "it belongs to another run", {}, {}
        if trainer["run"].get("config_sha256") != self.identity()["config_sha256"]:
            return "it was saved under another config.yaml", {}, {}
        return None, trainer, files

    def _restore_checkpoints(self, folder: Path, files: dict, state: TrainingState, validated: bool) -> None:
        """best.safetensors must be the recorded best validation's weights, restored from the point's own weights (a
        kill between a point and the checkpoints linked after it) or the best it kept (a newer point was unusable,
        or the file was replaced or removed); a point saved at a validation holds that validation's weights, which
        last.safetensors must be too."""
        weights = folder / "model.safetensors"
        if validated and not (self.run.last.is_file() and sha256_of(self.run.last) == files["model.safetensors"]):
            self.run.link(weights, "checkpoints/last.safetensors", files["model.safetensors"])
        recorded = state.best_sha256
        if recorded is None or (self.run.best.is_file() and sha256_of(self.run.best) == recorded):
            return
        for name in ("model.safetensors", "best.safetensors"):
            if files.get(name) == recorded and (folder / name).is_file() and sha256_of(folder / name) == recorded:
                self.run.link(folder / name, "checkpoints/best.safetensors", recorded)
                return
        raise UserError(f"--resume: {self.run.best} is damaged or missing (its checksum differs from the one recorded "
                        "when it was written) and no resume point holds it; start the run again with --overwrite")


def _write(path: Path, data: bytes | str) -> str:
    """A file of a point being written (write_folder flushes them all and renames the point into place)."""
    data = data.encode() if isinstance(data, str) else data
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


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
    """The optimizer's tensors as safetensors, its other values (step counts, param groups) as JSON metadata: no
    pickle, unlike torch.save."""
    state = optimizer.state_dict()
    tensors = {f"{param}/{name}": value.detach().contiguous().cpu() for param, values in state["state"].items()
               for name, value in values.items() if torch.is_tensor(value)}
    others = {str(param): {name: value for name, value in values.items() if not torch.is_tensor(value)}
              for param, values in state["state"].items()}
    return save_safetensors(tensors, metadata={"param_groups": json.dumps(state["param_groups"]),
                                               "others": json.dumps(others)})


def _optimizer_state(path: Path) -> dict:
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    params: dict[int, dict] = {int(p): values for p, values in json.loads(metadata["others"]).items()}
    for key, tensor in load_file(path).items():
        param, name = key.split("/", 1)
        params.setdefault(int(param), {})[name] = tensor
    return {"state": params, "param_groups": json.loads(metadata["param_groups"])}

"""Resume points, checkpoints/resume/point-NNNNNN/: a kill at any moment leaves a complete, verified point or none."""

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
from imdb_grad_accum.writer import RESUME_ADVICE, RunWriter, resume_advice

KEEP = 2
NEEDED = ("model.safetensors", "optimizer.safetensors", "trainer.json", "history.jsonl", "rng_0.safetensors")


class ResumePoints:
    """Every process calls save and load (`barrier` keeps them together); the first writes."""

    def __init__(self, run: RunWriter, trainer: tuple[str, str], layout: StepLayout, model, optimizer, scheduler,
                 scaler, process_index: int = 0, barrier: Callable[[], None] = lambda: None):
        self.run, self.model, self.optimizer, self.scheduler, self.scaler = run, model, optimizer, scheduler, scaler
        self.layout = {"experiment": trainer[0], "trainer": trainer[1], **asdict(layout)}
        self.process_index, self.barrier = process_index, barrier
        self.is_main = process_index == 0
        self._identity: Optional[dict] = None

    def identity(self) -> dict:
        """The run a point belongs to: its id, and a checksum of its trained config (keys a resume may change aside)."""
        if self._identity is None:
            trained = json.dumps(trained_config(self.run.saved_config()), sort_keys=True, default=str)
            self._identity = {"run_id": self.run.marker().get("id"),
                              "config_sha256": hashlib.sha256(trained.encode()).hexdigest()}
        return self._identity

    def save(self, weights: Weights, state: TrainingState, validated: bool) -> Optional[Path]:
        """A new point (`validated`: at a validation); returns its weights file on the first process, else None."""
        points = self.run.resume_points()
        name = f"point-{int(points[0].name[6:]) + 1 if points else 1:06d}"
        point, tmp = self.run.resume_dir / name, self.run.scratch / name
        if self.is_main:
            self.run.check_writer()
            self.run.folder("checkpoints/resume")
        writing = write_folder(point, self.run.scratch, name) if self.is_main else contextlib.nullcontext(tmp)
        try:
            with resume_advice(), writing:
                self.barrier()
                (tmp / f"rng_{self.process_index}.safetensors").write_bytes(save_safetensors(_rng_states()))
                self.barrier()
                if self.is_main:
                    self._write_point(tmp, weights, state, validated)
                    self.run.record(f"checkpoints/resume/{name}",
                                    *(f"checkpoints/resume/{name}/{f.name}" for f in tmp.iterdir()))
                    self.run.check_writer()
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
        contents = {"optimizer.safetensors": _optimizer_bytes(self.optimizer),
                    "trainer.json": json.dumps(trainer, indent=1) + "\n", "history.jsonl": history}
        _write(folder / "model.safetensors", weights.data)  # its checksum is known: the weights are not hashed twice
        files = {"model.safetensors": weights.sha256, **{name: _write(folder / name, data)
                                                         for name, data in contents.items()}}
        files.update({f"rng_{rank}.safetensors": sha256_of(folder / f"rng_{rank}.safetensors")
                      for rank in range(self.layout["processes"])})
        if state.best_sha256 not in (None, weights.sha256):  # an earlier validation's: kept with the point
            files["best.safetensors"] = self._keep_best(folder / "best.safetensors", state.best_sha256)
        _write(folder / "manifest.json", json.dumps({"files": files}, indent=1) + "\n")  # last: complete

    def remove_all(self) -> None:
        for point in self.run.resume_points():
            self.remove(point)

    def remove(self, point: Path) -> None:
        shutil.rmtree(point)
        rel = f"checkpoints/resume/{point.name}"
        self.run.forget(*(p for p in self.run.recorded() if p == rel or p.startswith(rel + "/")))

    def _keep_best(self, link: Path, sha256: str) -> str:
        if not self.run.best.is_file() or sha256_of(self.run.best) != sha256:
            raise RunStopped(f"{self.run.best} is damaged or missing (its checksum differs from the one recorded "
                             "when it was written); the last resume point is kept, continue with --resume")
        try:
            os.link(self.run.best, link)
        except OSError:
            _write(link, self.run.best.read_bytes())
        return sha256

    def load(self) -> TrainingState:
        folder, trainer, files = self._newest_usable()
        if trainer["layout"] != self.layout:
            raise UserError(f"--resume: {self.run.path} was saved with {trainer['layout']}, this run has "
                            f"{self.layout}; resume it with the same script and number of processes")
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
        """Why the point cannot be used (None if it can), its trainer.json and its manifest."""
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
        """best and last.safetensors restored where they must be the point's weights or the best it kept."""
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
    data = data.encode() if isinstance(data, str) else data
    try:
        path.write_bytes(data)
    except OSError as err:
        err.filename = str(path)  # write() errors name no file; the message should
        raise
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
    """The optimizer's tensors as safetensors, its other values as JSON metadata: no pickle, unlike torch.save."""
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

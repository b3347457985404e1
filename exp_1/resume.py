"""Resume points, checkpoints/resume/point-NNNNNN/: everything needed to continue a killed run exactly, written
so that a kill at any moment leaves either a complete, verifiable point or none."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load as load_safetensors, save as save_safetensors

from exp_1.errors import RunStopped, UserError, WriteFailed
from exp_1.files import fsync_dir, sha256_of, write_file
from exp_1.model import Weights, load_weights
from exp_1.rundir import NOT_TRAINING, POINT_FILES, RESUME_ADVICE, RunDir


class ResumePoints:
    """checkpoints/resume/point-NNNNNN/: everything needed to continue a run exactly. That is the model and
    optimizer, every process's RNG states, the schedule, the grad scaler, where training stands (`state`), the
    history up to that moment, and (hard-linked, so it costs no space) the best checkpoint of that moment.

    A point is written into a temporary folder; its manifest.json, the sha256 of every file, is written last, and only
    then is the folder renamed into place. `load` verifies the newest point against its manifest and that it belongs
    to this run (its id and config) and falls back to the one before (the newest two are kept), saying so in one line;
    it never continues from a damaged or foreign file. `layout` (the script and how an optimizer step is made) must
    match on resume: a position in the data order means nothing otherwise."""

    KEEP = 2

    def __init__(self, run: RunDir, layout: dict, model, optimizer, scheduler, scaler, process_index: int = 0,
                 barrier: Callable[[], None] = lambda: None):
        self.run, self.layout = run, layout
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.process_index, self.barrier = process_index, barrier
        self.is_main = process_index == 0
        self._identity: Optional[dict] = None

    def identity(self) -> dict:
        """The run a point belongs to: its id, and a checksum of what its config.yaml says about training (so that
        re-saving the file, or a key a resume may change, does not disown the points). Read once: neither changes
        while the run trains."""
        if self._identity is None:
            trained = {k: v for k, v in _flat(self.run.saved_config()).items()
                       if k not in NOT_TRAINING and not k.startswith("tracking.")}
            config = hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()
            self._identity = {"run_id": self.run.marker().get("id"), "config_sha256": config}
        return self._identity

    def save(self, weights: Weights, state) -> None:
        """`weights`: the model serialised (every process passes its own; the main process writes it)."""
        points = self.run.resume_points()
        number = int(points[0].name.split("-")[1]) + 1 if points else 1
        tmp = self.run.resume_dir / f".point-{number:06d}.tmp"
        if self.is_main:
            self.run.check_writer()
            for stale in self.run.resume_dir.glob(".point-*.tmp"):
                shutil.rmtree(stale)
            try:
                tmp.mkdir(parents=True)
            except OSError as err:
                raise WriteFailed(tmp, err, RESUME_ADVICE) from None
        self.barrier()
        rng = f"rng_{self.process_index}.safetensors"
        self._write(tmp / rng, save_safetensors(_rng_states()))
        self.barrier()
        if self.is_main:
            trainer = {"run": self.identity(), "layout": self.layout, "state": asdict(state),
                       "scheduler": self.scheduler.state_dict(),
                       "scaler": self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else None}
            files = {"model.safetensors": self._write(tmp / "model.safetensors", weights.data),
                     "optimizer.safetensors": self._write(tmp / "optimizer.safetensors", _optimizer_bytes(self.optimizer)),
                     "trainer.json": self._write(tmp / "trainer.json", json.dumps(trainer, indent=1) + "\n"),
                     "history.jsonl": self._write(tmp / "history.jsonl",
                                                  self.run.history.read_bytes() if self.run.history.exists() else b"")}
            for rank in range(self.layout["processes"]):
                files[f"rng_{rank}.safetensors"] = sha256_of(tmp / f"rng_{rank}.safetensors")
            if state.best_sha256 not in (None, weights.sha256):  # an earlier validation's: kept with the point
                files["best.safetensors"] = self._keep_best(tmp / "best.safetensors", state.best_sha256)
            self._write(tmp / "manifest.json", json.dumps({"files": files}, indent=1) + "\n")  # last: complete
            self.run.check_writer()
            os.replace(tmp, self.run.resume_dir / f"point-{number:06d}")
            fsync_dir(self.run.resume_dir)
            for old in [p for p in self.run.resume_points() if (p / "manifest.json").is_file()][self.KEEP:]:
                shutil.rmtree(old)
        self.barrier()

    def _write(self, path: Path, data: bytes | str) -> str:
        try:
            return write_file(path, data)
        except WriteFailed as err:
            raise WriteFailed(err.path, err.err, RESUME_ADVICE) from None

    def _keep_best(self, link: Path, sha256: str) -> str:
        """best.safetensors into the point: a hard link (the same bytes, no space), or a copy where links fail."""
        if not self.run.best.is_file() or sha256_of(self.run.best) != sha256:
            raise RunStopped(f"{self.run.best} is damaged or missing (its checksum differs from the one recorded "
                             "when it was written); the last resume point is kept, continue with --resume")
        try:
            os.link(self.run.best, link)
        except OSError:
            self._write(link, self.run.best.read_bytes())
        return sha256

    def load(self) -> dict:
        """Restores the newest usable point into the model, optimizer, schedule, scaler and RNGs and returns its
        `state`; the history is cut back to what it held then, and best.safetensors restored where it must be."""
        folder, trainer, files = self._newest_usable()
        if trainer["layout"] != self.layout:
            raise UserError(f"--resume: {self.run.path} was saved with {trainer['layout']}, this run has {self.layout}; "
                            "resume it with the same script and number of processes")
        load_weights(self.model, folder / "model.safetensors")
        self.optimizer.load_state_dict(_optimizer_state(folder / "optimizer.safetensors"))
        self.scheduler.load_state_dict(trainer["scheduler"])
        if trainer["scaler"] is not None:
            self.scaler.load_state_dict(trainer["scaler"])
        _set_rng_states(load_safetensors((folder / f"rng_{self.process_index}.safetensors").read_bytes()))
        state = trainer["state"]
        if self.is_main:
            self._restore_best(folder, files, state)
            self._restore_last(folder)
            self.run.write_file("history.jsonl", (folder / "history.jsonl").read_bytes())
            print(f"resuming {self.run.path} from resume point {folder.name}: epoch {state['epoch']}, micro-batch "
                  f"{state['batches_done']}, optimizer step {state['step']}")
        self.barrier()
        return state

    def _newest_usable(self) -> tuple[Path, dict, dict]:
        problems = []
        identity = self.identity()
        for folder in self.run.resume_points():
            problem = self._verify(folder)
            trainer = None
            if problem is None:
                trainer = json.loads((folder / "trainer.json").read_text())
                if not isinstance(trainer, dict) or not isinstance(trainer.get("state"), dict):
                    problem = "trainer.json is not a resume point's"
                elif trainer.get("run", {}).get("run_id") != identity["run_id"]:
                    problem = "it belongs to another run"
                elif trainer["run"].get("config_sha256") != identity["config_sha256"]:
                    problem = "it was saved under another config.yaml"
            if problem is None:
                if problems and self.is_main:
                    print(f"resume point {'; '.join(problems)}; using the previous one, {folder.name}")
                return folder, trainer, json.loads((folder / "manifest.json").read_text())["files"]
            problems.append(f"{folder.name} is unusable ({problem})")
        raise UserError(f"--resume: no usable resume point in {self.run.resume_dir} ({'; '.join(problems)}); start "
                        "the run again with --overwrite")

    def _verify(self, folder: Path) -> Optional[str]:
        """Why the point at `folder` cannot be used, or None when every file matches its manifest (a kept
        best.safetensors is verified when it is needed)."""
        try:
            files = json.loads((folder / "manifest.json").read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return "manifest.json is missing or damaged"
        if not isinstance(files, dict) or not all(isinstance(k, str) and POINT_FILES.fullmatch(k) and isinstance(v, str)
                                                  for k, v in files.items()):
            return "manifest.json is damaged"
        # every process's RNG file is listed when a point is saved; a layout with other processes is refused by load
        needed = {"model.safetensors", "optimizer.safetensors", "trainer.json", "history.jsonl", "rng_0.safetensors"}
        if needed - set(files):
            return f"it lacks {', '.join(sorted(needed - set(files)))}"
        for name, digest in files.items():
            if name == "best.safetensors":
                continue
            try:
                if sha256_of(folder / name) != digest:
                    return f"{name}: checksum differs"
            except OSError as err:
                return f"{name}: {err.strerror}"
        return None

    def _restore_best(self, folder: Path, files: dict, state: dict) -> None:
        """best.safetensors must be the best validation's weights recorded in the point: restored from the point's
        own weights (a kill between a point and the checkpoint written after it) or the best it kept (a newer point
        was unusable, or the file was replaced or removed)."""
        recorded = state["best_sha256"]
        if recorded is None or (self.run.best.is_file() and sha256_of(self.run.best) == recorded):
            return
        for name in ("model.safetensors", "best.safetensors"):
            source = folder / name
            if files.get(name) == recorded and source.is_file() and sha256_of(source) == recorded:
                self.run.write_file("checkpoints/best.safetensors", source.read_bytes())
                if name == "model.safetensors":
                    self.run.write_file("checkpoints/last.safetensors", source.read_bytes())
                return
        raise UserError(f"--resume: {self.run.best} is damaged or missing (its checksum differs from the one recorded "
                        "when it was written) and no resume point holds it; start the run again with --overwrite")


    def _restore_last(self, folder: Path) -> None:
        """A point saved at a validation holds that validation's weights, which last.safetensors must be: a kill
        between the point and the checkpoints is repaired here too."""
        weights = folder / "model.safetensors"
        if "step" in _checkpoint_metadata(weights) and not (
                self.run.last.is_file() and sha256_of(self.run.last) == sha256_of(weights)):
            self.run.write_file("checkpoints/last.safetensors", weights.read_bytes())


def _checkpoint_metadata(path: Path) -> dict:
    """What Weights.of recorded in a safetensors file (a validation's step, epoch and metrics), or {}."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return json.loads(header.get("__metadata__", {}).get("checkpoint", "{}"))


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


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
    header_length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + header_length]).get("__metadata__", {})
    params: dict[int, dict] = {int(p): values for p, values in json.loads(metadata["others"]).items()}
    for key, tensor in load_safetensors(data).items():
        param, name = key.split("/", 1)
        params.setdefault(int(param), {})[name] = tensor
    return {"state": params, "param_groups": json.loads(metadata["param_groups"])}

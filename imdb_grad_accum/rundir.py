"""The run directory, output_dir/name: where each file of a run lives, what each format holds, and how every file is
read back. Results, export, predict, evaluate and the sweep read runs only through `RunDir`; writing is
`writer.RunWriter`'s (docs/run-directory.md has the reference, docs/crash-safety.md the promises). Imports no torch.

    run.json              marker: this project made the folder; the run's id, WandB ids, and every path it wrote
    .lock, .tmp/          the writer's lock (lock.py) and its scratch folder for files being written
    config.yaml, split.json, history.jsonl, metrics.json, predictions/{validation,test}.csv, model/, wandb/, train.log
    checkpoints/best.safetensors, last.safetensors      verified after writing, checksums recorded
    checkpoints/resume/point-000012/                    resume points (resume.py), the newest two kept
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imdb_grad_accum.config import PROJECT_NAME
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.files import sha256_of

MARKER, LOCK, SCRATCH, LOG = "run.json", ".lock", ".tmp", "train.log"
LABELS = ("negative", "positive")  # the project's one label table: 0 and 1
PREDICTION_COLUMNS = ["index", "label", "predicted", "prob_positive", "loss", "tokens", "truncated", "text"]
# metrics.json: what every finished run records, with the type results and the commands on runs rely on
METRIC_TYPES = {"experiment": str, "trainer": str, "model": str, "effective_batch_size": int, "epochs": int,
                "optimizer_steps": int, "lr": float, "test_loss": float, "test_accuracy": float, "test_f1": float,
                "n_test": int, "seed": int, "best_sha256": str, "split_fingerprint": str, "wall_seconds": float,
                "train_samples_per_s": float, "device": str, "precision": str, "num_processes": int}


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.model_dir = self.path / "model"  # encoder config and tokenizer: what inference needs besides weights
        self.checkpoints = self.path / "checkpoints"
        self.best = self.checkpoints / "best.safetensors"
        self.last = self.checkpoints / "last.safetensors"
        self.resume_dir = self.checkpoints / "resume"
        self.history_path = self.path / "history.jsonl"
        self.scratch = self.path / SCRATCH

    @classmethod
    def of(cls, cfg) -> "RunDir":
        return cls(Path(cfg.output_dir).expanduser() / cfg.name)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

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

    def recorded(self) -> set[str]:
        """The paths (relative, files and folders) this run wrote, as its marker records them."""
        files = self.marker().get("files", [])
        return set(files) if isinstance(files, list) else set()

    def resume_points(self) -> list[Path]:
        """The resume points this run recorded that are in place, newest first (a point is renamed into place only
        once complete). A folder it did not record is never taken for one."""
        points = [self.path / p for p in self.recorded() if p.startswith("checkpoints/resume/point-") and p.count("/") == 2]
        points = [p for p in points if p.is_dir() and not p.is_symlink() and p.name[6:].isdigit()]
        return sorted(points, key=lambda p: int(p.name[6:]), reverse=True)

    def holder(self) -> str:
        """Who holds the run's lock (its process and command), or '' when nobody does."""
        from imdb_grad_accum.lock import holder

        return holder(self.path)

    # --- reading its files

    def saved_config(self) -> dict:
        """config.yaml, the config this run was started with; a damaged one is one line."""
        saved = self._read("config.yaml", yaml.safe_load, "this run cannot be compared with the config given")
        if not isinstance(saved, dict):
            raise UserError(f"{self.path / 'config.yaml'} is damaged (not a mapping of keys); restore it, or start "
                            "the run again with --overwrite")
        return saved

    def split(self) -> dict:
        """split.json: the run's indices into the combined reviews, and what they were drawn from."""
        split = self._read("split.json", json.loads, "the run's split is unknown")
        if not isinstance(split, dict):
            raise UserError(f"{self.path / 'split.json'} is damaged (not a JSON object)")
        return split

    def history(self) -> list[dict]:
        """history.jsonl, one record per logged step, validation and test."""
        return self._read("history.jsonl", parse_history, "its learning curves are unknown") \
            if self.history_path.exists() else []

    def metrics(self) -> dict:
        """metrics.json of a finished run, checked to hold every key (METRIC_TYPES) with its type."""
        metrics = self._read("metrics.json", json.loads, "the run's results are unknown")
        if not isinstance(metrics, dict):
            raise UserError(f"{self.path / 'metrics.json'} holds no JSON object; was it written by this project?")
        wrong = [k for k, kind in METRIC_TYPES.items() if not _is(metrics.get(k), kind)]
        if wrong:
            missing = "best_sha256" in wrong and metrics.get("best_sha256") is None
            raise UserError(f"{self.path / 'metrics.json'} lacks or mistypes {', '.join(wrong)}"
                            + ("; without the recorded checksum its best weights cannot be trusted" if missing else
                               "; was it written by this project?"))
        return metrics

    def predictions(self, split: str = "test") -> dict:
        """predictions/<split>.csv as arrays, by review index."""
        return self._read(f"predictions/{split}.csv", parse_predictions, "its per-review results are unknown")

    def verified_best(self) -> Path:
        """checkpoints/best.safetensors, checked against the checksum metrics.json records for it."""
        expected = self.metrics()["best_sha256"]
        if not self.best.is_file() or sha256_of(self.best) != expected:
            raise UserError(f"{self.best} is damaged, replaced or missing (its checksum differs from the one "
                            "recorded in metrics.json), so its predictions could not be trusted; restore it, or train "
                            "the run again")
        return self.best

    def _read(self, name: str, parse, consequence: str) -> Any:
        try:
            return parse((self.path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as err:
            detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            raise UserError(f"{self.path / name} is missing or damaged ({detail}), so {consequence}; restore it, or "
                            "train the run again") from None


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------- the formats

def history_line(step: int, values: dict, time: float) -> str:
    return json.dumps({"step": step, **values, "time": round(time, 3)}) + "\n"


def parse_history(text: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"line {number} is not JSON ({err.msg})") from None
        numbers = [v for k, v in record.items() if k in ("step", "epoch") or k.startswith(("train/", "val/", "test/"))] \
            if isinstance(record, dict) else None
        if numbers is None or not all(_is(v, float) for v in numbers):
            raise ValueError(f"line {number} is not a record of numbers")
        records.append(record)
    return records


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


def parse_predictions(text: str) -> dict:
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows or set(PREDICTION_COLUMNS) - set(rows[0]):
        raise ValueError(f"expected the columns {', '.join(PREDICTION_COLUMNS)}")
    rows.sort(key=lambda r: int(r["index"]))
    columns = {name: np.array([int(r[name]) for r in rows]) for name in ("index", "label", "predicted", "tokens",
                                                                        "truncated")}
    for name in ("prob_positive", "loss"):
        columns[name] = np.array([float(r[name]) for r in rows])
    columns["text"] = [r["text"] for r in rows]
    return columns


def final_metrics(cfg, test: dict, state, facts: dict, wall_seconds: float) -> dict:
    """metrics.json: the best checkpoint's test metrics, and what results tables and comparisons need."""
    return {**{f"test_{k}": test[k] for k in ("loss", "accuracy", "f1")}, "n_test": test["n"],
            "best_epoch": state.best_epoch, "best_step": state.best_step,
            f"best_val_{cfg.checkpoint.best_metric}": state.best_value, "best_sha256": state.best_sha256,
            "stopped_early_at": state.stopped_early_at, "model": cfg.model.name, "epochs": cfg.train.epochs,
            "optimizer_steps": state.step, "seed": cfg.seed, "split_seed": cfg.data.split_seed, **facts, **state.throughput(),
            "wall_seconds": round(wall_seconds, 2)}


def split_fingerprint(split: dict) -> str:
    """What identifies a run's reviews: its indices and the combined reviews' content checksum. Two runs whose
    fingerprints are equal saw the same texts in each of train, validation and test."""
    import hashlib

    what = json.dumps([split["train"], split["validation"], split["test"], split["combined_size"],
                       split["data_sha256"]])
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def check_same_data(saved: dict, current: dict, path: Path) -> None:
    """--resume: the data must still give the split the run was started on."""
    keys = ("train", "validation", "test", "combined_size", "data_sha256")
    differ = [key for key in keys if saved.get(key) != current.get(key)]
    if differ:
        raise UserError(f"--resume: data.path={current.get('source')} now gives another split than the one this run "
                        f"was started on ({', '.join(differ)} differ from {path / 'split.json'}): the data changed "
                        "since; restore it, or start the run again with --overwrite")


def check_finished(run: RunDir, command: str) -> None:
    """Refuses, for a command on a finished run (predict, export, evaluate), what is not one."""
    if not run.is_run():
        raise UserError(f"{run.path} is not a run directory of this project (no valid {MARKER})")
    if not run.is_finished():
        raise UserError(f"{run.path} has not finished training (no metrics.json); finish it with --resume, then "
                        f"{command} it")

"""The run directory, output_dir/name: its files, their formats, and how each is read back (docs/run-directory.md).
Imports no torch."""

import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imdb_grad_accum.config import PROJECT_NAME, config_changes, to_plain_dict
from imdb_grad_accum.errors import UserError, first_line
from imdb_grad_accum.files import sha256_of
from imdb_grad_accum.lock import holder

MARKER, SCRATCH, LOG = "run.json", ".tmp", "train.log"
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

    def marker(self) -> dict:
        """run.json, or {} when it is missing or not this project's."""
        try:
            marker = json.loads((self.path / MARKER).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return marker if isinstance(marker, dict) and marker.get("project") == PROJECT_NAME else {}

    def is_run(self) -> bool:
        return bool(self.marker())

    def is_finished(self) -> bool:
        return self.is_run() and (self.path / "metrics.json").is_file()

    def recorded(self) -> set[str]:
        files = self.marker().get("files", [])
        return set(files) if isinstance(files, list) else set()

    def resume_points(self) -> list[Path]:
        """The (complete) resume points this run recorded that are in place, newest first."""
        points = [self.path / p for p in self.recorded()
                  if p.startswith("checkpoints/resume/point-") and p.count("/") == 2]
        points = [p for p in points if p.is_dir() and not p.is_symlink() and p.name[6:].isdigit()]
        return sorted(points, key=lambda p: int(p.name[6:]), reverse=True)

    def holder(self) -> str:
        return holder(self.path)

    def refuse_other_config(self, cfg) -> None:
        """--continue of a finished run: it must have finished with this config."""
        changed = config_changes(self.saved_config(), to_plain_dict(cfg))
        if changed:
            raise UserError(f"--continue: {self.path} has finished with another config (it differs in "
                            f"{', '.join(changed)}); give this config another name= or output_dir=")

    def saved_config(self) -> dict:
        return self._read("config.yaml", yaml.safe_load, "this run cannot be compared with the config given",
                          "is damaged (not a mapping of keys); restore it, or start the run again with --overwrite")

    def split(self) -> dict:
        return self._read("split.json", json.loads, "the run's split is unknown", "is damaged (not a JSON object)")

    def history(self) -> list[dict]:
        if not self.history_path.exists():
            return []
        return self._read("history.jsonl", parse_history, "its learning curves are unknown")

    def metrics(self) -> dict:
        """metrics.json of a finished run, checked to hold every key (METRIC_TYPES) with its type."""
        metrics = self._read("metrics.json", json.loads, "the run's results are unknown",
                             "holds no JSON object; was it written by this project?")
        wrong = [k for k, kind in METRIC_TYPES.items() if not _is(metrics.get(k), kind)]
        if wrong:
            missing = "best_sha256" in wrong and metrics.get("best_sha256") is None
            raise UserError(f"{self.path / 'metrics.json'} lacks or mistypes {', '.join(wrong)}"
                            + ("; without the recorded checksum its best weights cannot be trusted" if missing else
                               "; was it written by this project?"))
        return metrics

    def predictions(self, split: str = "test") -> dict:
        return self._read(f"predictions/{split}.csv", parse_predictions, "its per-review results are unknown")

    def verified_best(self) -> Path:
        """checkpoints/best.safetensors, checked against the checksum metrics.json records for it."""
        expected = self.metrics()["best_sha256"]
        if not self.best.is_file() or sha256_of(self.best) != expected:
            raise UserError(f"{self.best} is damaged, replaced or missing (its checksum differs from the one "
                            "recorded in metrics.json), so its predictions could not be trusted; restore it, or train "
                            "the run again")
        return self.best

    def _read(self, name: str, parse, consequence: str, not_a_dict: str | None = None) -> Any:
        """`name` parsed; when `not_a_dict` is given, what to say if it is not a mapping."""
        try:
            value = parse((self.path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as err:
            detail = first_line(err, 120) or type(err).__name__
            raise UserError(f"{self.path / name} is missing or damaged ({detail}), so {consequence}; restore it, or "
                            "train the run again") from None
        if not_a_dict and not isinstance(value, dict):
            raise UserError(f"{self.path / name} {not_a_dict}")
        return value


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind) and not isinstance(value, bool)


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
        if not isinstance(record, dict) or not all(
                _is(v, float) for k, v in record.items()
                if k in ("step", "epoch") or k.startswith(("train/", "val/", "test/"))):
            raise ValueError(f"line {number} is not a record of numbers")
        records.append(record)
    return records


def predictions_csv(rows: dict, texts: list[str], max_length: int) -> str:
    """predictions/<split>.csv; floats written exactly (repr), so the file reproduces the run's metrics."""
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
    kinds = {"prob_positive": float, "loss": float, "text": str}
    columns = {name: [kinds.get(name, int)(r[name]) for r in rows] for name in PREDICTION_COLUMNS}
    return {name: values if name == "text" else np.array(values) for name, values in columns.items()}


def final_metrics(cfg, test: dict, state, facts: dict, wall_seconds: float) -> dict:
    return {**{f"test_{k}": test[k] for k in ("loss", "accuracy", "f1")}, "n_test": test["n"],
            "best_epoch": state.best_epoch, "best_step": state.best_step,
            f"best_val_{cfg.checkpoint.best_metric}": state.best_value, "best_sha256": state.best_sha256,
            "stopped_early_at": state.stopped_early_at, "model": cfg.model.name, "epochs": cfg.train.epochs,
            "optimizer_steps": state.step, "seed": cfg.seed, "split_seed": cfg.data.split_seed, **facts,
            **state.throughput(), "wall_seconds": round(wall_seconds, 2)}


SPLIT_KEYS = ("train", "validation", "test", "combined_size", "data_sha256")  # what identifies a run's reviews


def split_fingerprint(split: dict) -> str:
    """Equal for two runs that saw the same texts in each of train, validation and test."""
    return hashlib.sha256(json.dumps([split[key] for key in SPLIT_KEYS]).encode()).hexdigest()[:16]


def check_same_data(saved: dict, current: dict, path: Path) -> None:
    """--resume: the data must still give the split the run was started on."""
    differ = [key for key in SPLIT_KEYS if saved.get(key) != current.get(key)]
    if differ:
        raise UserError(f"--resume: data.path={current.get('source')} now gives another split than the one this run "
                        f"was started on ({', '.join(differ)} differ from {path / 'split.json'}): the data changed "
                        "since; restore it, or start the run again with --overwrite")


def check_finished(run: RunDir, command: str) -> None:
    if not run.is_run():
        raise UserError(f"{run.path} is not a run directory of this project (no valid {MARKER})")
    if not run.is_finished():
        raise UserError(f"{run.path} has not finished training (no metrics.json); finish it with --resume, then "
                        f"{command} it")


def refuse_inside_a_run(out: Path, what: str) -> None:
    """An --out of results or evaluations never goes into a run directory, which would then refuse --overwrite."""
    inside = next((p for p in (out, *out.resolve().parents) if (p / MARKER).is_file()), None)
    if inside is not None:
        raise UserError(f"--out {out} is inside the run directory {inside}; write {what} outside any run")

"""Tables, comparisons and plots of finished runs, generated from their run directories, so they cannot disagree
with the runs.

    python exp_1/results.py                            # every finished run in runs/
    python exp_1/results.py runs/study/* --out training_results/cpu_study

Runs are grouped by experiment (the folder of the script that trained them: exp_1 or exp_2), and within it into
rows: runs whose configs differ only in the training seed (and name) are one row, reported as mean ± standard
deviation with a 95% interval (Student's t over seeds; a bootstrap over test reviews for a single run). Every two
rows tested on the same reviews are compared: the accuracy difference with a paired bootstrap interval, and an exact
McNemar test on per-review correctness, Holm-corrected for the number of comparisons. The sentences under the
tables are generated from those numbers and never rank rows whose difference is not significant.

Each experiment gets OUT/<experiment>/: README.md, the learning curves, and an error analysis from the runs'
per-review predictions (confusion matrices, accuracy by review length and truncation, calibration, the most
confident mistakes). The folder is replaced as a whole or not at all; other experiments' folders are left alone.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure

from exp_1 import stats
from exp_1.cli import CliParser, run_cli
from exp_1.errors import UserError
from exp_1.files import sha256_of
from exp_1.rundir import RunDir

PROJECT = Path(__file__).resolve().parents[1]
METRICS = ["script", "model", "effective_batch_size", "epochs", "optimizer_steps", "lr", "test_loss", "test_accuracy",
           "test_f1", "wall_seconds", "train_samples_per_s", "device", "precision", "num_processes"]  # what results use
TEXT_METRICS = ("script", "model", "device", "precision")
NOT_THE_CONFIGURATION = ("seed", "name", "tracking")  # runs differing only in these are seeds of one row
LENGTH_EDGES = [0, 128, 256, 512, 1024]  # token-count bins of the accuracy-by-length analysis (plus each max_length)
SIGNIFICANCE = 0.05
MIN_BIN_REVIEWS = 10  # the length plot leaves out bins with fewer reviews (the table has them all)
SMOOTHING = 25  # a train-loss curve is a moving average over 1/25 of its steps


@dataclass
class Run:
    path: Path
    metrics: dict  # metrics.json
    history: list[dict]  # history.jsonl
    config: dict  # config.yaml
    predictions: Optional[dict]  # predictions/test.csv as arrays, by review index; None for runs from before it

    @property
    def experiment(self) -> str:
        return Path(self.metrics["script"]).parts[0]  # exp_1 or exp_2


@dataclass
class Row:
    """Runs of one configuration that differ only in the training seed."""

    runs: list[Run]
    label: str = ""
    values: dict = field(default_factory=dict)  # what the table shows

    @property
    def first(self) -> Run:
        return self.runs[0]

    def correctness(self) -> Optional[np.ndarray]:
        """(seeds, reviews) 0/1, columns by review index; None when a run lacks predictions."""
        if any(run.predictions is None for run in self.runs):
            return None
        return np.stack([run.predictions["label"] == run.predictions["predicted"] for run in self.runs]).astype(float)

    def test_reviews(self) -> Optional[tuple]:
        if any(run.predictions is None for run in self.runs):
            return None
        indices = {tuple(run.predictions["index"]) for run in self.runs}
        return indices.pop() if len(indices) == 1 else None


# ----------------------------------------------------------------------------------------------- reading runs

def find_runs(paths: list[Path]) -> list[Run]:
    """Finished runs (with metrics.json): each path that is a run directory, and those directly in each other path."""
    runs, seen = [], set()
    for path in paths:
        if path.is_file():
            raise UserError(f"{path} is a file; pass run directories or folders of them (default: runs)")
        if not path.is_dir():
            raise UserError(f"{path}: no such folder; pass run directories or folders of them (default: runs)")
        is_run = any((path / name).is_file() for name in ("run.json", "config.yaml", "metrics.json"))
        if is_run and not RunDir(path).is_run():
            raise UserError(f"{path} is not a run directory of this project (no valid run.json), so its files are not "
                            "taken for results")
        if is_run and not (path / "metrics.json").is_file():
            print(f"skipped {path}: not finished (no metrics.json)")
        folders = [path] if is_run else sorted(p for p in path.iterdir() if p.is_dir())
        for folder in folders:
            if RunDir(folder).is_finished() and folder.resolve() not in seen:  # a run named twice counts once
                seen.add(folder.resolve())
                runs.append(read_run(folder))
            elif (folder / "metrics.json").is_file() and folder.resolve() not in seen:
                print(f"skipped {folder}: not a run directory of this project (no valid run.json)")
    return runs


def read_run(folder: Path) -> Run:
    """A finished run's files; anything unreadable is one line naming the file."""
    def read(name: str, parse):
        try:
            return parse((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
            raise UserError(f"{folder / name}: cannot read it ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0][:120] if str(err).strip() else ''})") from None

    metrics = read("metrics.json", json.loads)
    if not isinstance(metrics, dict):
        raise UserError(f"{folder / 'metrics.json'} holds no JSON object; was it written by this project?")
    missing = [key for key in METRICS if key not in metrics]
    if missing:
        raise UserError(f"{folder / 'metrics.json'} lacks {', '.join(missing)}; was it written by this project?")
    wrong = [key for key in METRICS if not isinstance(metrics[key], str if key in TEXT_METRICS else (int, float))
             or isinstance(metrics[key], bool)]
    if wrong or not str(metrics["script"]).startswith(("exp_1/", "exp_2/")):
        raise UserError(f"{folder / 'metrics.json'} holds values of the wrong type ({', '.join(wrong) or 'script'}); "
                        "was it written by this project?")
    best = folder / "checkpoints" / "best.safetensors"
    if metrics.get("best_sha256") and (not best.is_file() or sha256_of(best) != metrics["best_sha256"]):
        raise UserError(f"{best} is damaged, replaced or missing (its checksum differs from the one in metrics.json): "
                        "the run's results can no longer be reproduced from its weights; restore it, or train the "
                        "run again")
    history = read("history.jsonl", _parse_history)
    config = read("config.yaml", yaml.safe_load) if (folder / "config.yaml").is_file() else {}
    if not isinstance(config, dict):
        raise UserError(f"{folder / 'config.yaml'} holds no mapping of keys; was it written by this project?")
    predictions = None
    if (folder / "predictions" / "test.csv").is_file():
        predictions = read("predictions/test.csv", _parse_predictions)
        correct = int((predictions["label"] == predictions["predicted"]).sum())
        if len(predictions["label"]) != metrics.get("n_test") or correct / len(predictions["label"]) != metrics["test_accuracy"]:
            raise UserError(f"{folder / 'predictions' / 'test.csv'} does not reproduce metrics.json ({len(predictions['label'])} "
                            f"reviews, accuracy {correct / len(predictions['label']):.4f}; metrics.json: "
                            f"{metrics.get('n_test')} and {metrics['test_accuracy']:.4f}): it is damaged or another run's")
    else:
        print(f"note: {folder} lacks predictions/test.csv (a run from before prediction files, or the file was "
              "removed): it gets no interval over test reviews, no comparisons and no error analysis")
    return Run(folder, metrics, history, config, predictions)


def _parse_history(text: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"line {number} is not JSON ({err.msg})") from None
            numbers = {k: v for k, v in record.items() if k in ("step", "epoch") or k.startswith(("train/", "val/",
                                                                                                 "test/"))} \
                if isinstance(record, dict) else None
            if numbers is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          for v in numbers.values()):
                raise ValueError(f"line {number} is not a record of numbers")
            records.append(record)
    return records


def _parse_predictions(text: str) -> dict:
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or {"index", "label", "predicted", "prob_positive", "tokens", "truncated"} - set(rows[0]):
        raise ValueError("expected the columns index, label, predicted, prob_positive, tokens, truncated")
    rows.sort(key=lambda r: int(r["index"]))
    columns = {name: np.array([int(r[name]) for r in rows]) for name in ("index", "label", "predicted", "tokens",
                                                                        "truncated")}
    columns["prob_positive"] = np.array([float(r["prob_positive"]) for r in rows])
    columns["text"] = [r.get("text", "") for r in rows]
    return columns


# ----------------------------------------------------------------------------------------------- rows

def group_rows(runs: list[Run]) -> list[Row]:
    """Runs of one name (apart from a _seed<N> ending, as exp_1/sweep.py --seeds names them) with the same
    configuration apart from the seed (and tracking) are one row; where (output_dir) and how (script, processes) a
    run ran are part of its configuration."""
    rows: dict[str, Row] = {}
    for run in runs:
        label = re.sub(r"_seed\d+$", "", run.path.name)
        key = json.dumps([label, _configuration(run), run.metrics["script"], run.metrics["num_processes"]],
                         sort_keys=True)
        rows.setdefault(key, Row([], label)).runs.append(run)
    rows = list(rows.values())
    for row in rows:
        row.runs.sort(key=lambda run: run.metrics.get("seed", 0))
    for label in {row.label for row in rows}:
        same = [row for row in rows if row.label == label]
        if len(same) > 1:  # tell them apart by their output_dir when that does, else by the keys that differ
            flat = [_flatten(_configuration(row.first)) for row in same]
            keys = [k for k in sorted(set().union(*flat)) if len({str(f.get(k)) for f in flat}) > 1]
            by_folder = len({Path(str(f.get("output_dir"))).name for f in flat}) == len(same)
            for row, values in zip(same, flat):
                row.label += (f" ({Path(str(values.get('output_dir'))).name})" if by_folder else
                              " (" + ", ".join(f"{k.split('.')[-1]}={values.get(k)}" for k in keys) + ")")
    for row in rows:
        row.values = _row_values(row)
    return sorted(rows, key=lambda row: (str(row.first.config.get("output_dir", "")),
                                         row.first.metrics["effective_batch_size"], row.label))


def _configuration(run: Run) -> dict:
    return {k: v for k, v in run.config.items() if k not in NOT_THE_CONFIGURATION} or {"run": str(run.path)}


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _row_values(row: Row) -> dict:
    """Mean, standard deviation and 95% interval of the test metrics over the row's seeds."""
    def spread(key: str) -> tuple[float, Optional[float]]:
        values = [run.metrics[key] for run in row.runs]
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None

    accuracies = [run.metrics["test_accuracy"] for run in row.runs]
    correctness = row.correctness()
    if len(accuracies) > 1:
        interval, basis = stats.seed_interval(accuracies), f"t over {len(accuracies)} seeds"
    elif correctness is not None:
        interval, basis = stats.bootstrap_interval(correctness[0]), f"bootstrap over {correctness.shape[1]} reviews"
    else:
        interval, basis = None, "no predictions file"
    return {"accuracy": spread("test_accuracy"), "loss": spread("test_loss"), "f1": spread("test_f1"),
            "interval": interval, "basis": basis, "seeds": len(row.runs)}


def _mean_sd(value: tuple[float, Optional[float]], digits: int = 4) -> str:
    mean, sd = value
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


ROW_COLUMNS = ["row", "seeds", "model", "effective batch", "epochs", "optimizer steps", "lr", "test accuracy",
               "95% interval", "interval from", "test loss", "test F1", "wall time", "train samples/s", "device"]


def row_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(ROW_COLUMNS) + " |", "|" + "---|" * len(ROW_COLUMNS)]
    for row in rows:
        m, v = row.first.metrics, row.values
        interval = f"{v['interval'][0]:.4f} – {v['interval'][1]:.4f}" if v["interval"] else "n/a"
        mean = lambda key: float(np.mean([run.metrics[key] for run in row.runs]))
        cells = [row.label, v["seeds"], m["model"], m["effective_batch_size"], m["epochs"],
                 round(mean("optimizer_steps")), f"{m['lr']:.3g}", _mean_sd(v["accuracy"]), interval, v["basis"],
                 _mean_sd(v["loss"]), _mean_sd(v["f1"]), f"{mean('wall_seconds') / 60:.1f} min",
                 f"{mean('train_samples_per_s'):.1f}",
                 f"{m['device']} {m['precision']}" + (f" x{m['num_processes']}" if m["num_processes"] > 1 else "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- comparisons

@dataclass
class Comparison:
    a: Row
    b: Row
    difference: float  # accuracy of a minus b, as a fraction
    low: float
    high: float
    p: float  # exact McNemar, on per-review majority correctness
    p_holm: float = 1.0

    @property
    def significant(self) -> bool:
        return not self.low <= 0 <= self.high and self.p_holm < SIGNIFICANCE

    def sentence(self, comparisons: int) -> str:
        d, lo, hi = 100 * self.difference, 100 * self.low, 100 * self.high
        if d < 0:  # the better row first: its lead and interval read as positive numbers
            return Comparison(self.b, self.a, -self.difference, -self.high, -self.low, self.p, self.p_holm).sentence(
                comparisons)
        numbers = (f"{d:+.1f} points, 95% interval {lo:+.1f} to {hi:+.1f}; McNemar p = {self.p:.3g}, "
                   f"{self.p_holm:.3g} after Holm's correction for {comparisons} comparison(s)")
        if self.low <= 0 <= self.high:
            return (f"**{self.a.label}** and **{self.b.label}**: not significantly different ({numbers}); the interval "
                    "covers 0, so these runs do not rank them.")
        if not self.significant:
            return (f"**{self.a.label}** and **{self.b.label}**: the interval excludes 0 but McNemar's test after "
                    f"correction does not ({numbers}); the difference is not established.")
        return f"**{self.a.label}** is more accurate than **{self.b.label}** ({numbers})."


def compare(rows: list[Row]) -> list[Comparison]:
    """Every two rows tested on the same reviews, Holm-corrected together."""
    comparisons = []
    for a, b in itertools.combinations(rows, 2):
        reviews_a, reviews_b = a.test_reviews(), b.test_reviews()
        if reviews_a is None or reviews_a != reviews_b:
            continue
        correct_a, correct_b = a.correctness(), b.correctness()
        difference, low, high = stats.paired_bootstrap_difference(correct_a, correct_b)
        p = stats.mcnemar_exact(stats.majority_correct(correct_a), stats.majority_correct(correct_b))
        comparisons.append(Comparison(a, b, difference, low, high, p))
    for comparison, adjusted in zip(comparisons, stats.holm_adjust([c.p for c in comparisons])):
        comparison.p_holm = adjusted
    return comparisons


def comparison_table(comparisons: list[Comparison]) -> str:
    lines = ["| row A | row B | accuracy A − B (points) | paired bootstrap 95% interval | McNemar p | "
             "Holm-adjusted p | significant |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c.a.label} | {c.b.label} | {100 * c.difference:+.2f} | {100 * c.low:+.2f} to "
                     f"{100 * c.high:+.2f} | {c.p:.3g} | {c.p_holm:.3g} | {'yes' if c.significant else 'no'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots

def _figure(title: str, xlabel: str, ylabel: str, size=(8, 4.8)):
    figure = Figure(figsize=size, dpi=120, layout="constrained")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _png(figure: Figure) -> bytes:
    """The figure as PNG bytes, with a legend of whatever it shows (or a note that it shows nothing)."""
    import io

    for axes in figure.axes:
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
        elif not axes.images:
            axes.text(0.5, 0.5, "nothing logged to plot", transform=axes.transAxes, ha="center", color="grey")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _series(run: Run, key: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r[x_key], r[key]) for r in run.history if key in r and x_key in r]
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)


def curve_plot(rows: list[Row], key: str, title: str, ylabel: str, percent: bool = False) -> bytes:
    """A row's mean over its seeds as a line (over the validations all its seeds reached, when early stopping ended
    some sooner); each seed faintly when there are several. Validation at each validation's fractional epoch;
    training per optimizer step, or per epoch of samples seen when rows differ in effective batch (like the
    WandB dashboard), so that runs with fewer, larger steps line up."""
    by_samples = len({row.first.metrics["effective_batch_size"] for row in rows}) > 1
    validation = key.startswith("val/")
    xlabel = "epoch" if validation else "epochs of training samples seen" if by_samples else "optimizer step"
    figure, axes = _figure(title + ("" if validation else "\n(faint: every step or seed)"), xlabel, ylabel)
    for i, row in enumerate(rows):
        color = colormaps["tab10"](i % 10)
        curves = []
        for run in row.runs:
            if validation:
                x, y = _series(run, key, "epoch")
            elif by_samples:
                x, y = _series(run, key, "train/epoch")
                if not len(x):  # runs from before train/epoch was logged: steps x effective batch / train size
                    x, y = _series(run, key, "step")
                    x = x * run.metrics["effective_batch_size"] / max(run.metrics.get("split_sizes", {}).get(
                        "train", run.metrics["effective_batch_size"] * max(x.max(initial=1), 1)), 1)
            else:
                x, y = _series(run, key, "step")
            if len(y):
                curves.append((x, 100 * y if percent else y))
        if not curves:
            continue
        length = min(len(y) for _, y in curves)
        x, mean = curves[0][0][:length], np.mean([y[:length] for _, y in curves], axis=0)
        if validation:
            for cx, cy in curves if len(curves) > 1 else []:
                axes.plot(cx, cy, color=color, alpha=0.25, linewidth=0.8)
            axes.plot(x, mean, marker="o", color=color, label=row.label + (f" (mean of {len(curves)} seeds)"
                                                                            if len(curves) > 1 else ""))
        else:
            window = max(1, length // SMOOTHING)
            axes.plot(x, mean, color=color, alpha=0.2, linewidth=0.8)
            axes.plot(x[window - 1:], np.convolve(mean, np.ones(window) / window, "valid"), color=color,
                      marker="o" if length <= 20 else None,  # a run of a few steps is a few dots, not a line
                      label=row.label + (f" (mean of {window} steps)" if window > 1 else ""))
    if validation:  # whole epochs only, also when there is just one
        epochs = sorted({int(e) for row in rows for run in row.runs for e in _series(run, key, "epoch")[0]}) or [1]
        axes.set_xticks(epochs)
        axes.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    return _png(figure)


def arms(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows that differ only in the effective batch (and how it is made, and the epochs that go with it), keyed by
    what they share apart from that: the lines of the accuracy-against-batch plot."""
    size_keys = {"train.batch_size", "train.grad_accum_steps", "train.effective_batch_size", "train.epochs"}
    groups: dict[str, list[Row]] = {}
    for row in rows:
        flat = {k: v for k, v in _flatten(_configuration(row.first)).items() if k not in size_keys}
        groups.setdefault(json.dumps(flat, sort_keys=True, default=str), []).append(row)
    named = {}
    for members in groups.values():
        first = _flatten(_configuration(members[0].first))
        others = [_flatten(_configuration(r.first)) for group in groups.values() for r in group[:1] if group is not members]
        differing = [k for k in sorted(first) if k not in size_keys and any(str(o.get(k)) != str(first[k]) for o in others)]
        name = ", ".join(f"{Path(str(first[k])).name if k == 'output_dir' else f'{k}={first[k]}'}" for k in differing)
        named[name or "all runs"] = sorted(members, key=lambda r: r.first.metrics["effective_batch_size"])
    return named


def batch_plot(rows: list[Row]) -> bytes:
    figure, axes = _figure("Test accuracy against effective batch (bars: 95% interval)", "effective batch",
                           "test accuracy (%)")
    for i, (name, members) in enumerate(arms(rows).items()):
        x = np.array([r.first.metrics["effective_batch_size"] for r in members], dtype=float)
        y = np.array([100 * r.values["accuracy"][0] for r in members])
        low = np.array([100 * r.values["interval"][0] if r.values["interval"] else np.nan for r in members])
        high = np.array([100 * r.values["interval"][1] if r.values["interval"] else np.nan for r in members])
        shift = 1 + 0.03 * (i - 1)  # arms side by side, so their bars do not hide each other
        axes.errorbar(x * shift, y, yerr=[y - low, high - y], marker="o", capsize=4, label=name,
                      color=colormaps["tab10"](i % 10))
    axes.set_xscale("log", base=2)
    batches = sorted({r.first.metrics["effective_batch_size"] for r in rows})
    axes.set_xticks(batches, [str(b) for b in batches])
    return _png(figure)


def confusion_plot(rows: list[Row]) -> bytes:
    columns = min(3, len(rows))
    lines = math.ceil(len(rows) / columns)
    figure = Figure(figsize=(max(8, 3.4 * columns + 1), max(4.8, 3.0 * lines + 0.6)), dpi=120, layout="constrained")
    figure.suptitle("Confusion matrices on the test reviews (all seeds of a row added)")
    for i, row in enumerate(rows):
        counts = sum(stats.confusion(run.predictions["label"], run.predictions["predicted"]) for run in row.runs)
        axes = figure.add_subplot(lines, columns, i + 1)
        axes.imshow(counts, cmap="Blues")
        for (t, p), count in np.ndenumerate(counts):
            axes.text(p, t, str(count), ha="center", va="center", color="white" if count > counts.max() / 2 else "black")
        axes.set(title=row.label[:40], xticks=[0, 1], yticks=[0, 1], xticklabels=["negative", "positive"],
                 yticklabels=["negative", "positive"], xlabel="predicted", ylabel="true")
    return _png(figure)


def length_edges(rows: list[Row]) -> list[int]:
    """Token-count bins: the usual ones, split also at each row's max_length, where cutting starts."""
    limits = {run.config.get("data", {}).get("max_length") for row in rows for run in row.runs}
    return sorted(set(LENGTH_EDGES) | {limit for limit in limits if isinstance(limit, int)})


def length_plot(rows: list[Row], cells: dict[str, list[dict]], edges: list[int]) -> bytes:
    figure, axes = _figure(f"Test accuracy by review length (dashed: reviews cut to max_length; bins of "
                           f"{MIN_BIN_REVIEWS}+ reviews)", "review length (tokens)", "test accuracy (%)")
    bins = [f"{low}-{high - 1}" for low, high in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    for i, row in enumerate(rows):
        for truncated, style in ((False, "-"), (True, "--")):
            points = [(bins.index(c["bin"]), 100 * c["accuracy"]) for c in cells[row.label]
                      if c["truncated"] == truncated and c["count"] >= MIN_BIN_REVIEWS]
            if points:
                axes.plot(*zip(*points), style, marker="o", color=colormaps["tab10"](i % 10),
                          label=row.label + (" (cut)" if truncated else ""))
    axes.set_xticks(range(len(bins)), bins)
    return _png(figure)


def calibration_plot(rows: list[Row], reliability: dict[str, tuple]) -> bytes:
    figure, axes = _figure("Reliability diagram: accuracy against confidence (diagonal: perfectly calibrated)",
                           "confidence of the predicted label", "accuracy")
    axes.plot([0.5, 1], [0.5, 1], color="grey", linestyle=":")
    for i, row in enumerate(rows):
        ece, bins = reliability[row.label]
        axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                  color=colormaps["tab10"](i % 10), label=f"{row.label} (ECE {ece:.3f})")
    return _png(figure)


# ----------------------------------------------------------------------------------------------- error analysis

def error_analysis(rows: list[Row]) -> tuple[str, dict[str, bytes]]:
    """README sections and PNGs from the per-review predictions of the rows that have them."""
    rows = [row for row in rows if row.correctness() is not None]
    if not rows:
        return "", {}
    pooled = {row.label: {name: np.concatenate([run.predictions[name] for run in row.runs])
                          for name in ("label", "predicted", "prob_positive", "tokens", "truncated")} for row in rows}
    edges = length_edges(rows)
    cells = {label: stats.accuracy_by_length(p["label"] == p["predicted"], p["tokens"], p["truncated"], edges)
             for label, p in pooled.items()}
    reliability = {label: stats.expected_calibration_error(p["prob_positive"], p["label"]) for label, p in pooled.items()}

    text = ["## Error analysis", "",
            "From each run's per-review test predictions (`predictions/test.csv`), the seeds of a row taken together.",
            "", "### Confusion matrices", "",
            "| row | true negative | false positive | false negative | true positive |", "|---|---|---|---|---|"]
    for row in rows:
        (tn, fp), (fn, tp) = stats.confusion(pooled[row.label]["label"], pooled[row.label]["predicted"])
        text.append(f"| {row.label} | {tn} | {fp} | {fn} | {tp} |")
    text += ["", "![confusion matrices](confusion.png)", "", "### Accuracy by review length", "",
             "Length is the review's full length in tokens; \"cut\" reviews were longer than max_length, so the model "
             "saw only part of them (data.truncation says which part).", "",
             "| row | length (tokens) | cut | reviews | accuracy |", "|---|---|---|---|---|"]
    for row in rows:
        text += [f"| {row.label} | {c['bin']} | {'yes' if c['truncated'] else 'no'} | {c['count']} | "
                 f"{c['accuracy']:.4f} |" for c in cells[row.label]]
    text += ["", "![accuracy by length](accuracy_by_length.png)", "", "### Calibration", "",
             "Expected calibration error (ECE): the gap between confidence and accuracy, averaged over 10 confidence "
             "bins weighted by their reviews (0 is perfectly calibrated).", "", "| row | ECE |", "|---|---|"]
    text += [f"| {row.label} | {reliability[row.label][0]:.4f} |" for row in rows]
    text += ["", "![reliability diagram](calibration.png)", "", "### Most confident mistakes", ""]
    for row in rows:
        mistakes = {}
        for run in row.runs:
            p = run.predictions
            for i in np.flatnonzero(p["label"] != p["predicted"]):
                confidence = max(p["prob_positive"][i], 1 - p["prob_positive"][i])
                if confidence > mistakes.get(p["index"][i], (0,))[0]:
                    mistakes[p["index"][i]] = (confidence, p["label"][i], p["prob_positive"][i], p["text"][i])
        top = sorted(mistakes.items(), key=lambda item: -item[1][0])[:10]
        text += [f"**{row.label}** (the 10 test reviews it got wrong most confidently):", "",
                 "| review | label | P(positive) | beginning of the review |", "|---|---|---|---|"]
        text += [f"| {index} | {'positive' if label else 'negative'} | {positive:.3f} | "
                 f"{' '.join(str(review).split()).replace('|', '/')[:200]} |"
                 for index, (_, label, positive, review) in top]
        text.append("")
    pngs = {"confusion.png": confusion_plot(rows), "accuracy_by_length.png": length_plot(rows, cells, edges),
            "calibration.png": calibration_plot(rows, reliability)}
    return "\n".join(text) + "\n", pngs


# ----------------------------------------------------------------------------------------------- writing

def experiment_files(experiment: str, runs: list[Run]) -> dict[str, bytes]:
    """Everything OUT/<experiment>/ holds, made in memory first."""
    rows = group_rows(runs)
    comparisons = compare(rows)
    files = {"val_loss.png": curve_plot(rows, "val/loss", f"{experiment}: validation loss at each validation",
                                        "cross-entropy loss (nats)"),
             "val_accuracy.png": curve_plot(rows, "val/accuracy", f"{experiment}: validation accuracy at each validation",
                                            "accuracy (%)", percent=True),
             "train_loss.png": curve_plot(rows, "train/loss", f"{experiment}: training loss",
                                          "cross-entropy loss (nats)")}
    multi_batch = len({row.first.metrics["effective_batch_size"] for row in rows}) > 1
    if multi_batch:
        files["accuracy_by_batch.png"] = batch_plot(rows)
    sources = ", ".join(f"`{_relative(run.path)}`" for run in runs)
    text = [f"# {experiment} results", "",
            f"Generated by `exp_1/results.py` on {time.strftime('%Y-%m-%d')} from {len(runs)} finished run(s) in "
            f"{len(rows)} row(s): {sources}. Do not edit by hand.", "",
            "Test metrics are those of each run's best epoch on its held-out test split. Runs that differ only in the "
            "training seed form one row: mean ± standard deviation over seeds, and a 95% interval for the accuracy "
            "(Student's t over the seeds; for a single run, a percentile bootstrap over the test reviews, 10,000 "
            "resamples). Wall time is each run's last session.", "", row_table(rows), ""]
    if comparisons:
        text += ["## Comparisons", "",
                 f"{len(comparisons)} comparison(s): every two rows tested on the same reviews. The interval is a paired "
                 "bootstrap over test reviews (10,000 resamples; rows with several seeds also resample seeds). The test "
                 "is an exact McNemar test on per-review correctness (a review counts as right for a row when most of "
                 "its seeds got it right), with Holm's correction for the number of comparisons. A difference is "
                 f"called significant only when the interval excludes 0 and the corrected p is below {SIGNIFICANCE}.",
                 "", comparison_table(comparisons), "", "What these numbers support:", ""]
        text += [f"- {c.sentence(len(comparisons))}" for c in comparisons]
        text.append("")
    untested = [row.label for row in rows if row.test_reviews() is None]
    if untested:
        text += [f"Not compared (no predictions file, or seeds on different test reviews): {', '.join(untested)}.", ""]
    text += ["## Learning curves", "", "| validation accuracy | validation loss | training loss |", "|---|---|---|",
             "| ![](val_accuracy.png) | ![](val_loss.png) | ![](train_loss.png) |", ""]
    if multi_batch:
        text += ["![test accuracy against effective batch](accuracy_by_batch.png)", ""]
    analysis, pngs = error_analysis(rows)
    files.update(pngs)
    text.append(analysis)
    files["README.md"] = "\n".join(text).encode()
    return files


def write_results(runs: list[Run], out: Path) -> list[Path]:
    """OUT/<experiment>/ for each experiment among the runs, each replaced as a whole: its files are written into a
    temporary folder first, so a failure leaves the previous results as they were."""
    written = []
    for experiment in sorted({run.experiment for run in runs}):
        files = experiment_files(experiment, [run for run in runs if run.experiment == experiment])
        folder, tmp, old = out / experiment, out / f".{experiment}.tmp", out / f".{experiment}.old"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot write {folder}: {err.strerror or err}; the previous results are kept"
                            + (f" in {old}" if old.exists() and not folder.exists() else "")) from None
        written += [folder / name for name in files]
    return written


def _relative(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(PROJECT) if path.is_relative_to(PROJECT) else path


def main(argv=None) -> list[Path]:
    p = CliParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", type=Path, default=[Path("runs")],
                   help="run directories, or folders holding them (default: runs)")
    p.add_argument("--out", type=Path, default=Path("training_results"), help="default: training_results/")
    args = p.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        raise UserError(f"no finished runs (with metrics.json) in {', '.join(map(str, args.paths))}")
    written = write_results(runs, args.out)
    print(f"{len(runs)} run(s) -> {', '.join(sorted({str(_relative(f.parent)) for f in written}))}")
    return written


def cli() -> None:
    """The console command (pyproject.toml)."""
    run_cli(main)


if __name__ == "__main__":
    cli()

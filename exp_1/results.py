"""Plots and tables of finished runs, generated from their run directories, so they cannot disagree with the runs.

    python exp_1/results.py                            # every finished run in runs/
    python exp_1/results.py runs/exp2_eb64 runs/exp2_eb256 --out training_results

Runs are grouped by experiment (the folder of the script that trained them: exp_1 or exp_2). Each experiment gets
OUT/<experiment>/: README.md (a table of test metrics, the plots below it), val_loss.png, val_accuracy.png and
train_loss.png, with one line per run. Other experiments' files in OUT are left as they are.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from exp_1.cli import CliParser, run_cli
from exp_1.config import UserError
from exp_1.rundir import write_file

PROJECT = Path(__file__).resolve().parents[1]
METRICS = ["script", "model", "effective_batch_size", "epochs", "optimizer_steps", "lr", "test_loss", "test_accuracy", "test_f1",
           "wall_seconds", "train_samples_per_s", "device", "precision", "num_processes"]  # what results use
COLUMNS = ["run", "model", "effective batch", "epochs", "optimizer steps", "lr", "test loss", "test accuracy",
           "test F1", "wall time", "train samples/s", "device"]
SMOOTHING = 25  # a train-loss curve is a moving average over 1/25 of its run's steps
PLOTS = [  # file, history key, title, x label, y label
    ("val_loss.png", "val/loss", "Validation loss after each epoch", "epoch", "cross-entropy loss (nats)"),
    ("val_accuracy.png", "val/accuracy", "Validation accuracy after each epoch", "epoch", "accuracy (%)"),
    ("train_loss.png", "train/loss", "Training loss per optimizer step", "optimizer step", "cross-entropy loss (nats)"),
]


@dataclass
class Run:
    path: Path
    metrics: dict  # metrics.json
    history: list[dict]  # history.jsonl

    @property
    def experiment(self) -> str:
        return Path(self.metrics["script"]).parts[0]  # exp_1 or exp_2

    @property
    def label(self) -> str:
        model = self.metrics["model"].rstrip("/").split("/")[-1]
        return f"{model}, effective batch {self.metrics['effective_batch_size']}"

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of a logged value: per epoch for val/*, per optimizer step for train/*."""
        x_key = "epoch" if key.startswith("val/") else "step"
        points = [(r[x_key], r[key]) for r in self.history if key in r]
        return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def find_runs(paths: list[Path]) -> list[Run]:
    """Finished runs (with metrics.json): each path that is a run directory, and those directly in each other path."""
    runs = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: no such folder; pass run directories or folders of them (default: runs)")
        if (path / "config.yaml").is_file() and not (path / "metrics.json").is_file():
            print(f"skipped {path}: not finished (no metrics.json)")
        folders = [path] if (path / "config.yaml").is_file() else sorted(p for p in path.iterdir() if p.is_dir())
        runs += [read_run(folder) for folder in folders if (folder / "metrics.json").is_file()]
    return runs


def read_run(folder: Path) -> Run:
    files = {name: folder / name for name in ("metrics.json", "history.jsonl")}
    try:
        history = [json.loads(line) for line in files["history.jsonl"].read_text().splitlines() if line]
        metrics = json.loads(files["metrics.json"].read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{folder}: cannot read its run files ({type(err).__name__}: {err})") from None
    missing = [key for key in METRICS if key not in metrics]
    if missing:
        raise UserError(f"{files['metrics.json']} lacks {', '.join(missing)}; was it written by this project?")
    return Run(folder, metrics, history)


def table(runs: list[Run]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for run in runs:
        m = run.metrics
        cells = [run.path.name, m["model"], m["effective_batch_size"], m["epochs"], m["optimizer_steps"],
                 f"{m['lr']:.3g}", f"{m['test_loss']:.4f}", f"{m['test_accuracy']:.4f}", f"{m['test_f1']:.4f}",
                 f"{m['wall_seconds'] / 60:.1f} min", f"{m['train_samples_per_s']:.1f}",
                 f"{m['device']} {m['precision']}" + (f" x{m['num_processes']}" if m["num_processes"] > 1 else "")]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)


def plot(runs: list[Run], key: str, title: str, xlabel: str, ylabel: str, path: Path, percent: bool = False) -> None:
    figure = Figure(figsize=(8, 4.8), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    labels = [run.label for run in runs]
    for i, (run, label) in enumerate(zip(runs, labels)):
        color = colormaps["tab10"](i % 10)
        if labels.count(label) > 1:
            label += f" ({run.path.name})"
        x, y = run.series(key)
        if not len(y):
            continue
        y = 100 * y if percent else y
        if key.startswith("val/"):
            axes.plot(x, y, marker="o", color=color, label=label)
        else:  # per-step losses are noisy: the raw values faintly, a moving average over them
            window = max(1, len(y) // SMOOTHING)
            axes.plot(x, y, color=color, alpha=0.2, linewidth=0.8)
            axes.plot(x[window - 1:], np.convolve(y, np.ones(window) / window, "valid"), color=color,
                      label=label + (f" (mean of {window} steps)" if window > 1 else ""))
    if key.startswith("val/"):  # whole epochs only, also when there is just one
        epochs = sorted({int(e) for run in runs for e in run.series(key)[0]})
        axes.set_xticks(epochs)
        axes.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    else:
        title += "\n(faint: every step)"
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)


def write_results(runs: list[Run], out: Path) -> list[Path]:
    """OUT/<experiment>/ for each experiment among the runs; returns the files written."""
    written = []
    for experiment in sorted({run.experiment for run in runs}):
        group = [run for run in runs if run.experiment == experiment]
        folder = out / experiment
        folder.mkdir(parents=True, exist_ok=True)
        for name, key, title, xlabel, ylabel in PLOTS:
            plot(group, key, f"{experiment}: {title}", xlabel, ylabel, folder / name, percent="accuracy" in key)
            written.append(folder / name)
        sources = ", ".join(f"`{_relative(run.path)}`" for run in group)
        readme = (f"# {experiment} results\n\nGenerated by `exp_1/results.py` on {time.strftime('%Y-%m-%d')} from "
                  f"{len(group)} finished run(s): {sources}. Do not edit by hand. Test metrics are those of each "
                  "run's best epoch on its held-out test split; wall time is the run's last session.\n\n"
                  f"{table(group)}\n\n" + "".join(f"![{title}]({name})\n\n" for name, _, title, _, _ in PLOTS))
        write_file(folder / "README.md", readme)
        written.append(folder / "README.md")
    return written


def _relative(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(PROJECT) if path.is_relative_to(PROJECT) else path


def main(argv=None) -> list[Path]:
    p = CliParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", type=Path, default=[Path("runs")],
                   help="run directories, or folders holding them (default: runs)")
    p.add_argument("--out", type=Path, default=PROJECT / "training_results", help="default: training_results/")
    args = p.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        raise UserError(f"no finished runs (with metrics.json) in {', '.join(map(str, args.paths))}")
    written = write_results(runs, args.out)
    print(f"{len(runs)} run(s) -> {', '.join(sorted({str(_relative(f.parent)) for f in written}))}")
    return written


if __name__ == "__main__":
    run_cli(main)

"""Plots and tables of finished runs, generated from their run directories, so they cannot disagree with the runs.

    python exp_1/results.py                            # every finished run under runs/
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

from exp_1.config import CliParser, UserError
from exp_1.utils import run_cli, write_atomic

PROJECT = Path(__file__).resolve().parents[1]
COLUMNS = ["run", "model", "effective batch", "epochs", "lr", "test loss", "test accuracy", "test F1", "wall time",
           "train samples/s", "device"]


@dataclass
class Run:
    path: Path
    metrics: dict  # metrics.json
    history: list[dict]  # history.jsonl

    @property
    def experiment(self) -> str:
        return Path(self.metrics.get("script", "other/")).parts[0]

    @property
    def label(self) -> str:
        return f"{self.metrics['model'].rstrip('/').split('/')[-1]}, effective batch {self.metrics['effective_batch_size']}"

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of a logged value: per epoch for val/*, per optimizer step for train/*."""
        x_key = "epoch" if key.startswith("val/") else "step"
        points = [(r[x_key], r[key]) for r in self.history if key in r]
        return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def find_runs(paths: list[Path]) -> list[Run]:
    """Finished runs (with metrics.json) at or directly under each path, in name order."""
    runs = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: no such folder; pass run directories or folders of them (default: runs)")
        folders = [path] if (path / "config.yaml").is_file() else sorted(p for p in path.iterdir() if p.is_dir())
        for folder in folders:
            if (folder / "metrics.json").is_file():
                history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines() if line]
                runs.append(Run(folder, json.loads((folder / "metrics.json").read_text()), history))
    return runs


def table(runs: list[Run]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for run in runs:
        m = run.metrics
        cells = [run.path.name, m["model"], m["effective_batch_size"], m["epochs"], f"{m['lr']:.3g}",
                 f"{m['test_loss']:.4f}", f"{m['test_accuracy']:.4f}", f"{m['test_f1']:.4f}",
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
            axes.plot(x[window - 1:], np.convolve(y, np.ones(window) / window, "valid"), color=color, label=label)
    if key.startswith("val/"):  # whole epochs only, also when there is just one
        epochs = sorted({int(e) for run in runs for e in run.series(key)[0]})
        axes.set_xticks(epochs)
        axes.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    else:
        title += f"\n(lines: moving average over 1/{SMOOTHING} of each run's steps; faint: every step)"
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)


SMOOTHING = 25  # a train-loss curve averages over 1/25 of its run's steps
PLOTS = [  # file, history key, title, x label, y label
    ("val_loss.png", "val/loss", "Validation loss after each epoch", "epoch", "cross-entropy loss (nats)"),
    ("val_accuracy.png", "val/accuracy", "Validation accuracy after each epoch", "epoch", "accuracy (%)"),
    ("train_loss.png", "train/loss", "Training loss per optimizer step", "optimizer step", "cross-entropy loss (nats)"),
]


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
        sources = " ".join(str(_relative(run.path)) for run in group)
        readme = (f"# {experiment} results\n\nGenerated on {time.strftime('%Y-%m-%d')} from {len(group)} finished "
                  f"run(s) by `python exp_1/results.py {sources}`; do not edit by hand. Test metrics are those of "
                  "each run's best epoch on its held-out test split; wall time is the run's last session.\n\n"
                  f"{table(group)}\n\n" + "".join(f"![{title}]({name})\n\n" for name, _, title, _, _ in PLOTS))
        write_atomic(folder / "README.md", readme)
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
    print(f"{len(runs)} run(s) -> {', '.join(str(_relative(f.parent)) for f in written[::len(PLOTS) + 1])}")
    return written


if __name__ == "__main__":
    run_cli(main)

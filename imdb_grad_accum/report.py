"""The pictures and the error analysis of a results README: learning curves, accuracy against the effective batch,
and from the per-review predictions confusion matrices, accuracy by review length and truncation, calibration and
the most confident mistakes. Everything is made in memory (PNG bytes and Markdown) from comparisons.Row objects."""

import io
import json
import math

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from imdb_grad_accum import stats
from imdb_grad_accum.config import trained_config
from imdb_grad_accum.rundir import LABELS

LENGTH_EDGES = [0, 128, 256, 512, 1024]  # token-count bins of the accuracy-by-length analysis (plus each max_length)
MIN_BIN_REVIEWS = 10  # the length plot leaves out bins with fewer reviews (the table has them all)
SMOOTHING = 25  # a train-loss curve is a moving average over 1/25 of its steps
SIZE_KEYS = {"train.batch_size", "train.grad_accum_steps", "train.effective_batch_size", "train.epochs"}


def _figure(title: str, xlabel: str, ylabel: str):
    figure = Figure(figsize=(8, 4.8), dpi=120, layout="tight")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _png(figure: Figure) -> bytes:
    """The figure as PNG bytes, with a legend of whatever it shows (or a note that it shows nothing)."""
    for axes in figure.axes:
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
        elif not axes.images:
            axes.text(0.5, 0.5, "nothing logged to plot", transform=axes.transAxes, ha="center", color="grey")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _color(i: int):
    return colormaps["tab10"](i % 10)


def _series(run, key: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r[x_key], r[key]) for r in run.history if key in r and x_key in r]
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)


def curve_plot(rows: list, key: str, title: str, ylabel: str, percent: bool = False) -> bytes:
    """A row's mean over its seeds (over the validations all of them reached), each seed faintly. Training is plotted
    per epoch of samples seen when rows differ in effective batch, so that runs with fewer, larger steps line up."""
    by_samples = len({row.runs[0].metrics["effective_batch_size"] for row in rows}) > 1
    validation = key.startswith("val/")
    x_key = "epoch" if validation else "train/epoch" if by_samples else "step"
    xlabel = "epoch" if validation else "epochs of training samples seen" if by_samples else "optimizer step"
    figure, axes = _figure(title + ("" if validation else "\n(faint: every step or seed)"), xlabel, ylabel)
    for i, row in enumerate(rows):
        curves = [(x, 100 * y if percent else y) for x, y in (_series(run, key, x_key) for run in row.runs) if len(y)]
        if not curves:
            continue
        length = min(len(y) for _, y in curves)
        x, mean = curves[0][0][:length], np.mean([y[:length] for _, y in curves], axis=0)
        if validation:
            for cx, cy in curves if len(curves) > 1 else []:
                axes.plot(cx, cy, color=_color(i), alpha=0.25, linewidth=0.8)
            axes.plot(x, mean, marker="o", color=_color(i),
                      label=row.name + (f" (mean of {len(curves)} seeds)" if len(curves) > 1 else ""))
        else:
            window = max(1, length // SMOOTHING)
            axes.plot(x, mean, color=_color(i), alpha=0.2, linewidth=0.8)
            axes.plot(x[window - 1:], np.convolve(mean, np.ones(window) / window, "valid"), color=_color(i),
                      marker="o" if length <= 20 else None,  # a run of a few steps is a few dots, not a line
                      label=row.name + (f" (mean of {window} steps)" if window > 1 else ""))
    if validation:  # whole epochs only, also when there is just one
        epochs = sorted({int(e) for row in rows for run in row.runs for e in _series(run, key, "epoch")[0]}) or [1]
        axes.set_xticks(epochs)
        axes.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    return _png(figure)


def arms(rows: list) -> dict[str, list]:
    """The lines of the accuracy-against-batch plot: a study's arms by the folders its runs are in (a row in two
    arms is on both lines), else rows that differ only in the effective batch (and the epochs that go with it)."""
    folders = {label.split("/")[0] for row in rows for label in row.labels if "/" in label}
    if len(folders) > 1:
        return {folder: [row for row in rows if any(label.startswith(folder + "/") for label in row.labels)]
                for folder in sorted(folders)}
    groups: dict[str, list] = {}
    for row in rows:
        shared = {k: v for k, v in trained_config(row.runs[0].config).items() if k not in SIZE_KEYS | {"seed"}}
        groups.setdefault(json.dumps(shared, sort_keys=True, default=str), []).append(row)
    return {", ".join(r.name for r in members) if len(groups) > 1 else "all runs": members
            for members in groups.values()}


def batch_plot(rows: list) -> bytes:
    figure, axes = _figure("Test accuracy against effective batch (bars: 95% interval)", "effective batch",
                           "test accuracy (%)")
    for i, (name, members) in enumerate(arms(rows).items()):
        members = sorted(members, key=lambda r: r.runs[0].metrics["effective_batch_size"])
        x = np.array([r.runs[0].metrics["effective_batch_size"] for r in members], dtype=float)
        y = np.array([100 * r.values["accuracy"][0] for r in members])
        low, high = (np.array([100 * r.values["interval"][j] for r in members]) for j in (0, 1))
        shift = 1 + 0.03 * (i - 1)  # arms side by side, so their bars do not hide each other
        axes.errorbar(x * shift, y, yerr=[y - low, high - y], marker="o", capsize=4, label=name, color=_color(i))
    axes.set_xscale("log", base=2)
    batches = sorted({r.runs[0].metrics["effective_batch_size"] for r in rows})
    axes.set_xticks(batches, [str(b) for b in batches])
    return _png(figure)


def learning_curves(experiment: str, rows: list) -> tuple[list[str], dict[str, bytes]]:
    """The README's learning-curve section and its PNGs."""
    loss = "cross-entropy loss (nats)"
    files = {"val_loss.png": curve_plot(rows, "val/loss", f"{experiment}: validation loss at each validation", loss),
             "val_accuracy.png": curve_plot(rows, "val/accuracy", f"{experiment}: validation accuracy at each "
                                            "validation", "accuracy (%)", percent=True),
             "train_loss.png": curve_plot(rows, "train/loss", f"{experiment}: training loss", loss)}
    text = ["## Learning curves", "", "| validation accuracy | validation loss | training loss |", "|---|---|---|",
            "| ![](val_accuracy.png) | ![](val_loss.png) | ![](train_loss.png) |", ""]
    if len({row.runs[0].metrics["effective_batch_size"] for row in rows}) > 1:
        files["accuracy_by_batch.png"] = batch_plot(rows)
        text += ["![test accuracy against effective batch](accuracy_by_batch.png)", ""]
    return text, files


def confusion_plot(rows: list, confusions: dict) -> bytes:
    columns = min(3, len(rows))
    lines = math.ceil(len(rows) / columns)
    figure = Figure(figsize=(max(8, 3.4 * columns + 1), max(4.8, 3.0 * lines + 0.6)), dpi=120, layout="tight")
    figure.suptitle("Confusion matrices on the test reviews (all seeds of a row added)")
    for i, row in enumerate(rows):
        counts = confusions[row.name]
        axes = figure.add_subplot(lines, columns, i + 1)
        axes.imshow(counts, cmap="Blues")
        for (t, p), count in np.ndenumerate(counts):
            color = "white" if count > counts.max() / 2 else "black"
            axes.text(p, t, str(count), ha="center", va="center", color=color)
        axes.set(title=row.name[:40], xticks=[0, 1], yticks=[0, 1], xticklabels=LABELS, yticklabels=LABELS,
                 xlabel="predicted", ylabel="true")
    return _png(figure)


def length_plot(rows: list, cells: dict, edges: list[int]) -> bytes:
    figure, axes = _figure(f"Test accuracy by review length (dashed: reviews cut to max_length; bins of "
                           f"{MIN_BIN_REVIEWS}+ reviews)", "review length (tokens)", "test accuracy (%)")
    bins = [f"{low}-{high - 1}" for low, high in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    for i, row in enumerate(rows):
        for truncated, style in ((False, "-"), (True, "--")):
            points = [(bins.index(c["bin"]), 100 * c["accuracy"]) for c in cells[row.name]
                      if c["truncated"] == truncated and c["count"] >= MIN_BIN_REVIEWS]
            if points:
                axes.plot(*zip(*points), style, marker="o", color=_color(i),
                          label=row.name + (" (cut)" if truncated else ""))
    axes.set_xticks(range(len(bins)), bins)
    return _png(figure)


def calibration_plot(rows: list, reliability: dict) -> bytes:
    figure, axes = _figure("Reliability diagram: accuracy against confidence (diagonal: perfectly calibrated)",
                           "confidence of the predicted label", "accuracy")
    axes.plot([0.5, 1], [0.5, 1], color="grey", linestyle=":")
    for i, row in enumerate(rows):
        ece, bins = reliability[row.name]
        axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=_color(i),
                  label=f"{row.name} (ECE {ece:.3f})")
    return _png(figure)


def error_analysis(rows: list, what: str = "test") -> tuple[str, dict[str, bytes]]:
    """README sections and PNGs from the rows' per-review predictions (`what`: which reviews they are)."""
    pooled = {row.name: {name: np.concatenate([run.predictions[name] for run in row.runs])
                         for name in ("label", "predicted", "prob_positive", "tokens", "truncated")} for row in rows}
    limits = {run.config.get("data", {}).get("max_length") for row in rows for run in row.runs}
    edges = sorted(set(LENGTH_EDGES) | {limit for limit in limits if isinstance(limit, int)})
    cells = {label: stats.accuracy_by_length(p["label"] == p["predicted"], p["tokens"], p["truncated"], edges)
             for label, p in pooled.items()}
    reliability = {label: stats.expected_calibration_error(p["prob_positive"], p["label"])
                   for label, p in pooled.items()}
    confusions = {label: stats.confusion(p["label"], p["predicted"]) for label, p in pooled.items()}
    text = ["## Error analysis", "",
            f"From each run's per-review {what} predictions (`predictions.csv`), the seeds of a row taken together.",
            "", "### Confusion matrices", "",
            "| row | true negative | false positive | false negative | true positive |", "|---|---|---|---|---|"]
    text += [f"| {name} | {tn} | {fp} | {fn} | {tp} |" for name, ((tn, fp), (fn, tp)) in confusions.items()]
    text += ["", "![confusion matrices](confusion.png)", "", "### Accuracy by review length", "",
             "Length is the review's full length in tokens; \"cut\" reviews were longer than max_length, so the model "
             "saw only part of them (data.truncation says which part).", "",
             "| row | length (tokens) | cut | reviews | accuracy |", "|---|---|---|---|---|"]
    for row in rows:
        text += [f"| {row.name} | {c['bin']} | {'yes' if c['truncated'] else 'no'} | {c['count']} | "
                 f"{c['accuracy']:.4f} |" for c in cells[row.name]]
    text += ["", "![accuracy by length](accuracy_by_length.png)", "", "### Calibration", "",
             "Expected calibration error (ECE): the gap between confidence and accuracy, averaged over 10 confidence "
             "bins weighted by their reviews (0 is perfectly calibrated).", "", "| row | ECE |", "|---|---|"]
    text += [f"| {row.name} | {reliability[row.name][0]:.4f} |" for row in rows]
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
        text += [f"**{row.name}** (the 10 {what} reviews it got wrong most confidently):", "",
                 "| review | label | P(positive) | beginning of the review |", "|---|---|---|---|"]
        text += [f"| {index} | {LABELS[label]} | {positive:.3f} | "
                 f"{' '.join(str(review).split()).replace('|', '/')[:200]} |"
                 for index, (_, label, positive, review) in top]
        text.append("")
    return "\n".join(text) + "\n", {"confusion.png": confusion_plot(rows, confusions),
                                    "accuracy_by_length.png": length_plot(rows, cells, edges),
                                    "calibration.png": calibration_plot(rows, reliability)}

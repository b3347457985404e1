"""Tables, comparisons and plots of finished runs, generated from their run directories, so they cannot disagree
with the runs.

    imdb-results runs/quickstart                          # its table, interval and error analysis: runs/results/
    imdb-results runs/study/* --baseline "eb64, 1 epoch"   # every row against one
    imdb-results runs/study/* --comparisons configs/studies/exp2_comparisons.yaml --out training_results/cpu_study

Runs are grouped by experiment (exp_1, exp_2), and within it into rows: runs whose configs differ only in the seed
and in what does not change training (name, output_dir, tracking, ...) are one row, reported as mean ± standard
deviation with a 95% interval (Student's t over seeds; a bootstrap over test reviews for a single run). A row is
named by what varies between the rows (`eb256, 4 epochs`). Comparisons are the planned ones (--baseline, --compare,
or a --comparisons file), or every pair when there are two or three rows: the accuracy difference with a paired
bootstrap interval and an exact McNemar test on per-review correctness, Holm-corrected for the comparisons made. Two
rows are compared only when their test reviews are provably the same (each run records a checksum of its test
reviews' texts and labels). The sentences under the tables are generated from those numbers and never rank rows
whose difference is not significant.

Each experiment gets OUT/<experiment>/ (by default beside the runs: <their folder>/results): README.md, the learning
curves, and an error analysis from the runs' per-review predictions.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imdb_grad_accum import comparisons, stats
from imdb_grad_accum.cli import command_parser, run_cli
from imdb_grad_accum.comparisons import Row, comparison_section, planned_pairs
from imdb_grad_accum.config import PROJECT_ROOT, trained_config
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.files import write_folder
from imdb_grad_accum.rundir import MARKER, RunDir, refuse_inside_a_run

RESULT_FILES = {"README.md", "val_loss.png", "val_accuracy.png", "train_loss.png", "accuracy_by_batch.png",
                "confusion.png", "accuracy_by_length.png", "calibration.png"}


@dataclass
class FinishedRun:
    path: Path
    metrics: dict  # metrics.json
    history: list[dict]  # history.jsonl
    config: dict  # config.yaml
    predictions: dict  # predictions/test.csv as arrays, by review index

    @classmethod
    def read(cls, path: Path) -> "FinishedRun":
        run = RunDir(path)
        metrics = run.metrics()
        run.verified_best()
        predictions = run.predictions("test")
        n = len(predictions["label"])
        accuracy = int((predictions["label"] == predictions["predicted"]).sum()) / n
        if n != metrics["n_test"] or accuracy != metrics["test_accuracy"]:
            raise UserError(f"{path / 'predictions' / 'test.csv'} does not reproduce metrics.json ({n} reviews, "
                            f"accuracy {accuracy:.4f}; metrics.json: {metrics['n_test']} and "
                            f"{metrics['test_accuracy']:.4f}): it is damaged or another run's")
        return cls(path, metrics, run.history(), run.saved_config(), predictions)

    def label(self, with_folder: bool) -> str:
        """The run's name without the _seed<N> a sweep adds; with its folder, which names an arm of a study."""
        head, sep, seed = self.path.name.rpartition("_seed")
        name = head if sep and seed.isdigit() else self.path.name
        return f"{self.path.parent.name}/{name}" if with_folder else name


def find_runs(paths: list[Path]) -> list[FinishedRun]:
    """Finished runs: each path that is a run directory, and those directly in each other path."""
    runs, seen = [], set()
    for path in paths:
        if path.is_file() or not path.is_dir():
            raise UserError(f"{path}: {'a file' if path.is_file() else 'no such folder'}; pass run directories or "
                            "folders of them (default: runs)")
        is_run = any((path / name).is_file() for name in (MARKER, "config.yaml", "metrics.json"))
        if is_run and not RunDir(path).is_run():
            raise UserError(f"{path} is not a run directory of this project (no valid {MARKER}), so its files are not "
                            "taken for results")
        if is_run and not RunDir(path).is_finished():
            print(f"skipped {path}: not finished (no metrics.json)")
        for folder in [path] if is_run else sorted(p for p in path.iterdir() if p.is_dir()):
            if RunDir(folder).is_finished() and folder.resolve() not in seen:  # a run named twice counts once
                seen.add(folder.resolve())
                runs.append(FinishedRun.read(folder))
            elif (folder / "metrics.json").is_file() and not RunDir(folder).is_run():
                print(f"skipped {folder}: not a run directory of this project (no valid {MARKER})")
    return runs


def group_rows(runs: list[FinishedRun]) -> list[Row]:
    """Runs with the same trained configuration apart from the seed are one row. Two runs of one configuration and
    seed are the same run trained twice (a study listing it in two arms): it counts once, under every label."""
    groups: dict[str, list[FinishedRun]] = {}
    for run in runs:
        key = {k: v for k, v in trained_config(run.config).items() if k != "seed"}
        groups.setdefault(json.dumps([key, run.metrics["trainer"], run.metrics["num_processes"]], sort_keys=True,
                                     default=str), []).append(run)
    rows, folders = [], len({run.path.parent.resolve() for run in runs}) > 1
    for members in groups.values():
        by_seed = {}
        for run in sorted(members, key=lambda r: (r.metrics["seed"], str(r.path))):
            by_seed.setdefault(run.metrics["seed"], run)
        kept = list(by_seed.values())
        correct = np.stack([r.predictions["label"] == r.predictions["predicted"] for r in kept]).astype(float)
        same = len({(r.metrics["test_sha256"], tuple(r.predictions["index"])) for r in kept}) == 1
        labels = sorted({r.label(folders) for r in members})
        rows.append(Row(kept, correct, kept[0].metrics["test_sha256"] if same else None, labels))
    name_rows(rows)
    for row in rows:
        row.values = row_values(row)
    return sorted(rows, key=lambda row: (row.runs[0].metrics["effective_batch_size"], row.name))


def name_rows(rows: list[Row]) -> None:
    """Each row is named by what varies between the rows (`eb256, 4 epochs`); a lone row by its runs' label."""
    described = [{k: v for k, v in trained_config(r.runs[0].config).items() if k != "seed"} for r in rows]
    varying = sorted(k for k in set().union(*described)
                     if len({json.dumps(d.get(k), default=str) for d in described}) > 1)
    leaves = [k.rsplit(".", 1)[-1] for k in varying]
    for row, values in zip(rows, described):
        parts = [_describe(k if leaves.count(k.rsplit(".", 1)[-1]) > 1 else k.rsplit(".", 1)[-1], values.get(k))
                 for k in varying if values.get(k) not in (None, "none")]  # what is off goes unnamed
        row.name = ", ".join(parts) or (row.labels[0] if len(rows) == 1 or not varying else "defaults")
    for name in {row.name for row in rows if sum(r.name == row.name for r in rows) > 1}:  # two rows, one name
        for row in (r for r in rows if r.name == name):
            row.name += f" ({row.labels[0]})"


def _describe(key: str, value) -> str:
    if key == "effective_batch_size":
        return f"eb{value}"
    if key == "epochs":
        return f"{value} epoch{'s' if value != 1 else ''}"
    if key == "name" or key.endswith("model.name"):
        return Path(str(value)).name
    return f"{key}={value}"


def row_values(row: Row) -> dict:
    """Mean, standard deviation and 95% interval of the test metrics over the row's seeds."""
    def spread(key: str) -> tuple[float, float | None]:
        values = [run.metrics[key] for run in row.runs]
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None

    seeds = len(row.runs)
    if seeds > 1:
        interval, basis = stats.seed_interval([r.metrics["test_accuracy"] for r in row.runs]), f"t over {seeds} seeds"
    else:
        interval, basis = stats.bootstrap_interval(row.correct[0]), f"bootstrap over {row.correct.shape[1]} reviews"
    return {"accuracy": spread("test_accuracy"), "loss": spread("test_loss"), "f1": spread("test_f1"),
            "interval": interval, "basis": basis, "seeds": seeds}


def mean_sd(value: tuple[float, float | None]) -> str:
    mean, sd = value
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def row_table(rows: list[Row]) -> str:
    columns = ["row", "runs", "seeds", "model", "effective batch", "epochs", "optimizer steps", "lr", "test accuracy",
               "95% interval", "interval from", "test loss", "test F1", "wall time", "train samples/s", "device"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        m, v = row.runs[0].metrics, row.values
        mean = {key: float(np.mean([run.metrics[key] for run in row.runs]))
                for key in ("optimizer_steps", "wall_seconds", "train_samples_per_s")}
        cells = [row.name, ", ".join(row.labels), v["seeds"], m["model"], m["effective_batch_size"], m["epochs"],
                 round(mean["optimizer_steps"]), f"{m['lr']:.3g}", mean_sd(v["accuracy"]),
                 f"{v['interval'][0]:.4f} – {v['interval'][1]:.4f}", v["basis"], mean_sd(v["loss"]), mean_sd(v["f1"]),
                 f"{mean['wall_seconds'] / 60:.1f} min", f"{mean['train_samples_per_s']:.1f}",
                 f"{m['device']} {m['precision']}" + (f" x{m['num_processes']}" if m["num_processes"] > 1 else "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def experiment_files(experiment: str, runs: list[FinishedRun], baseline: str | None, pairs: list[str]) -> dict:
    """Everything OUT/<experiment>/ holds, made in memory first."""
    from imdb_grad_accum.report import error_analysis, learning_curves

    rows = group_rows(runs)
    twice = len(runs) - sum(len(row.runs) for row in rows)
    text = [f"# {experiment} results", "",
            f"Generated by `imdb-results` on {time.strftime('%Y-%m-%d')} from {len(runs)} finished run(s) in "
            f"{len(rows)} row(s): {', '.join(f'`{_relative(run.path)}`' for run in runs)}. Do not edit by hand.", "",
            "Test metrics are those of each run's best checkpoint on its held-out test split. Runs that differ only in "
            "the seed form one row, named by what varies between the rows: mean ± standard deviation over seeds, and "
            "a 95% interval for the accuracy (Student's t over the seeds; for a single run, a percentile bootstrap "
            "over the test reviews, 10,000 resamples). Wall time is each run's last session."
            + (f" {twice} run(s) repeat another run's configuration and seed (a study listing them twice) and count "
               "once." if twice else ""), "", row_table(rows), ""]
    text += comparison_section(rows, planned_pairs(rows, baseline, pairs))
    curves, files = learning_curves(experiment, rows)
    analysis, pngs = error_analysis(rows)
    files.update(pngs)
    files["README.md"] = ("\n".join(text + curves) + "\n" + analysis).encode()
    return files


def write_results(runs: list[FinishedRun], out: Path, baseline: str | None, pairs: list[str]) -> list[Path]:
    """OUT/<experiment>/ for each experiment among the runs, each replaced as a whole or not at all. A folder there
    holding anything but what results write is refused, never replaced."""
    experiments = sorted({run.metrics["experiment"] for run in runs})
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give the folder for the results tables")
    refuse_inside_a_run(out, "results")
    for folder in (out / e for e in experiments):
        other = sorted(p.name for p in folder.iterdir() if p.name not in RESULT_FILES or not p.is_file()) \
            if folder.is_dir() else []
        if other or (folder.exists() and not folder.is_dir()):
            raise UserError(f"--out {out}: {folder} holds what results did not write "
                            f"({', '.join(other[:3]) or 'a file'}); move it away or choose another --out")
    written = []
    for experiment in experiments:
        files = experiment_files(experiment, [run for run in runs if run.metrics["experiment"] == experiment],
                                 baseline, pairs)
        out.mkdir(parents=True, exist_ok=True)
        with write_folder(out / experiment) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        written += [out / experiment / name for name in files]
    return written


def default_out(paths: list[Path], name: str = "results") -> Path:
    """Beside the runs: <the folder that holds them all>/<name>."""
    holders = [str(path.resolve().parent if RunDir(path).is_run() else path.resolve()) for path in paths]
    return Path(os.path.commonpath(holders)) / name


def _relative(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path


def main(argv=None) -> list[Path]:
    p = command_parser(__doc__)
    p.add_argument("paths", nargs="*", type=Path, default=[Path("runs")],
                   help="run directories, or folders holding them (default: runs)")
    p.add_argument("--out", type=Path, help="where OUT/<experiment>/ go (default: beside the runs, <folder>/results)")
    comparisons.add_arguments(p)
    args = p.parse_args(argv)
    baseline, pairs = comparisons.chosen(args)
    runs = find_runs(args.paths)
    if not runs:
        raise UserError(f"no finished runs (with metrics.json) in {', '.join(map(str, args.paths))}")
    written = write_results(runs, args.out or default_out(args.paths), baseline, pairs)
    print(f"{len(runs)} run(s) -> {', '.join(sorted({str(f.parent) for f in written}))}")
    return written


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

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

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from imdb_grad_accum import stats
from imdb_grad_accum.cli import command_parser, run_cli
from imdb_grad_accum.config import PROJECT_ROOT, trained_config
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.files import write_folder
from imdb_grad_accum.rundir import MARKER, RunDir

SIGNIFICANCE = 0.05
ALL_PAIRS_UP_TO = 3  # rows; with more, only planned comparisons are made (each costs the others power under Holm)
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
        correct = int((predictions["label"] == predictions["predicted"]).sum())
        if len(predictions["label"]) != metrics["n_test"] or correct / len(predictions["label"]) != metrics["test_accuracy"]:
            raise UserError(f"{path / 'predictions' / 'test.csv'} does not reproduce metrics.json ({len(predictions['label'])} "
                            f"reviews, accuracy {correct / len(predictions['label']):.4f}; metrics.json: "
                            f"{metrics['n_test']} and {metrics['test_accuracy']:.4f}): it is damaged or another run's")
        return cls(path, metrics, run.history(), run.saved_config(), predictions)

    def label(self, with_folder: bool) -> str:
        """The run's name without the _seed<N> a sweep adds; with its folder, which names an arm of a study."""
        name = self.path.name.rsplit("_seed", 1)[0] if self.path.name.rsplit("_seed", 1)[-1].isdigit() else self.path.name
        return f"{self.path.parent.name}/{name}" if with_folder else name


@dataclass
class Row:
    """Runs of one configuration that differ only in the seed; or, from imdb-evaluate, one run on other data."""

    runs: list
    correct: np.ndarray  # (seeds, reviews) 0/1, columns by review
    reviews: Optional[str]  # what proves the reviews: the same value means the same texts and labels, in order
    labels: list[str] = field(default_factory=list)
    name: str = ""
    values: dict = field(default_factory=dict)  # what the table shows


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


# ----------------------------------------------------------------------------------------------- rows

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
        row.values = row_values(row, [r.metrics for r in row.runs])
    return sorted(rows, key=lambda row: (row.runs[0].metrics["effective_batch_size"], row.name))


def name_rows(rows: list[Row]) -> None:
    """Each row is named by what varies between the rows (`eb256, 4 epochs`); a lone row by its runs' label."""
    described = [{k: v for k, v in trained_config(r.runs[0].config).items() if k != "seed"} for r in rows]
    varying = sorted(k for k in set().union(*described) if len({json.dumps(d.get(k), default=str) for d in described}) > 1)
    leaves = [k.rsplit(".", 1)[-1] for k in varying]
    for row, values in zip(rows, described):
        parts = [_describe(k if leaves.count(k.rsplit(".", 1)[-1]) > 1 else k.rsplit(".", 1)[-1], values.get(k))
                 for k in varying if values.get(k) is not None]
        row.name = ", ".join(parts) or (row.labels[0] if len(rows) == 1 or not varying else "defaults")
    for name in {row.name for row in rows if sum(r.name == row.name for r in rows) > 1}:  # two rows, one name
        for row in (r for r in rows if r.name == name):
            row.name += f" ({row.labels[0]})"


def _describe(key: str, value) -> str:
    if key == "effective_batch_size":
        return f"eb{value}"
    if key == "epochs":
        return f"{value} epoch{'s' if value != 1 else ''}"
    if key == "name" or key.endswith("model.name") or key == "model.name":
        return Path(str(value)).name
    return f"{key}={value}"


def row_values(row: Row, metrics: list[dict]) -> dict:
    """Mean, standard deviation and 95% interval of the test metrics over the row's seeds."""
    def spread(key: str) -> tuple[float, Optional[float]]:
        values = [m[key] for m in metrics]
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None

    accuracies = [m["test_accuracy"] for m in metrics]
    if len(accuracies) > 1:
        interval, basis = stats.seed_interval(accuracies), f"t over {len(accuracies)} seeds"
    else:
        interval, basis = stats.bootstrap_interval(row.correct[0]), f"bootstrap over {row.correct.shape[1]} reviews"
    return {"accuracy": spread("test_accuracy"), "loss": spread("test_loss"), "f1": spread("test_f1"),
            "interval": interval, "basis": basis, "seeds": len(metrics)}


def mean_sd(value: tuple[float, Optional[float]], digits: int = 4) -> str:
    mean, sd = value
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def row_table(rows: list[Row]) -> str:
    columns = ["row", "runs", "seeds", "model", "effective batch", "epochs", "optimizer steps", "lr", "test accuracy",
               "95% interval", "interval from", "test loss", "test F1", "wall time", "train samples/s", "device"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        m, v = row.runs[0].metrics, row.values
        mean = lambda key: float(np.mean([run.metrics[key] for run in row.runs]))
        cells = [row.name, ", ".join(row.labels), v["seeds"], m["model"], m["effective_batch_size"], m["epochs"],
                 round(mean("optimizer_steps")), f"{m['lr']:.3g}", mean_sd(v["accuracy"]),
                 f"{v['interval'][0]:.4f} – {v['interval'][1]:.4f}", v["basis"], mean_sd(v["loss"]), mean_sd(v["f1"]),
                 f"{mean('wall_seconds') / 60:.1f} min", f"{mean('train_samples_per_s'):.1f}",
                 f"{m['device']} {m['precision']}" + (f" x{m['num_processes']}" if m["num_processes"] > 1 else "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
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
        if self.difference < 0:  # the better row first: its lead and interval read as positive numbers
            return Comparison(self.b, self.a, -self.difference, -self.high, -self.low, self.p, self.p_holm).sentence(
                comparisons)
        numbers = (f"{100 * self.difference:+.1f} points, 95% interval {100 * self.low:+.1f} to {100 * self.high:+.1f}; "
                   f"McNemar p = {self.p:.3g}, {self.p_holm:.3g} after Holm's correction for {comparisons} "
                   "comparison(s)")
        if self.low <= 0 <= self.high:
            return (f"**{self.a.name}** and **{self.b.name}**: not significantly different ({numbers}); the interval "
                    "covers 0, so these runs do not rank them.")
        if not self.significant:
            return (f"**{self.a.name}** and **{self.b.name}**: the interval excludes 0 but McNemar's test after "
                    f"correction does not ({numbers}); the difference is not established.")
        return f"**{self.a.name}** is more accurate than **{self.b.name}** ({numbers})."


def find_row(rows: list[Row], reference: str) -> Row:
    """The row a comparison names: by its name, or by a label it carries (a run name without its seed, with its
    folder: same_epochs/study_effective_batch_size64)."""
    found = [row for row in rows if reference.strip() in (row.name, *row.labels, *(l.split("/")[-1] for l in row.labels))]
    if len(found) != 1:
        known = "; ".join(row.name for row in rows)
        raise UserError(f"comparison: {'no' if not found else 'more than one'} row is named {reference.strip()!r}; the "
                        f"rows are: {known}")
    return found[0]


def planned_pairs(rows: list[Row], baseline: Optional[str], compare: list[str]) -> Optional[list[tuple[Row, Row]]]:
    """The pairs to compare: every row against --baseline, the --compare "A vs B" pairs, or (None) every pair."""
    if baseline is not None:
        base = find_row(rows, baseline)
        return [(row, base) for row in rows if row is not base]
    pairs = []
    for item in compare:
        if " vs " not in item:
            raise UserError(f"--compare {item!r}: write the two rows as \"A vs B\"")
        a, b = (find_row(rows, side) for side in item.split(" vs ", 1))
        if a is b:
            raise UserError(f"--compare {item!r}: both sides are the row {a.name!r}")
        pairs.append((a, b))
    return pairs or None


def compare(rows: list[Row], pairs: Optional[list[tuple[Row, Row]]]) -> tuple[list[Comparison], list[str]]:
    """The comparisons made, Holm-corrected together, and why any pair was not compared. Only rows whose test
    reviews are provably the same are compared."""
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]] if len(rows) <= ALL_PAIRS_UP_TO else []
    made, skipped = [], []
    for a, b in pairs:
        if a.reviews is None or a.reviews != b.reviews:
            skipped.append(f"{a.name} vs {b.name}: " + ("their seeds were tested on different reviews"
                                                        if None in (a.reviews, b.reviews) else
                                                        "they were tested on different reviews (other data or split)"))
            continue
        difference, low, high = stats.paired_bootstrap_difference(a.correct, b.correct)
        p = stats.mcnemar_exact(stats.majority_correct(a.correct), stats.majority_correct(b.correct))
        made.append(Comparison(a, b, difference, low, high, p))
    for comparison, adjusted in zip(made, stats.holm_adjust([c.p for c in made])):
        comparison.p_holm = adjusted
    return made, skipped


def comparison_section(rows: list[Row], made: list[Comparison], skipped: list[str], planned: bool) -> list[str]:
    if not made and not skipped:
        if len(rows) <= ALL_PAIRS_UP_TO:
            return []
        return ["## Comparisons", "", f"None made: with {len(rows)} rows, name the comparisons the study was run for "
                "(`--baseline ROW`, `--compare \"A vs B\"` or `--comparisons FILE`); each one made costs the others "
                "power under Holm's correction.", ""]
    text = ["## Comparisons", "",
            f"{len(made)} comparison(s): {'those the study planned' if planned else 'every two rows'}, each on the same "
            "test reviews. The interval is a paired bootstrap over test reviews (10,000 resamples; rows with several "
            "seeds also resample seeds). The test is an exact McNemar test on per-review correctness (a review counts "
            "as right for a row when most of its seeds got it right), with Holm's correction for the comparisons made. "
            f"A difference is called significant only when the interval excludes 0 and the corrected p is below "
            f"{SIGNIFICANCE}.", ""]
    if made:
        text += ["| row A | row B | accuracy A − B (points) | paired bootstrap 95% interval | McNemar p | "
                 "Holm-adjusted p | significant |", "|---|---|---|---|---|---|---|"]
        text += [f"| {c.a.name} | {c.b.name} | {100 * c.difference:+.2f} | {100 * c.low:+.2f} to {100 * c.high:+.2f} "
                 f"| {c.p:.3g} | {c.p_holm:.3g} | {'yes' if c.significant else 'no'} |" for c in made]
        text += ["", "What these numbers support:", ""] + [f"- {c.sentence(len(made))}" for c in made]
    text += [""] + [f"- Not compared: {reason}." for reason in skipped] + ([""] if skipped else [])
    return text


def read_comparisons(path: Optional[Path]) -> tuple[Optional[str], list[str]]:
    """A study's declared comparisons: a YAML file with `baseline: ROW` or `compare: ["A vs B", ...]`."""
    if path is None:
        return None, []
    try:
        plan = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"--comparisons {path}: cannot read it ({type(err).__name__})") from None
    if not isinstance(plan, dict) or not set(plan) <= {"baseline", "compare"} or not (
            isinstance(plan.get("compare", []), list) and isinstance(plan.get("baseline", ""), str)):
        raise UserError(f"--comparisons {path}: expected `baseline: ROW` or `compare:` with a list of \"A vs B\"")
    return plan.get("baseline"), [str(item) for item in plan.get("compare", [])]


# ----------------------------------------------------------------------------------------------- writing

def experiment_files(experiment: str, runs: list[FinishedRun], baseline: Optional[str], pairs: list[str]) -> dict:
    """Everything OUT/<experiment>/ holds, made in memory first."""
    from imdb_grad_accum.report import error_analysis, learning_curves

    rows = group_rows(runs)
    planned = planned_pairs(rows, baseline, pairs)
    made, skipped = compare(rows, planned)
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
    text += comparison_section(rows, made, skipped, planned is not None)
    curves, files = learning_curves(experiment, rows)
    analysis, pngs = error_analysis(rows)
    files.update(pngs)
    files["README.md"] = ("\n".join(text + curves) + "\n" + analysis).encode()
    return files


def write_results(runs: list[FinishedRun], out: Path, baseline: Optional[str] = None,
                  pairs: list[str] = ()) -> list[Path]:
    """OUT/<experiment>/ for each experiment among the runs, each replaced as a whole or not at all. A folder there
    holding anything but what results write is refused, never replaced."""
    experiments = sorted({run.metrics["experiment"] for run in runs})
    check_out(out, experiments)
    written = []
    for experiment in experiments:
        files = experiment_files(experiment, [run for run in runs if run.metrics["experiment"] == experiment],
                                 baseline, list(pairs))
        out.mkdir(parents=True, exist_ok=True)
        with write_folder(out / experiment) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        written += [out / experiment / name for name in files]
    return written


def check_out(out: Path, experiments: list[str]) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give the folder for the results tables")
    inside = next((p for p in (out, *out.resolve().parents) if (p / MARKER).is_file()), None)
    if inside is not None:
        raise UserError(f"--out {out} is inside the run directory {inside}; write results outside any run")
    for folder in (out / e for e in experiments):
        other = sorted(p.name for p in folder.iterdir() if p.name not in RESULT_FILES or not p.is_file()) \
            if folder.is_dir() else []
        if other or (folder.exists() and not folder.is_dir()):
            raise UserError(f"--out {out}: {folder} holds what results did not write ({', '.join(other[:3]) or 'a file'}"
                            "); move it away or choose another --out")


def default_out(paths: list[Path]) -> Path:
    """Beside the runs: <the folder that holds them all>/results."""
    holders = [str((path.parent if RunDir(path).is_run() else path).resolve()) for path in paths]
    return Path(os.path.commonpath(holders)) / "results"


def _relative(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path


def main(argv=None) -> list[Path]:
    p = command_parser(__doc__)
    p.add_argument("paths", nargs="*", type=Path, default=[Path("runs")],
                   help="run directories, or folders holding them (default: runs)")
    p.add_argument("--out", type=Path, help="where OUT/<experiment>/ go (default: beside the runs, <folder>/results)")
    p.add_argument("--baseline", metavar="ROW", help="compare every other row with this one only")
    p.add_argument("--compare", action="append", default=[], metavar='"A vs B"', help="a comparison to make (repeatable)")
    p.add_argument("--comparisons", type=Path, metavar="FILE", help="a study's planned comparisons (YAML: baseline: ROW, "
                   "or compare: [\"A vs B\", ...])")
    args = p.parse_args(argv)
    baseline, pairs = read_comparisons(args.comparisons)
    if sum(bool(x) for x in (args.baseline, args.compare, baseline or pairs)) > 1:
        raise UserError("give the comparisons one way: --baseline, --compare or --comparisons")
    runs = find_runs(args.paths)
    if not runs:
        raise UserError(f"no finished runs (with metrics.json) in {', '.join(map(str, args.paths))}")
    written = write_results(runs, args.out or default_out(args.paths), args.baseline or baseline, args.compare or pairs)
    print(f"{len(runs)} run(s) -> {', '.join(sorted({str(f.parent) for f in written}))}")
    return written


def cli() -> None:
    """The console command (pyproject.toml)."""
    run_cli(main)


if __name__ == "__main__":
    cli()

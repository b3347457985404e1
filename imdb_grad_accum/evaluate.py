"""Evaluate finished runs on any labelled reviews, with the project's statistics and a leak check.

    imdb-evaluate runs/quickstart --data /path/to/aclImdb               # its test split
    imdb-evaluate runs/study/*_seed1 --data reviews.csv --split all --out my_evaluation
    python -m imdb_grad_accum.evaluate RUN... --data PATH [--split test|train|all] [--include-seen]

--data takes what data.path takes: a hub id, a folder in the hub's parquet layout or the aclImdb layout, csv /
jsonl / parquet files, or one such file. Duplicate texts count once (as the split de-duplicates them). Each run is
evaluated with its best weights, verified against its recorded checksum, each review cut the way the run trained.

The leak check: reviews that were in a run's training or validation split (the same texts, found the way the split
finds duplicates) are left out of its evaluation and counted; --include-seen reports them separately too. A run
that saw every review is refused. Runs evaluated on the same reviews are compared (a paired bootstrap interval and
an exact McNemar test, Holm-corrected), as in imdb-results.

OUT (by default beside the runs: <their folder>/evaluation-<data name>) gets README.md with the table, its
sentences and an error analysis, and for each run <run name>/metrics.json (n, accuracy, f1, loss, the interval, the
counts excluded as seen and as duplicates) and <run name>/predictions.csv in the runs' predictions format.
"""

import json
import re
import time
from pathlib import Path

import numpy as np

from imdb_grad_accum import stats
from imdb_grad_accum.cli import command_parser, run_cli
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.files import write_folder
from imdb_grad_accum.rundir import RunDir, check_finished, parse_predictions, predictions_csv, refuse_inside_a_run

OWN_FILES = {"README.md", "confusion.png", "accuracy_by_length.png", "calibration.png"}
RUN_FILES = {"metrics.json", "predictions.csv", "seen_predictions.csv"}


def load_reviews_to_evaluate(data: str, split: str) -> tuple[list[str], np.ndarray, dict]:
    """The texts and labels of `split` (or all splits), de-duplicated as the run's split was, and what was dropped."""
    from imdb_grad_accum.data import load_splits, unique_rows

    splits = load_splits(data, "--data")
    if split != "all" and split not in splits:
        raise UserError(f"--split {split}: {data} has the split(s) {', '.join(splits)}; choose one of them, or all")
    chosen = list(splits.values()) if split == "all" else [splits[split]]
    texts = [text for part in chosen for text in part["text"][:]]
    labels = np.concatenate([np.asarray(part["label"][:]) for part in chosen])
    unique, conflicts = unique_rows(texts, labels)
    return texts, labels, {"rows": len(texts), "unique": unique, "excluded_duplicates": len(texts) - len(unique),
                           "label_conflicts": conflicts}


def seen_texts(run: RunDir, cache: dict) -> set[str]:
    """The texts of the run's training and validation reviews, from its own data (checked to be what it trained on)."""
    from imdb_grad_accum.data import load_reviews, text_sha256

    split, cfg = run.split(), run.saved_config()
    path = cfg["data"]["path"]
    if path not in cache:
        reviews = load_reviews(path)
        cache[path] = (reviews["text"][:], np.asarray(reviews["label"][:]))
    texts, labels = cache[path]
    if len(texts) != split["combined_size"] or text_sha256(texts, labels) != split["data_sha256"]:
        raise UserError(f"{run.path}: its data (data.path={path}) is not what it trained on any more, so the reviews "
                        "it saw cannot be known; restore that data to evaluate it")
    return {texts[i] for i in split["train"] + split["validation"]}


def evaluate_run(run: Path, texts: list[str], labels: np.ndarray, rows: np.ndarray, batch_size: int):
    """The metrics and predictions.csv of a run on the reviews at `rows` (indices into the evaluated data)."""
    import torch
    import torch.nn.functional as F

    from imdb_grad_accum.predict import classify
    from imdb_grad_accum.training import classification_metrics

    shown = [texts[i] for i in rows]
    logits, full_lengths, cfg = classify(run, shown, batch_size)
    predictions = {"index": rows, "label": labels[rows], "predicted": logits.argmax(-1).numpy(),
                   "prob_positive": logits.softmax(-1)[:, 1].numpy(), "tokens": full_lengths,
                   "loss": F.cross_entropy(logits, torch.as_tensor(labels[rows]), reduction="none").numpy()}
    metrics = classification_metrics(predictions)
    interval = stats.bootstrap_interval(predictions["label"] == predictions["predicted"])
    return ({**{key: metrics[key] for key in ("n", "accuracy", "f1", "loss")}, "accuracy_interval": list(interval)},
            predictions_csv(predictions, shown, cfg.data.max_length))


def table(evaluations: dict) -> list[str]:
    lines = ["| run | reviews | accuracy | 95% interval (bootstrap over reviews) | F1 | loss | left out as seen |",
             "|---|---|---|---|---|---|---|"]
    for name, metrics in evaluations.items():
        for what, m in (("", metrics), (" (seen in training)", metrics.get("seen"))):
            if m:
                low, high = m["accuracy_interval"]
                lines.append(f"| {name}{what} | {m['n']} | {m['accuracy']:.4f} | {low:.4f} – {high:.4f} | "
                             f"{m['f1']:.4f} | {m['loss']:.4f} | {m.get('excluded_seen', '')} |")
    return lines


def main(argv=None) -> Path:
    from imdb_grad_accum.data import text_sha256
    from imdb_grad_accum.report import error_analysis
    from imdb_grad_accum.comparisons import Row, comparison_section
    from imdb_grad_accum.results import FinishedRun, default_out

    p = command_parser(__doc__)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="finished run directories")
    p.add_argument("--data", required=True, help="labelled reviews: a hub id, a folder or a file")
    p.add_argument("--split", default="test", help="the data's split to evaluate (default: test; all: every row)")
    p.add_argument("--include-seen", action="store_true", help="also report the reviews a run saw in training")
    p.add_argument("--out", type=Path, help="default: beside the runs, <their folder>/evaluation-<data name>")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    for run in args.runs:
        check_finished(RunDir(run), "evaluate")
        RunDir(run).verified_best()  # and its recorded checksum: a run without it is refused here
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be a positive integer")
    data_name = re.sub(r"[^\w.-]+", "-", Path(args.data.rstrip("/")).name) or "data"
    out = args.out or default_out(args.runs, f"evaluation-{data_name}")
    refuse_inside_a_run(out, "the evaluation")
    foreign = [p.name for p in out.iterdir() if p.name not in OWN_FILES
               and not (p.is_dir() and {q.name for q in p.iterdir()} <= RUN_FILES)] if out.is_dir() else []
    if foreign or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} holds what imdb-evaluate did not write ({', '.join(foreign[:3]) or 'a file'}); "
                        "choose another --out")
    texts, labels, found = load_reviews_to_evaluate(args.data, args.split)
    cache, plans, names = {}, {}, [run.name for run in args.runs]
    for run in args.runs:  # every refusal before anything is evaluated or written
        name = f"{run.parent.name}_{run.name}" if names.count(run.name) > 1 else run.name
        seen = seen_texts(RunDir(run), cache)
        unseen = np.array([i for i in found["unique"] if texts[i] not in seen], dtype=np.int64)
        if not len(unseen):
            raise UserError(f"{run}: every one of the {len(found['unique'])} reviews evaluated was in its training or "
                            "validation split, so none tells how it does on new reviews")
        plans[name] = (run, unseen, np.setdiff1d(found["unique"], unseen))

    evaluations, rows, files = {}, [], {}
    for name, (run, unseen, seen) in plans.items():
        measured, files[f"{name}/predictions.csv"] = evaluate_run(run, texts, labels, unseen, args.batch_size)
        metrics = {"run": str(run), "data": args.data, "split": args.split, **measured, "excluded_seen": len(seen),
                   "excluded_duplicates": found["excluded_duplicates"], "label_conflicts": found["label_conflicts"],
                   "reviews_sha256": text_sha256([texts[i] for i in unseen], labels[unseen])}
        if args.include_seen and len(seen):
            metrics["seen"], files[f"{name}/seen_predictions.csv"] = evaluate_run(run, texts, labels, seen,
                                                                                  args.batch_size)
        files[f"{name}/metrics.json"] = json.dumps(metrics, indent=1) + "\n"
        evaluations[name] = metrics
        read_back = parse_predictions(files[f"{name}/predictions.csv"])  # the error analysis reads what was written
        correct = (read_back["label"] == read_back["predicted"]).astype(float)[None]
        evaluated = FinishedRun(run, metrics, [], RunDir(run).saved_config(), read_back)
        rows.append(Row([evaluated], correct, metrics["reviews_sha256"], [name], name))
    excluded = {name: m["excluded_seen"] for name, m in evaluations.items() if m["excluded_seen"]}
    text = [f"# Evaluation on {args.data} ({args.split})", "",
            f"Generated by `imdb-evaluate` on {time.strftime('%Y-%m-%d')}: {found['rows']} reviews"
            + (f", of which {found['excluded_duplicates']} repeat an earlier text and count once"
               if found["excluded_duplicates"] else "")
            + (f" ({found['label_conflicts']} of them with both labels: the first row's is kept)"
               if found["label_conflicts"] else "") + ". Do not edit by hand.", ""]
    text += ([f"**Leak check:** {', '.join(f'{n} saw {k}' for n, k in excluded.items())} of these reviews in its "
              "training or validation split; they are left out of its evaluation"
              + (" and reported separately" if args.include_seen else "") + ". Accuracy on reviews a run trained on "
              "would overstate how it does on new ones.", ""] if excluded else
             ["**Leak check:** none of these reviews was in any run's training or validation split.", ""])
    text += table(evaluations) + [""] + comparison_section(rows, None)
    analysis, pngs = error_analysis(rows, f"{args.data} ({args.split})")
    files.update(pngs)
    files["README.md"] = "\n".join(text) + "\n" + analysis
    out.parent.mkdir(parents=True, exist_ok=True)
    with write_folder(out) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    for name, m in evaluations.items():
        low, high = m["accuracy_interval"]
        print(f"{name}: accuracy {m['accuracy']:.4f} ({low:.4f} – {high:.4f}) on {m['n']} reviews"
              + (f", {m['excluded_seen']} seen in training left out" if m["excluded_seen"] else ""))
    print(f"evaluation -> {out}")
    return out


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

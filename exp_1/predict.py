"""Classify reviews with a finished run's best checkpoint.

    python exp_1/predict.py runs/quickstart "A moving, beautifully shot film." "Two hours I will never get back."
    python exp_1/predict.py runs/quickstart --file reviews.txt        # one review per line; or .csv/.jsonl with `text`
    python exp_1/predict.py runs/quickstart --file reviews.csv --out predictions.csv   # or .jsonl

Reviews are cut to the run's max_length the way it trained (data.truncation) and classified in batches, longest
first. Each gets a label (negative / positive) and the probability the model gives that label.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from exp_1.cli import CliParser, run_cli
from exp_1.config import load_config
from exp_1.errors import UserError
from exp_1.data import make_collator, encode
from exp_1.model import SentimentClassifier, load_run, model_inputs
from exp_1.device import pick_device
from exp_1.files import write_file
from exp_1.rundir import RunDir
from exp_1.precision import autocast, pick_precision
from exp_1.train import to_device

LABELS = ("negative", "positive")


@torch.no_grad()
def predict(model: SentimentClassifier, tokenizer, cfg, texts: list[str], batch_size: int = 32,
            device: torch.device = torch.device("cpu"), precision: str = "fp32") -> list[tuple[str, float]]:
    """(label, probability of that label) per text, in the order given."""
    model.eval().to(device)
    rows = encode(texts, tokenizer, cfg.data.max_length, model.input_names, cfg.data.truncation)
    rows.pop("full_length")
    order = np.argsort(-np.asarray(rows.pop("length")), kind="stable")  # similar lengths batch with little padding
    collate = make_collator(tokenizer, cfg, device)
    probabilities = torch.empty(len(texts), 2)
    for start in range(0, len(texts), batch_size):
        chosen = order[start:start + batch_size]
        batch = to_device(collate([{name: rows[name][i] for name in rows} for i in chosen]), device)
        with autocast(device, precision):
            logits = model(**model_inputs(batch))
        probabilities[chosen] = logits.float().softmax(-1).cpu()
    confidence, label = probabilities.max(-1)
    return [(LABELS[i], p) for i, p in zip(label.tolist(), confidence.tolist())]


def read_texts(path: Path) -> list[str]:
    """Reviews from a .txt (one per non-empty line), .csv or .jsonl file (a `text` column)."""
    if not path.is_file():
        raise UserError(f"--file {path}: no such file")
    try:
        content = path.read_text(encoding="utf-8-sig")  # -sig: also files saved as "CSV UTF-8" with a byte-order mark
    except UnicodeDecodeError as err:
        raise UserError(f"--file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    kind = path.suffix.lower()
    if kind == ".txt":  # only newlines end a review (str.splitlines would also split at form feeds and the like)
        return [line.rstrip("\r") for line in content.split("\n") if line.strip()]
    if kind == ".csv":
        csv.field_size_limit(2**31 - 1)  # the default 128 KiB per field is less than some reviews
        table = csv.DictReader(io.StringIO(content, newline=""))
        try:
            if "text" not in (table.fieldnames or []):
                raise UserError(f"--file {path}: no `text` column; found {', '.join(table.fieldnames or ['none'])}")
            records = list(table)
        except csv.Error as err:
            raise UserError(f"--file {path}: not a readable CSV file ({err})") from None
    elif kind == ".jsonl":
        records = []
        for number, line in enumerate(content.splitlines(), 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as err:
                raise UserError(f"--file {path}: line {number} is not JSON ({err.msg})") from None
    else:
        raise UserError(f"--file {path}: unknown file type {path.suffix or '(none)'}; use .txt, .csv or .jsonl")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"--file {path}: record {number} has no `text` value; each record needs a text column")
    return [r["text"] for r in records]


def write_predictions(path: Path, texts: list[str], predictions: list[tuple[str, float]]) -> None:
    records = [{"text": t, "label": label, "probability": round(p, 4)} for t, (label, p) in zip(texts, predictions)]
    if path.suffix.lower() == ".jsonl":
        write_file(path, "".join(json.dumps(r) + "\n" for r in records))
    else:
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=["text", "label", "probability"])
        writer.writeheader()
        writer.writerows(records)
        write_file(path, table.getvalue())


def main(argv=None) -> list[tuple[str, float]]:
    p = CliParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished run directory, e.g. runs/quickstart")
    p.add_argument("texts", nargs="*", help="reviews to classify")
    p.add_argument("--file", type=Path, help="more reviews: .txt (one per line), .csv or .jsonl with a text column")
    p.add_argument("--out", type=Path, help="write text, label, probability to this .csv or .jsonl instead of printing")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_intermixed_args(argv)

    if not RunDir(args.run).is_run():
        raise UserError(f"{args.run} is not a run directory of this project (no valid run.json)")
    if not (args.run / "metrics.json").is_file():
        raise UserError(f"{args.run} has not finished training (no metrics.json); finish it with --resume first")
    if args.out is not None and args.out.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"--out {args.out}: use a .csv or .jsonl file name")
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be a positive integer")
    if args.out is not None and not args.out.parent.is_dir():
        raise UserError(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.out is not None and args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give a .csv or .jsonl file name")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise UserError(f"--out {args.out} exists; pass --overwrite to replace it, or choose another file name")
    texts = args.texts + (read_texts(args.file) if args.file else [])
    if not texts:
        raise UserError(f"--file {args.file} holds no reviews" if args.file else
                        "no reviews given: pass them as arguments or with --file")
    empty = [i for i, text in enumerate(texts, 1) if not text.strip()]
    if empty:
        raise UserError(f"review {empty[0]} is empty ({len(empty)} empty in all); give each review some text")

    cfg = load_config(args.run / "config.yaml")
    device = pick_device("auto")
    try:  # the run's own precision where this device has it (fp16 runs predict in bf16/fp32 on a CPU)
        precision = pick_precision(cfg.train.precision, device)
    except UserError:
        precision = pick_precision("auto", device)
    tokenizer, model = load_run(args.run)
    predictions = predict(model, tokenizer, cfg, texts, args.batch_size, device, precision)
    if args.out is not None:
        write_predictions(args.out, texts, predictions)
        print(f"{len(texts)} predictions written to {args.out}", file=sys.stderr)
    else:
        for text, (label, probability) in zip(texts, predictions):
            preview = " ".join(text.split())
            print(f"{label}\t{probability:.3f}\t{preview[:100] + ('...' if len(preview) > 100 else '')}")
    return predictions


def cli() -> None:
    """The console command (pyproject.toml)."""
    run_cli(main)


if __name__ == "__main__":
    cli()

"""Classify reviews with a finished run's best checkpoint.

    imdb-predict runs/quickstart "A moving, beautifully shot film." "Two hours I will never get back."
    imdb-predict runs/quickstart --file reviews.txt        # one review per line; or .csv/.jsonl with `text`
    imdb-predict runs/quickstart --file reviews.csv --out predictions.csv   # or .jsonl

Reviews are cut to the run's max_length the way it trained (data.truncation) and classified in batches, longest
first. Each gets a label (negative / positive) and the probability the model gives that label.
"""

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from imdb_grad_accum.cli import command_parser, run_cli
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.files import write_file
from imdb_grad_accum.rundir import LABELS, RunDir, check_finished


def classify(run: Path, texts: list[str], batch_size: int = 32):
    """The logits (reviews x 2, float32, on the CPU), full token lengths and config of the run's best checkpoint on
    `texts`, in the run's precision where this device has it (fp16 runs predict in bf16 or fp32 on a CPU)."""
    import torch

    from imdb_grad_accum.batching import make_collator
    from imdb_grad_accum.data import encode
    from imdb_grad_accum.device import autocast, pick_device, pick_precision
    from imdb_grad_accum.model import load_run, model_inputs
    from imdb_grad_accum.training import to_device

    tokenizer, model, cfg = load_run(run)
    device = pick_device("auto")
    try:
        precision = pick_precision(cfg.train.precision, device)
    except UserError:
        precision = pick_precision("auto", device)
    model.to(device)
    rows = encode(texts, tokenizer, cfg.data.max_length, model.input_names, cfg.data.truncation)
    full_lengths = np.asarray(rows.pop("full_length"))
    order = np.argsort(-np.asarray(rows.pop("length")), kind="stable")  # similar lengths batch with little padding
    collate = make_collator(tokenizer, cfg, device)
    logits = torch.empty(len(texts), 2)
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chosen = order[start:start + batch_size]
            batch = to_device(collate([{name: rows[name][i] for name in rows} for i in chosen]), device)
            with autocast(device, precision):
                logits[chosen] = model(**model_inputs(batch)).float().cpu()
    return logits, full_lengths, cfg


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
        return
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["text", "label", "probability"])
    writer.writeheader()
    writer.writerows(records)
    write_file(path, table.getvalue())


def main(argv=None) -> list[tuple[str, float]]:
    p = command_parser(__doc__)
    p.add_argument("run", type=Path, help="a finished run directory, e.g. runs/quickstart")
    p.add_argument("texts", nargs="*", help="reviews to classify")
    p.add_argument("--file", type=Path, help="more reviews: .txt (one per line), .csv or .jsonl with a text column")
    p.add_argument("--out", type=Path, help="write text, label, probability to this .csv or .jsonl instead of printing")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_intermixed_args(argv)
    check_finished(RunDir(args.run), "predict with")
    if args.out is not None:
        if args.out.suffix.lower() not in (".csv", ".jsonl"):
            raise UserError(f"--out {args.out}: use a .csv or .jsonl file name")
        if not args.out.parent.is_dir():
            raise UserError(f"--out {args.out}: folder {args.out.parent} does not exist")
        if args.out.is_dir():
            raise UserError(f"--out {args.out} is a folder; give a .csv or .jsonl file name")
        if args.out.exists() and not args.overwrite:
            raise UserError(f"--out {args.out} exists; pass --overwrite to replace it, or choose another file name")
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be a positive integer")
    texts = args.texts + (read_texts(args.file) if args.file else [])
    if not texts:
        raise UserError(f"--file {args.file} holds no reviews" if args.file else
                        "no reviews given: pass them as arguments or with --file")
    empty = [i for i, text in enumerate(texts, 1) if not text.strip()]
    if empty:
        raise UserError(f"review {empty[0]} is empty ({len(empty)} empty in all); give each review some text")
    logits = classify(args.run, texts, args.batch_size)[0]
    confidence, label = logits.softmax(-1).max(-1)
    predictions = [(LABELS[i], p) for i, p in zip(label.tolist(), confidence.tolist())]
    if args.out is not None:
        write_predictions(args.out, texts, predictions)
        print(f"{len(texts)} predictions written to {args.out}", file=sys.stderr)
    else:
        for text, (label, probability) in zip(texts, predictions):
            preview = " ".join(text.split())
            print(f"{label}\t{probability:.3f}\t{preview[:100] + ('...' if len(preview) > 100 else '')}")
    return predictions


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

"""Export a finished run as a standard Hugging Face model folder, with a model card, optionally pushed to the hub.

    imdb-export runs/quickstart exported/
    imdb-export runs/study/eb64_seed1 exported/ --row runs/study/eb64_seed*   # the card reports the row
    imdb-export runs/quickstart exported/ --push-to-hub you/imdb-minilm [--private]

The folder loads without this project (transformers and torch only), with the run's best weights unchanged:

    AutoModelForSequenceClassification.from_pretrained("exported", trust_remote_code=True)
    pipeline("text-classification", model="exported", trust_remote_code=True)("What a wonderful film.")

The model code (imdb_sentiment.py) is copied into the folder, which is why loading needs trust_remote_code. The
pipeline cuts long reviews the way the run trained (data.truncation), also head_tail, which a tokenizer alone cannot
express; the tokenizer's model_max_length is the run's data.max_length.
"""

import json
import os
import sys
from pathlib import Path

import yaml

from imdb_grad_accum.cli import command_parser, run_cli
from imdb_grad_accum.errors import RunStopped, UserError
from imdb_grad_accum.files import write_folder
from imdb_grad_accum.rundir import LABELS, RunDir, check_finished

# Licenses of base models this project ships configs for; others are left for the user to state.
BASE_LICENSES = {"bert-base-uncased": "apache-2.0", "google-bert/bert-base-uncased": "apache-2.0",
                 "answerdotai/ModernBERT-base": "apache-2.0", "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0"}
EXPORT_FILES = {"config.json", "model.safetensors", "imdb_sentiment.py", "README.md", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja"}


def check_out(out: Path, overwrite: bool) -> None:
    """OUT must be new, an empty folder, or (with --overwrite) a previous export; it must be writable."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the exported model")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty; pass --overwrite to replace a previous export, or "
                            "choose another folder")
        if not is_export(out):
            raise UserError(f"--overwrite: {out} is not a previous export of this project (its config.json is not "
                            "an imdb_sentiment model, or it holds other files); choose another folder")
    parent = next(p for p in (out.parent, *out.parent.parents) if p.exists())  # the export is renamed in there
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{parent} is not a writable folder; choose where the exported model may be written")


def is_export(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("model_type") == "imdb_sentiment"
            and all(p.name in EXPORT_FILES and p.is_file() and not p.is_symlink() for p in folder.iterdir()))


def exported_model(run: Path):
    """The run's verified best checkpoint as the exportable model; its tokenizer cuts as the run trained if it can."""
    from imdb_grad_accum.imdb_sentiment import IMDBSentimentClassifier, IMDBSentimentConfig
    from imdb_grad_accum.model import load_run

    tokenizer, model, cfg = load_run(run)
    encoder_config = model.encoder.config
    encoder_config._attn_implementation_internal = None  # a packed run's attention is this project's own
    config = IMDBSentimentConfig(
        encoder_config=encoder_config, pooling=cfg.model.pooling, classifier_dropout=cfg.model.dropout,
        truncation=cfg.data.truncation, review_max_length=cfg.data.max_length, num_labels=2,
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
        problem_type="single_label_classification",
        custom_pipelines={"text-classification": {"impl": "imdb_sentiment.IMDBSentimentPipeline",
                                                  "pt": ["AutoModelForSequenceClassification"], "type": "text"}})
    exported = IMDBSentimentClassifier(config)
    exported.load_state_dict(model.state_dict())
    IMDBSentimentConfig.register_for_auto_class()
    IMDBSentimentClassifier.register_for_auto_class("AutoModelForSequenceClassification")
    tokenizer.model_max_length = cfg.data.max_length
    tokenizer.truncation_side = "left" if cfg.data.truncation == "tail" else "right"
    return cfg, tokenizer, exported.eval()


def model_card(run: Path, cfg, row_runs: list[Path]) -> str:
    """README.md in the hub's model-card format, the run's row (`row_runs`: its other seeds) reported too."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from imdb_grad_accum.results import find_runs, group_rows

    runs = find_runs([run, *row_runs])
    row = next(r for r in group_rows(runs) if any(x.path.resolve() == run.resolve() for x in r.runs))
    others = [r.path for r in runs if all(r.path.resolve() != x.path.resolve() for x in row.runs)]
    if others:
        raise UserError(f"--row: {others[0]} is not a seed of {run}'s configuration (its config differs in more than "
                        "the seed); give only runs of the same configuration")
    this = next(x for x in row.runs if x.path.resolve() == run.resolve())
    single = group_rows([this])[0].values
    m, split, interval = this.metrics, RunDir(run).split(), single["interval"]
    name = cfg.model.name
    on_hub = not Path(name).expanduser().exists() and name.count("/") <= 1
    results = [EvalResult(task_type="text-classification", dataset_type="stanfordnlp/imdb",
                          dataset_name="IMDB, re-split leak-free (train+test combined, duplicates dropped)",
                          dataset_split=f"test ({m['n_test']} reviews)", metric_type=kind, metric_name=kind,
                          metric_value=round(m[f"test_{kind}"], 4)) for kind in ("accuracy", "f1")]
    data = ModelCardData(language="en", license=BASE_LICENSES.get(name), base_model=name if on_hub else None,
                         datasets=["stanfordnlp/imdb"], pipeline_tag="text-classification", library_name="transformers",
                         tags=["sentiment-analysis", "imdb", "imdb-grad-accum"], metrics=["accuracy", "f1"],
                         model_name=run.name, eval_results=results)
    kept = {"head": "their beginning", "tail": "their end",
            "head_tail": "a quarter of that budget from their start and three quarters from their end"}
    cut = this.predictions["truncated"].astype(bool)
    correct = this.predictions["label"] == this.predictions["predicted"]
    lines = [f"# {run.name}: IMDB sentiment (negative / positive)", "",
             f"`{name}` fine-tuned for English movie-review sentiment with imdb-grad-accum (a leak-free split of "
             "IMDB, exact gradient accumulation). The weights are "
             f"the run's best checkpoint by validation {cfg.checkpoint.best_metric} (epoch {m['best_epoch']}).", "",
             "## How to use", "", "```python", "from transformers import AutoModelForSequenceClassification, pipeline",
             "", 'classify = pipeline("text-classification", model="<this folder or repo>", trust_remote_code=True)',
             'classify("What a wonderful film.")  # [{\'label\': \'positive\', \'score\': ...}]',
             'model = AutoModelForSequenceClassification.from_pretrained("<this folder or repo>", '
             "trust_remote_code=True)", "```", "",
             "`trust_remote_code=True` runs `imdb_sentiment.py` from this folder: the encoder, masked "
             f"{cfg.model.pooling} pooling, dropout and a linear head, which no stock transformers class reproduces.",
             "", "## Results", "",
             f"On the held-out test split ({m['n_test']} reviews): accuracy **{m['test_accuracy']:.4f}** (95% interval "
             f"{interval[0]:.4f} – {interval[1]:.4f}, {single['basis']}), F1 {m['test_f1']:.4f}, loss "
             f"{m['test_loss']:.4f}."]
    if len(row.runs) > 1:
        mean, sd = row.values["accuracy"]
        low, high = row.values["interval"]
        lines += ["", f"This run is one of {len(row.runs)} runs of the same configuration with training seeds "
                  f"{', '.join(str(r.metrics['seed']) for r in row.runs)}: their test accuracy is {mean:.4f} ± "
                  f"{sd:.4f} (mean ± standard deviation), 95% interval {low:.4f} – {high:.4f} ({row.values['basis']})."]
    lines += ["", "## Training", "",
              f"- Seeds: training `seed` {m['seed']}, split `data.split_seed` {m['split_seed']}.",
              f"- Split: {split['full_sizes']['train']:,} / {split['full_sizes']['validation']:,} / "
              f"{split['full_sizes']['test']:,} train / validation / test reviews of the {split['combined_size']:,} "
              f"combined ({split['duplicates_dropped']} duplicate texts dropped), of which "
              f"{m['split_sizes']['train']:,} / {m['split_sizes']['validation']:,} / {m['split_sizes']['test']:,} were "
              f"used; fingerprint `{m['split_fingerprint']}`.",
              f"- Optimizer steps: {m['optimizer_steps']} of effective batch {m['effective_batch_size']} "
              f"({m['grad_accum_steps']} accumulation x {m['num_processes']} process(es)), lr {m['lr']:.3g}, "
              f"{m['precision']} on {m['device']}; stopped early: {m.get('stopped_early_at') or 'no'}.",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
              + (f", project commit `{m['git_commit']}`" if m.get("git_commit") else "") + ".",
              "", "The full training config:", "", "```yaml",
              yaml.safe_dump(this.config, sort_keys=False).rstrip(), "```",
              "", "## Limits", "",
              "- English movie reviews from IMDB (polarised: ratings ≤ 4 negative, ≥ 7 positive); other domains, "
              "languages and neutral texts are outside what it was trained and tested on.",
              f"- Reviews longer than {cfg.data.max_length} tokens are cut before classification, keeping "
              f"{kept[cfg.data.truncation]}. The pipeline above cuts them the way training did; calling the model on "
              "your own tokenisation with `truncation=True` keeps "
              + ("the end" if cfg.data.truncation == "tail" else "the beginning")
              + (" instead, which differs from training for long reviews." if cfg.data.truncation == "head_tail"
                 else ", as in training.")]
    if cut.any() and (~cut).any():
        lines.append(f"- {cut.mean():.0%} of the test reviews were cut; accuracy on them {correct[cut].mean():.4f}, "
                     f"on the others {correct[~cut].mean():.4f}.")
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n"))


def export(run: Path, out: Path, row_runs: list[Path]) -> Path:
    """OUT is either the previous export or the complete new one (write_folder renames it into place)."""
    cfg, tokenizer, model = exported_model(run)
    card = model_card(run, cfg, row_runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with write_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
    return out


def push(out: Path, repo_id: str, private: bool) -> str:
    """Create the hub repo if needed and upload the folder; without a token or a network, one line (exit 1)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if get_token() is None:
        raise RunStopped(f"no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN), then push again; "
                         f"the export in {out} is kept")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message=f"Upload {out.name} (imdb-grad-accum)")
    except OfflineModeIsEnabled:
        raise RunStopped(f"cannot push to the hub: HF_HUB_OFFLINE is set; the export in {out} is kept") from None
    except (HfHubHTTPError, OSError, ValueError) as err:  # OSError: no network (requests/httpx connection errors)
        raise RunStopped(f"cannot push to the hub ({type(err).__name__}: {str(err).strip().splitlines()[0][:160]}); "
                         f"the export in {out} is kept") from None
    return str(url)


def main(argv=None) -> Path:
    p = command_parser(__doc__)
    p.add_argument("run", type=Path, help="a finished run directory, e.g. runs/quickstart")
    p.add_argument("out", type=Path, help="the folder to write the exported model into")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a previous export")
    p.add_argument("--row", type=Path, nargs="+", default=[], metavar="RUN",
                   help="runs of the same configuration with other seeds: the card reports their mean ± sd too")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload OUT to this hub repo (created if needed)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = p.parse_intermixed_args(argv)
    check_finished(RunDir(args.run), "export")
    if args.private and not args.push_to_hub:
        raise UserError("--private goes with --push-to-hub REPO_ID")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            raise UserError(f"--push-to-hub {args.push_to_hub!r} is not a hub repo id ({str(err).splitlines()[0][:120]}"
                            "); write it as user/name") from None
    check_out(args.out, args.overwrite)
    if not sys.stderr.isatty():  # transformers' shard bar would fill a log file
        import transformers

        transformers.utils.logging.disable_progress_bar()
    out = export(args.run, args.out, args.row)
    print(f"exported {args.run} to {out}")
    if args.push_to_hub:
        print(f"pushed to {push(out, args.push_to_hub, args.private)}")
    return out


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

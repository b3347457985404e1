"""A trained model leaves the project: imdb-export writes a standard HF model folder that loads, in a fresh
process that never imports this project and with the hub offline, through AutoModelForSequenceClassification,
AutoTokenizer and pipeline, and gives predict.py's probabilities; its model card parses and states the interval."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import synthetic_reviews, tiny_config, write_reviews
from imdb_grad_accum import export, predict
from imdb_grad_accum.cli import run_cli
from imdb_grad_accum.errors import UserError
from exp_1 import main as exp1

LONG = "the plot was clumsy and the acting tedious, " * 30 + "but the ending is wonderful and moving."
REVIEWS = [r["text"] for r in synthetic_reviews(9, seed=5)] + [LONG, "awful " * 100 + "brilliant " * 100,
                                                                "What a wonderful film."]

LOAD = r"""
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

folder, texts, out = sys.argv[1], json.loads(open(sys.argv[2]).read()), sys.argv[3]
model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
short = [t for t in texts if len(tokenizer(t)["input_ids"]) <= tokenizer.model_max_length]
batch = tokenizer(short, truncation=True, padding=True, return_tensors="pt")
with torch.no_grad():
    direct = model(**batch).logits.softmax(-1)[:, 1].tolist()
classify = pipeline("text-classification", model=folder, trust_remote_code=True)
open(out, "w").write(json.dumps({"direct": dict(zip(short, direct)), "pipeline": classify(texts),
                  "model_max_length": tokenizer.model_max_length, "truncation_side": tokenizer.truncation_side,
                  "imported_project": any(name.split(".")[0] in ("exp_1", "exp_2", "imdb_grad_accum")
                                          for name in sys.modules)}))
"""


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, tiny_bert, tiny_modernbert):
    """A finished tiny-BERT run (head_tail truncation) and a tiny-ModernBERT run (cls pooling, tail)."""
    root = tmp_path_factory.mktemp("export")
    data = write_reviews(root / "reviews")
    runs = {}
    for name, model, extra in (("bert", tiny_bert, {"truncation": "head_tail"}),
                               ("modernbert", tiny_modernbert, {"truncation": "tail"})):
        config = tiny_config(root, model, data, name=name, data={"max_length": 32, **extra},
                             model={"pooling": "mean" if name == "bert" else "cls"}, train={"epochs": 1})
        exp1.main(["--config", str(config)])
        runs[name] = root / "runs" / name
    return runs


def _load_elsewhere(folder: Path, texts: list[str], cwd: Path) -> dict:
    """Load the export in a fresh Python process outside the repository, with the hub offline."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"))
    (cwd / "texts.json").write_text(json.dumps(texts))
    result = subprocess.run([sys.executable, "-c", LOAD, str(folder), str(cwd / "texts.json"), str(cwd / "out.json")],
                            cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((cwd / "out.json").read_text())


@pytest.mark.parametrize("name", ["bert", pytest.param("modernbert", marks=pytest.mark.slow)])
def test_an_export_loads_without_the_project_and_gives_predicts_probabilities(name, finished_runs, tmp_path):
    run = finished_runs[name]
    out = export.main([str(run), str(tmp_path / "exported")])
    assert {"config.json", "model.safetensors", "imdb_sentiment.py", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["label2id"] == {"negative": 0,
                                                                                                "positive": 1}
    loaded = _load_elsewhere(out, REVIEWS, tmp_path)
    assert not loaded["imported_project"]
    assert loaded["model_max_length"] == 32
    assert loaded["truncation_side"] == ("left" if name == "modernbert" else "right")

    expected = predict.main([str(run), *REVIEWS])  # (label, probability of that label)
    for text, (label, probability), got in zip(REVIEWS, expected, loaded["pipeline"]):
        assert got["label"] == label, text
        assert got["score"] == pytest.approx(probability, abs=1e-5), text
    positive = {text: p if label == "positive" else 1 - p for text, (label, p) in zip(REVIEWS, expected)}
    assert loaded["direct"] and all(loaded["direct"][t] == pytest.approx(positive[t], abs=1e-5) for t in loaded["direct"])
    assert len(loaded["direct"]) < len(REVIEWS)  # the long reviews went through the pipeline's own cut only


def test_the_model_card_parses_and_states_the_test_accuracy_with_its_interval(finished_runs, tmp_path):
    from huggingface_hub import ModelCard

    run = finished_runs["bert"]
    out = export.main([str(run), str(tmp_path / "exported")])
    metrics = json.loads((run / "metrics.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-classification" and card.data.datasets == ["stanfordnlp/imdb"]
    accuracy = next(r for r in card.data.eval_results if r.metric_type == "accuracy")
    assert accuracy.metric_value == round(metrics["test_accuracy"], 4)
    text = card.text
    assert f"accuracy **{metrics['test_accuracy']:.4f}** (95% interval" in text and "bootstrap over 20 reviews" in text
    for fact in (f"training `seed` {metrics['seed']}", f"`data.split_seed` {metrics['split_seed']}",
                 metrics["split_fingerprint"], "truncation: head_tail", "torch", "trust_remote_code=True",
                 "a quarter of that budget from their start"):
        assert fact in text, fact


def test_a_row_of_seeds_is_reported_on_the_card(finished_runs, tmp_path, tiny_bert):
    data = finished_runs["bert"].parent.parent / "reviews"
    config = tiny_config(tmp_path, tiny_bert, data, name="row", train={"epochs": 1})
    for seed in (1, 2):
        exp1.main(["--config", str(config), f"name=row_seed{seed}", f"seed={seed}"])
    runs = [tmp_path / "runs" / f"row_seed{seed}" for seed in (1, 2)]
    out = export.main([str(runs[0]), str(tmp_path / "exported"), "--row", *map(str, runs)])
    text = (out / "README.md").read_text()
    assert "one of 2 runs of the same configuration with training seeds 1, 2" in text and "t over 2 seeds" in text


def test_overwrite_replaces_only_a_previous_export(finished_runs, tmp_path):
    out = tmp_path / "exported"
    export.main([str(finished_runs["bert"]), str(out)])
    first = (out / "model.safetensors").read_bytes()
    export.main([str(finished_runs["modernbert"]), str(out), "--overwrite"])
    assert (out / "model.safetensors").read_bytes() != first and json.loads((out / "config.json").read_text())[
        "pooling"] == "cls"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    (out / "my_notes.md").write_text("mine")  # now it is more than an export: never replaced
    with pytest.raises(UserError, match="is not a previous export of this project"):
        export.main([str(finished_runs["bert"]), str(out), "--overwrite"])
    assert (out / "my_notes.md").read_text() == "mine" and json.loads((out / "config.json").read_text())[
        "pooling"] == "cls"


def _bad(argv, monkeypatch, capsys, exported: bool = False) -> tuple[int, str]:
    """The one line of a refusal (nothing else printed), or of a push that failed after the export (`exported`)."""
    monkeypatch.setattr(sys, "argv", ["export.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(export.main)
    out, err = capsys.readouterr()
    assert out == (f"exported {argv[0]} to {argv[1]}\n" if exported else "") and err.count("\n") == 1, (out, err)
    assert err.startswith("stopped: " if exported else "error: "), err
    return exit_info.value.code, err


@pytest.mark.parametrize("case", ["unfinished run", "damaged best checkpoint", "out not empty",
                                  "overwrite of a folder that is no export", "out is a file", "out not writable",
                                  "not a run", "a hub repo id that is not one"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, finished_runs, tmp_path, monkeypatch, capsys):
    run = finished_runs["bert"]
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    out = tmp_path / "out"
    if case == "unfinished run":
        (copy / "metrics.json").unlink()
    if case == "damaged best checkpoint":
        data = bytearray((copy / "checkpoints" / "best.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / "checkpoints" / "best.safetensors").write_bytes(bytes(data))
    if case in ("out not empty", "overwrite of a folder that is no export"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case == "out is a file":
        out.write_text("a file")
    if case == "out not writable":
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    if case == "not a run":
        (copy / "run.json").unlink()
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    argv = [copy, out] + (["--overwrite"] if case == "overwrite of a folder that is no export" else []) + (
        ["--push-to-hub", "bad repo id!!"] if case == "a hub repo id that is not one" else [])
    code, err = _bad(argv, monkeypatch, capsys)
    expected = {"unfinished run": "has not finished training", "damaged best checkpoint": "is damaged or replaced",
                "out not empty": "exists and is not empty; pass --overwrite",
                "overwrite of a folder that is no export": "is not a previous export of this project",
                "out is a file": "is a file; give a folder", "out not writable": "is not a writable folder",
                "not a run": "is not a run directory of this project",
                "a hub repo id that is not one": "--push-to-hub 'bad repo id!!' is not a hub repo id"}[case]
    assert code == 2 and expected in err, err
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_push_to_the_hub_offline_is_one_line_and_keeps_the_export(finished_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)  # a token, but no network: HF_HUB_OFFLINE is set by conftest
    out = tmp_path / "exported"
    code, err = _bad([finished_runs["bert"], out, "--push-to-hub", "someone/imdb-tiny"], monkeypatch, capsys, True)
    assert code == 1 and "cannot push to the hub" in err and f"the export in {out} is kept" in err, err
    assert (out / "model.safetensors").is_file()
    monkeypatch.delenv("HF_TOKEN")  # and no `hf auth login` on this machine
    code, err = _bad([finished_runs["bert"], tmp_path / "again", "--push-to-hub", "someone/imdb-tiny"], monkeypatch,
                     capsys, True)
    assert code == 1 and "no Hugging Face token" in err and (tmp_path / "again" / "config.json").is_file(), err

"""Experiment 1 end to end on tiny models: the run-directory contract, the best checkpoint reloads and is what
was tested, and clear one-line errors for bad input."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import IMDB, PROJECT, needs_imdb, tiny_config, train_config, window_sampler
from exp_1 import main as exp1
from imdb_grad_accum.config import load_config
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.batching import make_eval_loader, make_train_loader
from imdb_grad_accum.data import prepare_data, tokenize
from imdb_grad_accum.model import load_model, load_run, model_inputs
from imdb_grad_accum.training import Stepper, build_optimizer, evaluate, weighted_loss

CONTRACT = ["run.json", "config.yaml", "split.json", "history.jsonl", "metrics.json", "predictions/test.csv",
            "predictions/validation.csv", "checkpoints/best.safetensors", "checkpoints/last.safetensors",
            "model/config.json", "model/tokenizer.json"]


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_modernbert"])
def test_end_to_end_run_writes_the_contract_and_tests_the_best_checkpoint(fixture, request, tmp_path, reviews_dir):
    config = tiny_config(tmp_path, request.getfixturevalue(fixture), reviews_dir, train={"epochs": 3})
    metrics = exp1.main(["--config", str(config)])
    run = tmp_path / "runs" / "tiny"
    for name in CONTRACT:
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))

    assert json.loads((run / "metrics.json").read_text()) == metrics
    for key in ("test_accuracy", "test_loss", "test_f1", "best_epoch", "n_test"):
        assert key in metrics
    split = json.loads((run / "split.json").read_text())
    assert metrics["n_test"] == len(split["test"]) == 20  # 220 reviews split 9:1:1
    assert split["duplicates_dropped"] == 0 and len(split["train"]) == 180

    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = [h for h in history if "train/loss" in h]
    epochs = [h for h in history if "epoch" in h]
    assert len(steps) == metrics["optimizer_steps"] == 3 * 23  # ceil(180 / 8) steps per epoch
    assert [h["epoch"] for h in epochs] == [1, 2, 3]
    best = max(epochs, key=lambda h: (h["val/accuracy"], -h["epoch"]))
    assert metrics["best_epoch"] == best["epoch"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["name"] == request.getfixturevalue(fixture)

    # the run folder alone rebuilds the model, and its best checkpoint gives the reported test metrics
    tokenizer, model, _ = load_run(run)
    from imdb_grad_accum.data import load_reviews

    reviews = load_reviews(str(reviews_dir)).select(split["test"])
    cfg = load_config(config)
    rows = tokenize(reviews, tokenizer, 64, model.input_names).add_column("index", split["test"])
    test, _ = evaluate(model, make_eval_loader(rows, tokenizer, cfg), torch.device("cpu"))
    assert test["accuracy"] == metrics["test_accuracy"]
    assert test["loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)

    # the prediction file has a row per test review and reproduces the test metrics exactly
    with open(run / "predictions" / "test.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    assert sorted(int(p["index"]) for p in predictions) == split["test"]
    labels = load_reviews(str(reviews_dir))["label"][:]
    assert all(int(p["label"]) == labels[int(p["index"])] for p in predictions)
    correct = sum(p["label"] == p["predicted"] for p in predictions)
    assert correct / len(predictions) == metrics["test_accuracy"]
    assert math.fsum(float(p["loss"]) for p in predictions) / len(predictions) == metrics["test_loss"]
    assert all((float(p["prob_positive"]) >= 0.5) == (p["predicted"] == "1") for p in predictions)


@needs_imdb
@pytest.mark.slow
def test_minilm_lowers_the_loss_on_real_reviews(tmp_path):
    """A few optimizer steps of the real pretrained MiniLM on 16 real reviews lower the loss on them."""
    cfg = load_config(tiny_config(tmp_path, "sentence-transformers/all-MiniLM-L6-v2", IMDB,
                                       data={"max_length": 128, "max_train_samples": 16}, train={"batch_size": 16}))
    tokenizer, model = load_model(cfg)
    splits = prepare_data(cfg, tokenizer, model.input_names)
    sampler = window_sampler(splits.train["length"], 16, 1, seed=0)
    batch = next(iter(make_train_loader(splits.train, sampler, tokenizer, cfg)))
    optimizer = build_optimizer(model, cfg.train, 5e-5, torch.device("cpu"))
    stepper = Stepper(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                      torch.device("cpu"), "fp32", train_config())

    def loss_now():
        with torch.no_grad():
            return weighted_loss(model(**model_inputs(batch)), batch).item()

    before = loss_now()
    for _ in range(4):
        stepper.forward_backward(batch)
        stepper.optimizer_step()
    assert loss_now() < before - 0.05


def _run_cli(*args, cwd=PROJECT):
    return subprocess.run([sys.executable, str(PROJECT / "exp_1" / "main.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tier", ["a config error", pytest.param("data and model errors", marks=pytest.mark.slow)])
def test_cli_errors_exit_2_with_one_line_and_no_traceback(tier, tmp_path, reviews_dir, tiny_bert):
    bad_labels = tmp_path / "bad"
    bad_labels.mkdir()
    (bad_labels / "train.csv").write_text("text,label\ngood,1\nbad,3\n")
    no_columns = tmp_path / "nocols"
    no_columns.mkdir()
    (no_columns / "train.csv").write_text("review,stars\ngood,5\n")
    config = tiny_config(tmp_path, tiny_bert, reviews_dir)
    cases = [
        (["--config", tmp_path / "missing.yaml"], "missing.yaml not found"),
        (["--config", config, "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["--config", config, f"data.path={bad_labels}"], "label 3 at row 1"),
        (["--config", config, f"data.path={no_columns}"], "lacks column(s) label, text"),
        (["--config", config, "model.name=no-such-org/no-such-model"], "model.name=no-such-org/no-such-model"),
        (["--config", config, "data.path=no-such-org/no-such-dataset"], "data.path=no-such-org/no-such-dataset"),
    ]
    cases = cases[:2] if tier == "a config error" else cases[2:]  # the first two answer before torch loads
    before = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for args, message in cases:
        result = _run_cli(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert result.stdout == "" and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (
            args, result.stdout[-2000:], result.stderr[-2000:])
        assert message in result.stderr
    # nothing was written, changed or removed
    assert {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_existing_results_are_not_overwritten_without_the_flag(tmp_path, reviews_dir, tiny_bert):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"epochs": 1})
    exp1.main(["--config", str(config)])
    metrics = (tmp_path / "runs/tiny/metrics.json").read_text()
    with pytest.raises(UserError, match="holds a finished run; pass --overwrite to train it again"):
        exp1.main(["--config", str(config)])
    assert (tmp_path / "runs/tiny/metrics.json").read_text() == metrics
    exp1.main(["--config", str(config), "--overwrite"])


@pytest.mark.slow
def test_compiled_training_matches_eager_and_its_checkpoint_loads_plainly(tmp_path, tiny_bert, reviews_dir):
    """train.compile changes speed, not results; the checkpoint it writes loads into an uncompiled model."""
    eager = exp1.main(["--config", str(tiny_config(tmp_path, tiny_bert, reviews_dir, name="eager", train={"epochs": 1}))])
    compiled = exp1.main(["--config", str(tiny_config(tmp_path, tiny_bert, reviews_dir, name="compiled",
                                                      train={"epochs": 1, "compile": True}))])
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-3)
    assert compiled["test_accuracy"] == eager["test_accuracy"]
    load_run(tmp_path / "runs" / "compiled")  # a strict load: it would fail on torch.compile's `_orig_mod.` keys


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep_resume_points"])
def test_a_finished_run_holds_each_set_of_weights_once(keep, tmp_path, tiny_bert, capsys):
    """best and last are links to the resume point's weights, never copies; a finished run drops its resume points
    (optimizer state: twice the weights) unless checkpoint.keep_resume_points. And a text given with both labels is
    counted and said."""
    import os

    from conftest import synthetic_reviews

    data = tmp_path / "reviews"
    data.mkdir()
    rows = synthetic_reviews(220)
    rows.append({"text": rows[3]["text"], "label": 1 - rows[3]["label"]})
    with open(data / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    config = tiny_config(tmp_path, tiny_bert, data, train={"epochs": 1}, checkpoint={"keep_resume_points": keep})
    exp1.main(["--config", str(config)])
    assert "1 text(s) appear in the data with both labels" in capsys.readouterr().out
    run = tmp_path / "runs" / "tiny"
    assert json.loads((run / "split.json").read_text())["label_conflicts"] == 1
    checkpoints = run / "checkpoints"
    assert os.path.samefile(checkpoints / "best.safetensors", checkpoints / "last.safetensors")  # one epoch: one
    points = sorted((checkpoints / "resume").glob("point-*"))
    recorded = json.loads((run / "run.json").read_text())["files"]
    if keep:
        assert len(points) == 1 and os.path.samefile(points[0] / "model.safetensors", checkpoints / "last.safetensors")
    else:
        assert points == [] and not [f for f in recorded if "/point-" in f]

"""What people look at: plots and tables generated from run directories, the sweep command, the predict command."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import tiny_config, write_reviews
from exp_1 import main as exp1
from exp_1 import predict, results, sweep
from exp_1.config import UserError
from exp_1.data import load_reviews
from exp_1.utils import run_cli
from exp_2 import main as exp2


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert, tiny_modernbert) -> Path:
    """A runs folder with one exp_1 run and two exp_2 runs of tiny models."""
    root = tmp_path_factory.mktemp("finished")
    data = write_reviews(root / "reviews")
    runs = str(root / "runs")
    exp1.main(["--config", str(tiny_config(root, tiny_bert, data, name="bert_b8", output_dir=runs))])
    for name, model in (("bert_eb16", tiny_bert), ("modernbert_eb16", tiny_modernbert)):
        exp2.main(["--config", str(tiny_config(root, model, data, name=name, output_dir=runs,
                                               train={"epochs": 3, "effective_batch_size": 16}))])
    return root / "runs"


def _table_rows(readme: Path) -> dict:
    lines = [line for line in readme.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return {row["run"]: row for row in
            (dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:])}


def test_results_writes_valid_plots_and_tables_that_match_each_runs_metrics(finished, tmp_path):
    out = tmp_path / "training_results"
    (out / "elsewhere").mkdir(parents=True)
    (out / "elsewhere" / "README.md").write_text("another experiment's results")

    results.main([str(finished), "--out", str(out)])

    for experiment, runs in (("exp_1", ["bert_b8"]), ("exp_2", ["bert_eb16", "modernbert_eb16"])):
        for name in ("val_loss.png", "val_accuracy.png", "train_loss.png"):
            with Image.open(out / experiment / name) as image:
                image.verify()
                assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 500
        rows = _table_rows(out / experiment / "README.md")
        assert sorted(rows) == runs
        for name, row in rows.items():
            metrics = json.loads((finished / name / "metrics.json").read_text())
            assert row["model"] == metrics["model"]
            assert int(row["effective batch"]) == metrics["effective_batch_size"]
            assert int(row["epochs"]) == metrics["epochs"]
            assert int(row["optimizer steps"]) == metrics["optimizer_steps"]
            assert float(row["lr"]) == metrics["lr"]
            for column, key in (("test loss", "test_loss"), ("test accuracy", "test_accuracy"), ("test F1", "test_f1")):
                assert float(row[column]) == round(metrics[key], 4), (name, column)
            assert float(row["train samples/s"]) == round(metrics["train_samples_per_s"], 1)
    assert (out / "elsewhere" / "README.md").read_text() == "another experiment's results"


def test_results_names_a_missing_folder_an_empty_one_and_foreign_run_files(tmp_path):
    with pytest.raises(UserError, match="no-such-runs: no such folder"):
        results.main([str(tmp_path / "no-such-runs")])
    with pytest.raises(UserError, match="no finished runs"):
        results.main([str(tmp_path), "--out", str(tmp_path / "out")])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("name: foreign\n")
    (foreign / "history.jsonl").write_text("")
    (foreign / "metrics.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(UserError, match="metrics.json lacks script, model"):
        results.main([str(foreign), "--out", str(tmp_path / "out")])
    (foreign / "history.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="foreign: cannot read its run files"):
        results.main([str(foreign), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_sweep_skips_finished_runs_and_survives_a_failing_one(tmp_path, tiny_bert, reviews_dir, capfd):
    def config(name, **data):
        path = tiny_config(tmp_path, tiny_bert, reviews_dir, name=name, train={"epochs": 1}, data=data)
        return str(path.rename(tmp_path / f"{name}.yaml"))

    configs = [config("first"), config("broken", path=str(tmp_path / "missing")), config("third")]
    out = tmp_path / "training_results"
    assert sweep.main([*configs, "--out", str(out), "seed=3"]) == {
        tmp_path / "runs" / "first": "finished", tmp_path / "runs" / "broken": "failed",
        tmp_path / "runs" / "third": "finished"}
    assert "data.path=" in capfd.readouterr().err  # the failed run's own one-line reason
    assert sorted(_table_rows(out / "exp_1" / "README.md")) == ["first", "third"]
    assert yaml.safe_load((tmp_path / "runs" / "first" / "config.yaml").read_text())["seed"] == 3  # overrides apply

    finished_at = (tmp_path / "runs" / "first" / "metrics.json").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        sweep.cli([*configs, "--out", str(out), "seed=3"])
    assert exit_info.value.code == 1
    assert "skipped   " in capfd.readouterr().out
    assert (tmp_path / "runs" / "first" / "metrics.json").stat().st_mtime_ns == finished_at

    # interrupted runs: one with a resume point continues from it, one stopped before its first restarts
    (tmp_path / "runs" / "first" / "metrics.json").unlink()
    (tmp_path / "runs" / "third" / "metrics.json").unlink()
    shutil.rmtree(tmp_path / "runs" / "third" / "checkpoints" / "resume")
    assert sweep.main([configs[0], configs[2], "--out", str(out), "seed=3"]) == {
        tmp_path / "runs" / "first": "resumed", tmp_path / "runs" / "third": "finished"}
    assert "third: restarting (no resume point yet)" in capfd.readouterr().out

    # a finished run is only skipped for the config it was run with
    with pytest.raises(UserError, match=r"runs/first was run with another config \(it differs in seed\)"):
        sweep.main([configs[0], "--out", str(out), "seed=4"])


def test_predict_gives_the_evaluations_predictions_for_the_test_reviews(finished, tmp_path):
    run = finished / "bert_b8"
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    reviews = load_reviews(str(finished.parent / "reviews")).select(split["test"])
    texts, labels = reviews["text"][:], reviews["label"][:]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    # the evaluation batches 2 x train.batch_size reviews, longest first: predict does the same with --batch-size 16
    predicted = predict.main([str(run), "--file", str(tmp_path / "test.jsonl"), "--batch-size", "16",
                              "--out", str(tmp_path / "predictions.csv")])
    positive = [p if label == "positive" else 1 - p for label, p in predicted]
    assert sum((p > 0.5) == y for p, y in zip(positive, labels)) / len(labels) == metrics["test_accuracy"]
    nll = -sum(math.log(p if y else 1 - p) for p, y in zip(positive, labels)) / len(labels)
    assert nll == pytest.approx(metrics["test_loss"], rel=1e-5)
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == len(texts) + 1

    # one review at a time (no padding at all) and every input form give the same answers
    one_by_one = predict.main([str(run), *texts[:5], "--batch-size", "1"])
    assert [label for label, _ in one_by_one] == [label for label, _ in predicted[:5]]
    assert [p for _, p in one_by_one] == pytest.approx([p for _, p in predicted[:5]], abs=1e-5)
    (tmp_path / "five.txt").write_text("\n".join(texts[:5]) + "\n")
    (tmp_path / "five.csv").write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts[:5])),
                                       encoding="utf-8-sig")  # with the byte-order mark that Excel writes
    for file in ("five.txt", "five.csv"):
        assert predict.main([str(run), "--file", str(tmp_path / file)]) == predict.main([str(run), *texts[:5]])


@pytest.mark.parametrize("case", ["missing run", "unfinished run", "missing file", "broken jsonl", "csv without text",
                                  "jsonl without text", "not utf-8", "unknown file type", "empty file", "no reviews",
                                  "missing output folder"])
def test_predict_bad_input_is_one_line(case, finished, tmp_path, monkeypatch, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((finished / "bert_b8" / "config.yaml").read_text())
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "notext.csv").write_text("review,stars\ngood,5\n")
    (tmp_path / "latin1.txt").write_bytes("très bon film".encode("latin-1"))
    (tmp_path / "reviews.docx").write_text("x")
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n{"review": "no text key"}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    run = str(finished / "bert_b8")
    argv, expected = {
        "missing run": ([str(tmp_path / "nope"), "good"], "is not a run directory"),
        "unfinished run": ([str(unfinished), "good"], "has not finished training (no metrics.json)"),
        "missing file": ([run, "--file", str(tmp_path / "gone.txt")], "gone.txt: no such file"),
        "broken jsonl": ([run, "--file", str(tmp_path / "broken.jsonl")], "line 2 is not JSON"),
        "csv without text": ([run, "--file", str(tmp_path / "notext.csv")], "no `text` column; found review, stars"),
        "jsonl without text": ([run, "--file", str(tmp_path / "notext.jsonl")], "record 2 has no `text` value"),
        "not utf-8": ([run, "--file", str(tmp_path / "latin1.txt")], "not UTF-8 text"),
        "unknown file type": ([run, "--file", str(tmp_path / "reviews.docx")], "unknown file type .docx"),
        "empty file": ([run, "--file", str(tmp_path / "empty.txt")], "empty.txt holds no reviews"),
        "no reviews": ([run], "no reviews given"),
        "missing output folder": ([run, "good", "--out", str(tmp_path / "no" / "p.csv")], "folder"),
    }[case]
    monkeypatch.setattr(sys, "argv", ["predict.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


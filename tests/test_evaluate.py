"""Any trained run evaluated on any labelled reviews (imdb-evaluate): the project's statistics, and a leak check
that leaves out what a run saw in training. Sabotage each guards against: evaluating seen reviews as new, counting
duplicates twice, or pairing runs on other reviews."""

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import tiny_config, write_reviews
from exp_1 import main as exp1
from imdb_grad_accum import evaluate
from imdb_grad_accum.cli import run_cli


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_bert):
    """Two finished tiny runs (other seeds) on the same 220 synthetic reviews, in the full 9:1:1 split."""
    root = tmp_path_factory.mktemp("evaluated")
    data = write_reviews(root / "reviews")
    for seed in (1, 2):
        exp1.main(["--config", str(tiny_config(root, tiny_bert, data, name=f"tiny_seed{seed}", seed=seed,
                                               train={"epochs": 1}))])
    return root / "runs" / "tiny_seed1", root / "runs" / "tiny_seed2", data


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_whole_data_set_leaves_exactly_the_runs_test_reviews_and_reproduces_its_test(two_runs, tmp_path):
    run, other, data = two_runs
    out = evaluate.main([str(run), str(other), "--data", str(data), "--split", "all", "--out", str(tmp_path / "out")])
    for folder in (run, other):
        metrics = json.loads((folder / "metrics.json").read_text())
        evaluated = json.loads((out / folder.name / "metrics.json").read_text())
        split = json.loads((folder / "split.json").read_text())
        assert evaluated["n"] == len(split["test"]) == metrics["n_test"]
        assert evaluated["excluded_seen"] == len(split["train"]) + len(split["validation"])
        assert evaluated["accuracy"] == metrics["test_accuracy"]
        assert evaluated["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
        rows = _rows(out / folder.name / "predictions.csv")
        assert sorted(int(r["index"]) for r in rows) == split["test"]  # data rows, in the combined order
    text = (out / "README.md").read_text()
    assert "saw 200 of these reviews" in text and "## Comparisons" in text  # the same 20 reviews: compared


def test_training_rows_are_left_out_and_reported_with_include_seen(two_runs, tmp_path, capsys):
    run, _, data = two_runs
    out = evaluate.main([str(run), "--data", str(data), "--split", "train", "--include-seen", "--out",
                         str(tmp_path / "out")])
    split = json.loads((run / "split.json").read_text())
    evaluated = json.loads((out / run.name / "metrics.json").read_text())
    seen_in_train_file = sum(i < 120 for i in split["train"] + split["validation"])  # train.csv holds rows 0-119
    assert evaluated["excluded_seen"] == seen_in_train_file and evaluated["n"] == 120 - seen_in_train_file
    assert evaluated["seen"]["n"] == seen_in_train_file
    assert len(_rows(out / run.name / "seen_predictions.csv")) == seen_in_train_file
    assert "seen in training left out" in capsys.readouterr().out


def test_duplicates_count_once_and_a_run_that_saw_everything_is_refused(two_runs, tmp_path, monkeypatch, capfd):
    run, _, data = two_runs
    split = json.loads((run / "split.json").read_text())
    with open(data / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seen = [rows[i] for i in split["train"] if i < 120][:30]
    folder = tmp_path / "seen"
    folder.mkdir()
    with open(folder / "test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(seen + seen[:5])  # five of them twice
    monkeypatch.setattr(sys, "argv", ["evaluate", str(run), "--data", str(folder), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate.main)
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2 and out == "" and err.count("\n") == 1
    assert "every one of the 30 reviews evaluated was in its training or validation split" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no text column", "labels that are not 0/1", "an empty file", "no best checkpoint",
                                  "a split the data lacks", "not a run"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, two_runs, tmp_path, monkeypatch, capfd):
    run, _, data = two_runs
    (tmp_path / "nocolumn.csv").write_text("review,label\ngood,1\n")
    (tmp_path / "stars.csv").write_text("text,label\ngood,5\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "checkpoints" / "best.safetensors").unlink()
    argv, message = {
        "no text column": ([run, "--data", tmp_path / "nocolumn.csv"], "lacks column(s) text"),
        "labels that are not 0/1": ([run, "--data", tmp_path / "stars.csv"], "has label 5 at row 0"),
        "an empty file": ([run, "--data", tmp_path / "empty.csv"], "empty.csv holds no reviews"),
        "no best checkpoint": ([unfinished, "--data", data], "best.safetensors is damaged, replaced or missing"),
        "a split the data lacks": ([run, "--data", data, "--split", "validation"], "has the split(s) train, test"),
        "not a run": ([tmp_path, "--data", data], "is not a run directory of this project"),
    }[case]
    monkeypatch.setattr(sys, "argv", ["evaluate", *map(str, argv), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate.main)
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_an_out_folder_holding_a_users_file_is_refused_and_kept(two_runs, tmp_path, monkeypatch, capfd):
    run, _, data = two_runs
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    monkeypatch.setattr(sys, "argv", ["evaluate", str(run), "--data", str(data), "--out", str(mine)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate.main)
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2 and out == "" and err.count("\n") == 1
    assert "holds what imdb-evaluate did not write (notes.txt)" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"

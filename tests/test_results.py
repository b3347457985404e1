"""What people look at: plots and tables generated from run directories, the sweep command, the predict command."""

import hashlib
import itertools
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import tiny_config, write_reviews
from exp_1 import main as exp1
from imdb_grad_accum import predict, results, sweep
from imdb_grad_accum.errors import UserError, WriteFailed
from imdb_grad_accum.data import load_reviews
from imdb_grad_accum.cli import run_cli
from exp_2 import main as exp2


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert, tiny_modernbert) -> Path:
    """A runs folder with one exp_1 run and three exp_2 runs of tiny models, two of them differing only in seed."""
    root = tmp_path_factory.mktemp("finished")
    data = write_reviews(root / "reviews")
    runs = str(root / "runs")
    exp1.main(["--config", str(tiny_config(root, tiny_bert, data, name="bert_b8", output_dir=runs))])
    for name, model, seed in (("bert_eb16_seed1", tiny_bert, 1), ("bert_eb16_seed2", tiny_bert, 2),
                              ("modernbert_eb16", tiny_modernbert, 7)):
        exp2.main(["--config", str(tiny_config(root, model, data, name=name, output_dir=runs, seed=seed,
                                               train={"epochs": 3, "effective_batch_size": 16}))])
    return root / "runs"


def _table_rows(readme: Path, by: str = "runs") -> dict:
    """The first table of a results README, by the runs each row holds (their names without the seed)."""
    lines = readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    return {row[by]: row for row in
            (dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in table[2:])}


def test_results_writes_plots_tables_and_error_analysis_that_match_the_runs(finished, tmp_path):
    out = tmp_path / "training_results"
    (out / "elsewhere").mkdir(parents=True)
    (out / "elsewhere" / "README.md").write_text("another experiment's results")

    results.main([str(finished), "--out", str(out)])

    expected = {"exp_1": {"bert_b8": ["bert_b8"]},
                "exp_2": {"bert_eb16": ["bert_eb16_seed1", "bert_eb16_seed2"], "modernbert_eb16": ["modernbert_eb16"]}}
    for experiment, rows in expected.items():
        for name in ("val_loss.png", "val_accuracy.png", "train_loss.png", "confusion.png", "accuracy_by_length.png",
                     "calibration.png"):
            with Image.open(out / experiment / name) as image:
                image.verify()
                assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 500
        table = _table_rows(out / experiment / "README.md")
        assert sorted(table) == sorted(rows)
        for label, names in rows.items():
            metrics = [json.loads((finished / name / "metrics.json").read_text()) for name in names]
            row = table[label]
            assert int(row["seeds"]) == len(names)
            assert row["model"] == metrics[0]["model"]
            assert int(row["effective batch"]) == metrics[0]["effective_batch_size"]
            assert float(row["lr"]) == metrics[0]["lr"]
            for column, key in (("test accuracy", "test_accuracy"), ("test loss", "test_loss"), ("test F1", "test_f1")):
                values = [m[key] for m in metrics]
                mean, *sd = row[column].split(" ± ")
                assert float(mean) == round(statistics.mean(values), 4), (label, column)
                assert [float(x) for x in sd] == ([round(statistics.stdev(values), 4)] if len(values) > 1 else [])
            low, high = (float(x) for x in row["95% interval"].split(" – "))
            assert low <= float(row["test accuracy"].split(" ± ")[0]) <= high
            assert row["interval from"] == (f"t over {len(names)} seeds" if len(names) > 1 else "bootstrap over 20 reviews")
        text = (out / experiment / "README.md").read_text()
        for section in ("## Error analysis", "### Confusion matrices", "### Accuracy by review length",
                        "### Calibration", "### Most confident mistakes"):
            assert section in text
    assert "## Comparisons" in (out / "exp_2" / "README.md").read_text()
    assert (out / "elsewhere" / "README.md").read_text() == "another experiment's results"


def test_rows_that_hold_the_same_runs_are_one_row_with_every_label(finished, tmp_path):
    """The same configuration and seed trained twice (a study listing a run in two arms) is one row, counted once,
    shown with both labels; sabotage: grouping by where a run lives makes two rows and compares them (+0.00, p = 1)."""
    copy = tmp_path / "again" / "also_modernbert"
    shutil.copytree(finished / "modernbert_eb16", copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config.update(output_dir=str(tmp_path / "again"), name="also_modernbert")  # elsewhere, under another name
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    results.main([str(finished / "modernbert_eb16"), str(copy), str(finished / "bert_eb16_seed1"), "--out", str(out)])
    text = (out / "exp_2" / "README.md").read_text()
    rows = _table_rows(out / "exp_2" / "README.md")
    assert sorted(rows) == ["again/also_modernbert, runs/modernbert_eb16", "runs/bert_eb16"]
    assert rows["again/also_modernbert, runs/modernbert_eb16"]["seeds"] == "1"
    assert "1 run(s) repeat another run's configuration and seed" in text
    assert "+0.00 | +0.00 to +0.00" not in text


def fake_run(folder: Path, correct: int, lr: float = 0.1, seed: int = 1, reviews: int = 400,
             test_sha256: str = "same reviews") -> Path:
    """A finished run as the project writes it, right on the first `correct` of `reviews` test reviews."""
    (folder / "predictions").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    rows = ["index,label,predicted,prob_positive,loss,tokens,truncated,text"]
    rows += [f"{i},{i % 2},{i % 2 if i < correct else 1 - i % 2},0.9,0.1,100,0,review {i}" for i in range(reviews)]
    (folder / "predictions" / "test.csv").write_text("\n".join(rows) + "\n")
    (folder / "config.yaml").write_text(yaml.safe_dump({"name": folder.name, "seed": seed, "train": {"lr": lr}}))
    (folder / "history.jsonl").write_text("")
    (folder / "checkpoints" / "best.safetensors").write_bytes(b"weights")
    (folder / "run.json").write_text(json.dumps({"project": "imdb-grad-accum", "id": folder.name}))
    (folder / "metrics.json").write_text(json.dumps({
        "experiment": "exp_2", "trainer": "pytorch", "model": "m", "effective_batch_size": 8, "epochs": 1,
        "optimizer_steps": 1, "lr": lr, "test_loss": 0.1, "test_accuracy": correct / reviews, "n_test": reviews,
        "test_f1": 0.5, "seed": seed, "best_sha256": hashlib.sha256(b"weights").hexdigest(),
        "split_fingerprint": "f", "test_sha256": test_sha256, "wall_seconds": 1, "train_samples_per_s": 1,
        "device": "cpu", "precision": "fp32", "num_processes": 1}))
    return folder


def _sentences(readme: Path) -> list[str]:
    return [line for line in readme.read_text().splitlines() if line.startswith("- ")]


def test_comparisons_name_a_real_difference_and_say_which_is_better(tmp_path):
    """Rows on the same 400 reviews, right on 95% and 80% of them: significant, and the better one named first."""
    out = tmp_path / "out"
    results.main([str(fake_run(tmp_path / "runs" / "good", 380, lr=0.1)),
                  str(fake_run(tmp_path / "runs" / "worse", 320, lr=0.2)), "--out", str(out)])
    assert _sentences(out / "exp_2" / "README.md")[0].startswith("- **lr=0.1** is more accurate than **lr=0.2** (+15.0")


def test_results_of_the_run_one_is_in_go_beside_it(tmp_path, monkeypatch):
    """`imdb-results .` inside a run directory: the tables go beside the run, as for any other path to it."""
    run = fake_run(tmp_path / "runs" / "good", 380)
    monkeypatch.chdir(run)
    results.main(["."])
    assert (tmp_path / "runs" / "results" / "exp_2" / "README.md").is_file()


def test_runs_on_other_reviews_are_never_compared(tmp_path):
    """Two runs with the same review indices whose test reviews differ (other data, or files replaced between the
    runs): their per-review results are not paired. Sabotage: pairing by review index alone, which reported +40
    points [10, 70] 'on the same reviews' in the red team's case."""
    out = tmp_path / "out"
    results.main([str(fake_run(tmp_path / "runs" / "a", 380, lr=0.1, test_sha256="texts of one data set")),
                  str(fake_run(tmp_path / "runs" / "b", 220, lr=0.2, test_sha256="texts of another")), "--out", str(out)])
    text = (out / "exp_2" / "README.md").read_text()
    assert "accuracy A − B" not in text and "McNemar p" not in text
    assert "- Not compared: lr=0.1 vs lr=0.2: they were tested on different reviews" in text


def test_planned_comparisons_are_the_only_ones_holm_corrects_for(tmp_path):
    """Four rows: with no plan none are compared; --baseline makes 3 comparisons and Holm multiplies the smallest p
    by 3, not by the 6 of every pair; --compare makes exactly the pairs named, and a comparisons file the same."""
    runs = [fake_run(tmp_path / "runs" / f"lr{i}", correct, lr=lr)
            for i, (correct, lr) in enumerate([(380, 0.1), (300, 0.2), (310, 0.3), (370, 0.4)])]
    paths = [str(run) for run in runs]

    def comparisons(*args) -> list[list[str]]:
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        results.main([*paths, "--out", str(out), *args])
        lines = (out / "exp_2" / "README.md").read_text().split("## Comparisons")[1].split("\n## ")[0].splitlines()
        return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| lr=")]

    assert comparisons() == []
    against = comparisons("--baseline", "lr=0.1")
    assert [(a, b) for a, b, *_ in against] == [("lr=0.2", "lr=0.1"), ("lr=0.3", "lr=0.1"), ("lr=0.4", "lr=0.1")]
    smallest = min(against, key=lambda c: float(c[4]))
    assert float(smallest[5]) == pytest.approx(min(1.0, 3 * float(smallest[4])), rel=1e-2)
    named = comparisons("--compare", "lr=0.2 vs lr=0.3", "--compare", "lr=0.4 vs lr=0.1")
    assert [(a, b) for a, b, *_ in named] == [("lr=0.2", "lr=0.3"), ("lr=0.4", "lr=0.1")]
    plan = tmp_path / "comparisons.yaml"
    plan.write_text(yaml.safe_dump({"compare": ["lr=0.2 vs lr=0.3", "lr=0.4 vs lr=0.1"]}))
    assert comparisons("--comparisons", str(plan)) == named
    with pytest.raises(UserError, match="no row is named 'lr=9'"):
        comparisons("--baseline", "lr=9")


def test_results_refuse_a_run_without_its_prediction_file(finished, tmp_path):
    old = tmp_path / "old" / "bert_b8"
    shutil.copytree(finished / "bert_b8", old)
    shutil.rmtree(old / "predictions")
    with pytest.raises(UserError, match="predictions/test.csv is missing or damaged"):
        results.main([str(old), "--out", str(tmp_path / "out")])


def test_results_replace_a_folder_whole_or_not_at_all(finished, tmp_path, monkeypatch):
    out = tmp_path / "out"
    results.main([str(finished / "bert_b8"), "--out", str(out)])
    before = {p.name: p.read_bytes() for p in (out / "exp_1").iterdir()}
    written = []
    real = Path.write_bytes

    def disk_full_on_the_third(self, data):
        written.append(self)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_on_the_third)
    with pytest.raises(WriteFailed, match="cannot write .*exp_1: No space left on device"):
        results.main([str(finished / "bert_b8"), "--out", str(out)])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (out / "exp_1").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["exp_1"]


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
    with pytest.raises(UserError, match="foreign is not a run directory of this project"):
        results.main([str(foreign), "--out", str(tmp_path / "out")])
    (foreign / "run.json").write_text('{"project": "imdb-grad-accum", "id": "x"}')
    with pytest.raises(UserError, match="metrics.json lacks or mistypes experiment, trainer, model"):
        results.main([str(foreign), "--out", str(tmp_path / "out")])
    for name, content, message in (("metrics.json", "[1, 2]", "holds no JSON object"),
                                   ("metrics.json", "{half", "metrics.json is missing or damaged"),
                                   ("history.jsonl", "{not json\n", "history.jsonl is missing or damaged"),
                                   ("config.yaml", "a: [b\n", "config.yaml is missing or damaged")):
        good = (foreign / name).read_text()
        if name != "metrics.json":  # a whole run's files, so that only the damaged one is wrong
            whole = fake_run(tmp_path / f"whole_{name}", 10, reviews=20)
            for file in ("metrics.json", "predictions/test.csv", "checkpoints/best.safetensors"):
                (foreign / file).parent.mkdir(exist_ok=True)
                (foreign / file).write_bytes((whole / file).read_bytes())
        (foreign / name).write_text(content)
        with pytest.raises(UserError, match=message):
            results.main([str(foreign), "--out", str(tmp_path / "out")])
        (foreign / name).write_text(good)
    assert not (tmp_path / "out").exists()


def test_results_refuse_a_cut_prediction_file_and_count_a_run_named_twice_once(finished, tmp_path):
    run = tmp_path / "cut" / "bert_b8"
    shutil.copytree(finished / "bert_b8", run)
    predictions = run / "predictions" / "test.csv"
    predictions.write_text("\n".join(predictions.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(UserError, match="test.csv does not reproduce metrics.json"):
        results.main([str(run), "--out", str(tmp_path / "out")])
    results.main([str(finished / "bert_b8"), str(finished / "bert_b8"), "--out", str(tmp_path / "out")])
    assert _table_rows(tmp_path / "out" / "exp_1" / "README.md")["bert_b8"]["seeds"] == "1"


@pytest.mark.slow
def test_sweep_skips_finished_runs_and_survives_a_failing_one(tmp_path, tiny_bert, reviews_dir, capfd):
    def config(name, **data):
        path = tiny_config(tmp_path, tiny_bert, reviews_dir, name=name, train={"epochs": 1}, data=data,
                           checkpoint={"keep_resume_points": True})  # so that an unfinished copy can resume
        return str(path.rename(tmp_path / f"{name}.yaml"))

    configs = [config("first"), config("broken", path=str(tmp_path / "missing")), config("third")]
    out = tmp_path / "training_results"
    assert sweep.main([*configs, "--out", str(out), "seed=3"]) == {
        tmp_path / "runs" / "first": "finished", tmp_path / "runs" / "broken": "failed",
        tmp_path / "runs" / "third": "finished"}
    said = capfd.readouterr().out
    assert "broken: failed (exit code 2: error: data.path=" in said  # the failed run's own one-line reason
    assert "no such file or folder" in (tmp_path / "runs" / "broken" / "train.log").read_text()
    # first and third trained the same config and seed: one run trained twice, one row under both names
    assert list(_table_rows(out / "exp_1" / "README.md")) == ["first, third"]
    saved = yaml.safe_load((tmp_path / "runs" / "first" / "config.yaml").read_text())
    assert saved["seed"] == 3 and saved["tracking"]["group"] == "first+broken+third"  # overrides and group apply

    finished_at = (tmp_path / "runs" / "first" / "metrics.json").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        sweep.run([*configs, "--out", str(out), "seed=3"])
    assert exit_info.value.code == 1
    assert "skipped   " in capfd.readouterr().out
    assert (tmp_path / "runs" / "first" / "metrics.json").stat().st_mtime_ns == finished_at

    # interrupted runs: one with a resume point continues from it, one stopped before its first restarts
    (tmp_path / "runs" / "first" / "metrics.json").unlink()
    (tmp_path / "runs" / "third" / "metrics.json").unlink()
    shutil.rmtree(tmp_path / "runs" / "third" / "checkpoints" / "resume")
    assert sweep.main([configs[0], configs[2], "--out", str(out), "seed=3", "--group", "first+broken+third"]) == {
        tmp_path / "runs" / "first": "resumed", tmp_path / "runs" / "third": "finished"}
    assert "third: restarting (no resume point yet)" in capfd.readouterr().out

    # a finished run is only skipped for the config it was run with
    with pytest.raises(UserError, match=r"runs/first has finished with another config \(it differs in seed\)"):
        sweep.main([configs[0], "--out", str(out), "seed=4", "--group", "first+broken+third"])


@pytest.mark.slow
def test_sweep_seeds_run_each_config_once_per_seed_into_one_row(tmp_path, tiny_bert, reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, name="seeded", train={"epochs": 1})
    out = tmp_path / "training_results"
    outcomes = sweep.main([str(config), "--seeds", "1", "2", "--out", str(out)])
    assert sorted(path.name for path in outcomes) == ["seeded_seed1", "seeded_seed2"]
    splits = [json.loads((tmp_path / "runs" / name / "split.json").read_text()) for name in ("seeded_seed1", "seeded_seed2")]
    assert splits[0]["test"] == splits[1]["test"]  # other training seeds, one shared test set
    metrics = [json.loads((tmp_path / "runs" / name / "metrics.json").read_text()) for name in ("seeded_seed1", "seeded_seed2")]
    assert [m["seed"] for m in metrics] == [1, 2] and {m["split_seed"] for m in metrics} == {42}
    assert _table_rows(out / "exp_1" / "README.md")["seeded"]["seeds"] == "2"
    assert set(sweep.main([str(config), "--seeds", "1", "2", "--out", str(out)]).values()) == {"skipped"}


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
                                  "missing output folder", "existing output file", "output is a folder",
                                  "damaged checkpoint", "empty review", "missing tokenizer"])
def test_predict_bad_input_is_one_line(case, finished, tmp_path, monkeypatch, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((finished / "bert_b8" / "config.yaml").read_text())
    (unfinished / "run.json").write_text((finished / "bert_b8" / "run.json").read_text())
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "notext.csv").write_text("review,stars\ngood,5\n")
    (tmp_path / "latin1.txt").write_bytes("très bon film".encode("latin-1"))
    (tmp_path / "reviews.docx").write_text("x")
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n{"review": "no text key"}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "dir.csv").mkdir()
    damaged = tmp_path / "damaged"
    shutil.copytree(finished / "bert_b8", damaged)
    (damaged / "checkpoints" / "best.safetensors").write_bytes(b"\0" * 100)
    untokenized = tmp_path / "untokenized"
    shutil.copytree(finished / "bert_b8", untokenized)
    (untokenized / "model" / "tokenizer.json").unlink()
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
        "missing output folder": ([run, "good", "--out", str(tmp_path / "no" / "p.csv")], "no does not exist"),
        "existing output file": ([run, "good", "--out", str(tmp_path / "notext.csv")], "exists; pass --overwrite"),
        "output is a folder": ([run, "good", "--out", str(tmp_path / "dir.csv")], "is a folder"),
        "damaged checkpoint": ([str(damaged), "good"], "best.safetensors is damaged or replaced"),
        "empty review": ([run, "good", "  "], "review 2 is empty"),
        "missing tokenizer": ([str(untokenized), "good"], "tokenizer.json is missing"),
    }[case]
    monkeypatch.setattr(sys, "argv", ["predict.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict.main)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


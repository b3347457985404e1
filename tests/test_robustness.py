"""What a run directory is, checked as deeply as what it holds: the writer's lock survives tidying tools, a best
checkpoint is verified wherever it is read, an interrupted --overwrite can be repeated, stray folders are ignored,
and faults during writes are one line naming the file. (tests/test_bad_input.py has the one-line refusals.)"""

import json
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from exp_1 import main as exp1
from imdb_grad_accum import predict, results, sweep
from imdb_grad_accum.cli import run_cli
from imdb_grad_accum.errors import UserError, WriteFailed
from imdb_grad_accum.files import write_file
from imdb_grad_accum.rundir import RunDir


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: a file that still loads, with other weights
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert):
    from conftest import write_reviews

    root = tmp_path_factory.mktemp("robust")
    config = tiny_config(root, tiny_bert, write_reviews(root / "reviews"), train={"epochs": 1})
    exp1.main(["--config", str(config)])
    return config, root / "runs" / "tiny"


def _one_line(main, argv, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["x.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return exit_info.value.code, err


def test_a_damaged_best_checkpoint_is_refused_by_predict_load_run_and_results(finished_run, tmp_path, monkeypatch,
                                                                              capsys):
    from imdb_grad_accum.model import load_run

    copy = tmp_path / "run"
    shutil.copytree(finished_run[1], copy)
    [(label, probability)] = predict.main([str(copy), "good"])  # intact: it answers
    assert label in ("negative", "positive") and 0.5 <= probability <= 1
    _damage(copy / "checkpoints" / "best.safetensors")
    code, err = _one_line(predict.main, [copy, "A fine film."], monkeypatch, capsys)
    assert code == 2 and "best.safetensors is damaged or replaced" in err
    with pytest.raises(UserError, match="is damaged or replaced"):
        load_run(copy)
    with pytest.raises(UserError, match="best.safetensors is damaged, replaced or missing"):
        results.main([str(copy), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("reader", ["results", pytest.param("sweep", marks=pytest.mark.slow)])
def test_a_finished_folder_without_the_marker_is_never_a_result(reader, finished_run, tmp_path):
    config, run = finished_run
    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(run, copy)
    (copy / "run.json").unlink()
    if reader == "results":
        with pytest.raises(UserError, match="is not a run directory of this project"):
            results.main([str(copy), "--out", str(tmp_path / "out")])
        return
    before = sorted(p.name for p in copy.rglob("*"))
    with pytest.raises(UserError, match="exists and is not a run directory"):  # before any run starts
        sweep.main([str(config), f"output_dir={tmp_path / 'runs'}", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and sorted(p.name for p in copy.rglob("*")) == before


def test_results_refuse_files_with_values_of_the_wrong_type(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run[1], copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    (copy / "metrics.json").write_text(json.dumps({**metrics, "test_accuracy": "high"}))
    with pytest.raises(UserError, match="metrics.json lacks or mistypes test_accuracy"):
        results.main([str(copy), "--out", str(tmp_path / "out")])
    (copy / "metrics.json").write_text(json.dumps(metrics))
    (copy / "history.jsonl").write_text('{"step": 1, "train/loss": "low"}\n')
    with pytest.raises(UserError, match="history.jsonl is missing or damaged .line 1 is not a record of numbers"):
        results.main([str(copy), "--out", str(tmp_path / "out")])


def test_an_interrupted_overwrite_can_be_repeated(finished_run, tmp_path, monkeypatch):
    """Killed midway through removing what the run wrote, --overwrite keeps run.json (its record) to the last, so the
    same command repairs the run; what else may be in the tree is test_ownership.py's."""
    config, run = finished_run
    runs = tmp_path / "runs"
    shutil.copytree(run, runs / "tiny")
    real_unlink, calls = Path.unlink, []

    def killed_midway(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed during --overwrite")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        exp1.main(["--config", str(config), f"output_dir={runs}", "--overwrite"])
    monkeypatch.undo()
    assert RunDir(runs / "tiny").is_run()  # the marker goes last, so the folder is still this project's
    exp1.main(["--config", str(config), f"output_dir={runs}", "--overwrite"])
    assert (runs / "tiny" / "metrics.json").is_file()


def test_stray_folders_in_the_resume_points_are_ignored_and_the_real_ones_kept(tmp_path, tiny_bert, reviews_dir):
    """A folder the run did not record in checkpoints/resume (named like a point or not) is not a resume point: it is
    neither used nor counted, so the real points are not deleted to make room for it; --overwrite refuses it."""
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, checkpoint={"every_steps": 5, "keep_resume_points": True},
                         train={"epochs": 1})
    exp1.main(["--config", str(config)])
    run = RunDir(tmp_path / "runs" / "tiny")
    for stray in ("000999", "point-999999", "point-backup"):
        (run.resume_dir / stray).mkdir()
        (run.resume_dir / stray / "my_notes.txt").write_text("mine")
    real = [p.name for p in run.resume_points()]
    assert len(real) == 2 and all(p.startswith("point-0") for p in real)
    (run.path / "metrics.json").unlink()
    exp1.main(["--config", str(config), "--resume"])
    assert all((run.resume_dir / stray / "my_notes.txt").read_text() == "mine"
               for stray in ("000999", "point-999999", "point-backup"))
    assert len(run.resume_points()) == 2
    with pytest.raises(UserError, match="holds files this project did not write .checkpoints/resume/000999"):
        exp1.main(["--config", str(config), "--overwrite"])


@pytest.mark.parametrize("how", ["replaced", pytest.param("removed", marks=pytest.mark.slow)])
def test_removing_or_replacing_the_lock_stops_the_writer_and_a_newcomer_waits(how, tmp_path, tiny_bert, reviews_dir,
                                                                             fork_server):
    """A tidying tool deletes .lock (then another recreates it) while a run trains: a second start is refused while
    the first lives (it is paused here, so that it is certainly alive), and the first stops in one line at its next
    write instead of writing on beside it. The run then resumes and ends with every step once."""
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, checkpoint={"every_steps": 5},
                         train={"epochs": 1, "batch_size": 4})
    run = tmp_path / "runs" / "tiny"
    for replace in {"removed": (False, True), "replaced": (True,)}[how]:
        first = fork_server.start("exp1", ["--config", config, "--continue"])
        started = time.time()
        while first.running() and not (run.joinpath("history.jsonl").exists()
                                       and run.joinpath("history.jsonl").stat().st_mtime >= started):
            time.sleep(0.01)
        assert first.running(), first.wait()[1][-2000:]
        first.signal(signal.SIGSTOP)
        (run / ".lock").unlink()
        if replace:
            (run / ".lock").write_text("")
        code, output = fork_server.start("exp1", ["--config", config, "--resume"]).wait(120)
        # the folder's lock still holds; the holder's description was in the .lock that was replaced
        assert code == 2 and "is in use by " in output, output[-2000:]
        first.signal(signal.SIGCONT)
        code, output = first.wait(300)
        stopped = [line for line in output.splitlines() if line.startswith("stopped: ")]
        assert code == 1 and len(stopped) == 1 and "was removed or replaced while this process wrote" in stopped[0], \
            output[-2000:]
    code, output = fork_server.start("exp1", ["--config", config, "--continue"]).wait(300)
    assert code == 0, output[-2000:]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history if "train/loss" in h]
    assert steps == list(range(1, json.loads((run / "metrics.json").read_text())["optimizer_steps"] + 1))


def _limited(write, size: int):
    """`write` under a file-size limit of `size` bytes for this process (EFBIG, as a full disk gives ENOSPC)."""
    def limited(*args):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
        try:
            return write(*args)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return limited


def test_a_full_disk_while_model_is_written_names_the_folder_and_leaves_no_half_file(tmp_path, tiny_bert,
                                                                                    reviews_dir, capsys, monkeypatch):
    """A file-size limit (EFBIG, as a full disk gives ENOSPC) set while this process writes model/ (tokenizer.json is
    ~700 kB): one line naming model/, and no tokenizer.json under its real name."""
    from imdb_grad_accum.writer import RunWriter

    config = tiny_config(tmp_path, tiny_bert, reviews_dir)
    monkeypatch.setattr(RunWriter, "write_model_parts", _limited(RunWriter.write_model_parts, 200_000))
    code, err = _one_line(exp1.main, ["--config", config], monkeypatch, capsys)
    assert code == 1 and "cannot write" in err and str(tmp_path / "runs" / "tiny" / "model") in err, err
    assert "--resume" in err and not (tmp_path / "runs" / "tiny" / "model").exists()
    assert not [p for p in (tmp_path / "runs" / "tiny" / ".tmp").iterdir() if "model" in p.name]


def test_predict_on_a_full_disk_says_so_without_advice_it_has_no_flag_for(finished_run, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setattr(predict, "write_predictions", _limited(predict.write_predictions, 100))
    code, err = _one_line(predict.main, [finished_run[1], "A long review " * 20, "--out", tmp_path / "p.csv"],
                          monkeypatch, capsys)
    assert code == 1 and "cannot write" in err and "free some space" in err and "--resume" not in err, err
    assert not (tmp_path / "p.csv").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_write_on_a_read_only_filesystem_is_one_line_even_when_the_cleanup_fails(tmp_path, monkeypatch):
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(WriteFailed, match=r"cannot write .*metrics.json: Read-only file system; make it writable"):
        write_file(tmp_path / "metrics.json", "{}")


def test_predict_reads_a_csv_field_longer_than_the_csv_default(finished_run, tmp_path):
    review = "a wonderful film " * 10_000  # 170 kB, past Python's 128 kB field limit
    (tmp_path / "long.csv").write_text(f'text\n"{review}"\n"dull"\n')
    assert len(predict.main([str(finished_run[1]), "--file", str(tmp_path / "long.csv")])) == 2

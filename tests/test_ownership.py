"""Nothing is deleted that the project did not write, by any command that deletes: a run owns what its run.json
records (and what WandB wrote for it), --overwrite removes exactly that and refuses anything else in one line,
keeping it; WandB's own files never block the documented recovery; export and results replace only their own.

Sabotage each of these guards against: deciding ownership by name patterns again (a user's folder named like a
WandB run, a file named like a temporary file, a run made inside another run's wandb/ would be deleted), following a
link, removing before checking what can be removed, or export reusing a fixed name beside its target."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from exp_1 import main as exp1
from imdb_grad_accum import export, results
from imdb_grad_accum.cli import run_cli
from imdb_grad_accum.errors import UserError, WriteFailed
from imdb_grad_accum.rundir import RunDir


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink(), p.stat().st_mtime_ns if not p.is_symlink() else 0)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, tiny_bert):
    """A finished run that logged to WandB offline: its wandb/ holds WandB's links, one of them out of the tree."""
    from conftest import write_reviews

    root = tmp_path_factory.mktemp("owned")
    config = tiny_config(root, tiny_bert, write_reviews(root / "reviews"), train={"epochs": 1},
                         tracking={"wandb_mode": "offline"}, checkpoint={"keep_resume_points": True})
    exp1.main(["--config", str(config)])
    run = root / "runs" / "tiny"
    links = [p for p in run.rglob("*") if p.is_symlink()]
    assert any(not os.readlink(p).startswith(("offline-run", "run-")) for p in links), "WandB made no outside link"
    return config, run


def _copy(offline_run, tmp_path) -> tuple[Path, Path]:
    config, run = offline_run
    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(run, copy, symlinks=True)
    return config, copy


def test_overwrite_of_a_wandb_offline_run_removes_what_it_wrote_and_starts_afresh(offline_run, tmp_path):
    config, run = _copy(offline_run, tmp_path)
    old_id = RunDir(run).marker()["id"]
    exp1.main(["--config", str(config), f"output_dir={run.parent}", "--overwrite"])
    assert RunDir(run).marker()["id"] != old_id and (run / "metrics.json").is_file()
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # the old WandB run went with the old run


@pytest.mark.parametrize("foreign", ["wandb/offline-run-20260101_000000-someoneelse/notes.txt",
                                     "wandb/my_notes.md", "checkpoints/.best.safetensors.abc123.tmp",
                                     ".metrics.json.tmp", "predictions/mine/analysis.md", "a_run_inside"])
def test_overwrite_refuses_anything_the_run_did_not_record_and_keeps_it(foreign, offline_run, tmp_path, monkeypatch,
                                                                        capfd):
    """A user's folder named like a WandB run, files named like the project's temporary files, notes beside the
    project's files, and a finished run made inside another run: none was recorded, so none is deleted."""
    config, run = _copy(offline_run, tmp_path)
    if foreign == "a_run_inside":
        shutil.copytree(run, tmp_path / "inside", symlinks=True)
        shutil.move(str(tmp_path / "inside"), run / "wandb" / "inside")
        foreign = "wandb/inside"
    else:
        (run / foreign).parent.mkdir(parents=True, exist_ok=True)
        (run / foreign).write_text("mine")
    before = _tree(run)
    monkeypatch.setattr(sys, "argv", ["main.py", "--config", str(config), f"output_dir={run.parent}", "--overwrite"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(exp1.main)
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2 and out == "" and err.count("\n") == 1
    assert "holds files this project did not write" in err and foreign.split("/")[0] in err, err
    assert _tree(run) == before


@pytest.mark.parametrize("again", ["--continue", pytest.param("a sweep", marks=pytest.mark.slow)])
def test_a_wandb_run_killed_before_its_first_resume_point_starts_again(again, tmp_path, tiny_bert, reviews_dir,
                                                                       fork_server):
    """Killed once its history shows training (no resume point yet): --continue starts it again, over what WandB left
    (offline, with its link out of the tree), and so does a sweep. Sabotage: calling WandB's files foreign."""
    from imdb_grad_accum import sweep

    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"epochs": 1}, tracking={"wandb_mode": "offline"})
    run = tmp_path / "runs" / "tiny"
    assert fork_server.start("exp1", ["--config", config], kill_at=("step", 1)).wait()[0] is None  # killed
    assert not RunDir(run).resume_points() and list((run / "wandb").glob("offline-run-*"))
    if again == "--continue":
        code, output = fork_server.start("exp1", ["--config", config, "--continue"]).wait(300)
        assert code == 0, output[-3000:]
    else:
        assert sweep.main([str(config), "--out", str(tmp_path / "results")]) == {run: "finished"}
    assert (run / "metrics.json").is_file()


def test_overwrite_checks_everything_can_be_removed_before_removing_anything(offline_run, tmp_path, monkeypatch):
    """A file that cannot be removed (an immutable file, a read-only mount) is one line naming it, and repeating the
    command once it can be repairs the run: run.json, which lists what is the run's, goes last."""
    config, run = _copy(offline_run, tmp_path)
    stubborn = run / "checkpoints" / "best.safetensors"
    real_unlink = Path.unlink

    def refuses(self, *args, **kwargs):
        if self == stubborn:
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refuses)
    with pytest.raises(WriteFailed, match=r"cannot remove .*best.safetensors: Operation not permitted.*repeat the command"):
        exp1.main(["--config", str(config), f"output_dir={run.parent}", "--overwrite"])
    monkeypatch.undo()
    assert RunDir(run).is_run() and not (run / "metrics.json").exists()
    exp1.main(["--config", str(config), f"output_dir={run.parent}", "--overwrite"])
    assert (run / "metrics.json").is_file()

    read_only = run / "predictions"
    monkeypatch.setattr(os, "statvfs", lambda path: type("S", (), {"f_flag": os.ST_RDONLY if str(path) == str(read_only)
                                                                  else 0})())
    before = _tree(run)
    with pytest.raises(UserError, match=r"--overwrite: .*predictions/test.csv cannot be removed .read-only filesystem"):
        exp1.main(["--config", str(config), f"output_dir={run.parent}", "--overwrite"])
    assert _tree(run) == before


def test_a_lock_that_became_a_folder_and_a_linked_predictions_folder_are_one_line(offline_run, tmp_path, capfd,
                                                                                 monkeypatch):
    config, run = _copy(offline_run, tmp_path)
    (run / "metrics.json").unlink()  # as if the run had stopped before its end, with its resume points kept
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = [("lock", "is a folder, not the run's lock file"), ("predictions", "is a link, and this run writes only")]
    for case, message in cases:
        if case == "lock":
            (run / ".lock").unlink()
            (run / ".lock").mkdir()
        else:
            shutil.rmtree(run / ".lock")
            shutil.rmtree(run / "predictions")
            (run / "predictions").symlink_to(outside)
        monkeypatch.setattr(sys, "argv", ["main.py", "--config", str(config), f"output_dir={run.parent}",
                                          "--overwrite" if case == "lock" else "--continue"])
        with pytest.raises(SystemExit):
            run_cli(exp1.main)
        out, err = capfd.readouterr()
        assert err.count("\n") == 1 and message in err, err
    assert list(outside.iterdir()) == []  # nothing was written through the link


def test_export_never_deletes_a_folder_it_did_not_make(offline_run, tmp_path):
    """A user's `.exported.old` beside the target (the name export once used for the previous export) survives an
    export --overwrite; so does everything else beside it."""
    run = offline_run[1]
    out = tmp_path / "exported"
    export.main([str(run), str(out)])
    (tmp_path / ".exported.old").mkdir()
    (tmp_path / ".exported.old" / "mine.txt").write_text("mine")
    export.main([str(run), str(out), "--overwrite"])
    assert (tmp_path / ".exported.old" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".exported.old", "exported"]


def test_results_write_outside_runs_and_replace_only_their_own_folders(offline_run, tmp_path):
    run = offline_run[1]
    with pytest.raises(UserError, match="is inside the run directory"):
        results.main([str(run), "--out", str(run / "tables")])
    out = tmp_path / "tables"
    (out / "exp_1").mkdir(parents=True)
    (out / "exp_1" / "notes.md").write_text("mine")
    with pytest.raises(UserError, match="exp_1 holds what results did not write .notes.md"):
        results.main([str(run), "--out", str(out)])
    assert (out / "exp_1" / "notes.md").read_text() == "mine"
    (out / "exp_1" / "notes.md").unlink()
    results.main([str(run), "--out", str(out)])
    assert (out / "exp_1" / "README.md").is_file()


@pytest.mark.parametrize("command", ["predict", "export", "results", "evaluate"])
def test_a_run_without_the_recorded_checksum_of_its_best_weights_is_not_trusted(command, offline_run, tmp_path,
                                                                             monkeypatch, capfd):
    """metrics.json without best_sha256 and a byte of best.safetensors flipped: every command refuses it in one line
    instead of answering from weights it cannot verify."""
    from imdb_grad_accum import evaluate, predict

    _, run = _copy(offline_run, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["best_sha256"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    best = run / "checkpoints" / "best.safetensors"
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 1
    best.unlink()  # a link shared with last.safetensors: damage only this name
    best.write_bytes(bytes(data))
    argv = {"predict": [run, "a fine film"], "export": [run, tmp_path / "out"],
            "results": [run, "--out", tmp_path / "out"], "evaluate": [run, "--data", offline_run[0].parent / "reviews",
                                                                     "--out", tmp_path / "out"]}[command]
    main = {"predict": predict.main, "export": export.main, "results": results.main, "evaluate": evaluate.main}[command]
    monkeypatch.setattr(sys, "argv", ["x", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2 and out == "" and err.count("\n") == 1, err
    assert "best_sha256" in err and "cannot be trusted" in err
    assert not (tmp_path / "out").exists()

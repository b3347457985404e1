"""Crash safety: whatever stops a run (SIGKILL at any moment, SIGTERM, Ctrl-C, a full disk, a lost peer process, a
killed sweep or launcher) loses nothing that was saved, and --resume ends exactly where an uninterrupted run ends.
Damaged resume points and checkpoints are detected, never used."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT, tiny_config
from exp_1 import main as exp1
from imdb_grad_accum.errors import RunStopped, UserError
from imdb_grad_accum.rundir import RunDir
from exp_2 import main as exp2

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]
SCRIPTS = {"exp1": [sys.executable, str(PROJECT / "exp_1" / "main.py")],
           "exp2": [sys.executable, str(PROJECT / "exp_2" / "main.py")],
           "accelerate": [*LAUNCH, "--num_processes", "1", str(PROJECT / "exp_2" / "main_accelerate.py")],
           "accelerate x2": [*LAUNCH, "--multi_gpu", "--num_processes", "2",
                             str(PROJECT / "exp_2" / "main_accelerate.py")]}
ACCUMULATE = ["train.batch_size=2", "train.grad_accum_steps=2"]
TIMING = ("time", "train/tokens_per_s")  # wall-clock facts, the only things allowed to differ


def _history(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "history.jsonl").read_text().splitlines()]


def _same_results(a: Path, b: Path) -> None:
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    for key in ("test_loss", "test_accuracy", "test_f1", "best_epoch", "best_step", "stopped_early_at", "optimizer_steps",
                "n_test"):
        assert ma[key] == mb[key], key
    assert _history(a) == _history(b)
    assert (a / "predictions" / "test.csv").read_text() == (b / "predictions" / "test.csv").read_text()
    assert (a / "checkpoints" / "best.safetensors").read_bytes() == (b / "checkpoints" / "best.safetensors").read_bytes()


def _start(script: str, config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if script == "accelerate x2" else os.environ
    return subprocess.Popen([*SCRIPTS[script], "--config", str(config), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)


def _fork(server, script: str, config: Path, *args: str):
    """The same run in a process forked from the fork server (real, killable, but without the import time)."""
    entry, processes = {"exp1": ("exp1", 1), "exp2": ("exp2", 1), "accelerate x2": ("accelerate", 2)}[script]
    return server.start(entry, ["--config", config, *args], processes)


def _finished(run, timeout: float = 600) -> str:
    code, output = run.wait(timeout)
    assert code == 0, output[-3000:]
    return output


def _wait_until_training(process, run: Path, since: float, timeout: float = 300) -> None:
    """Until the process writes its history (it trains, or has just restored a resume point)."""
    running = process.running if hasattr(process, "running") else lambda: process.poll() is None
    deadline = time.time() + timeout
    while running() and time.time() < deadline:
        if (run / "history.jsonl").exists() and (run / "history.jsonl").stat().st_mtime > since:
            return
        time.sleep(0.005)


def _newest_point(run: Path) -> dict:
    point = RunDir(run).resume_points()[0]
    return json.loads((point / "trainer.json").read_text())["state"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_bert, fork_server):
    """A config with dropout on (so RNG states must resume too) and frequent resume points, and its uninterrupted
    runs, each made once per script and reused by the tests that compare with it."""
    from conftest import write_reviews

    root = tmp_path_factory.mktemp("resume")
    config = tiny_config(root, tiny_bert, write_reviews(root / "reviews"), checkpoint={"every_steps": 2},
                         model={"dropout": 0.1, "encoder_dropout": None}, train={"epochs": 2, "log_every": 2})
    wholes = {}

    def whole(script: str, extra: tuple = ()) -> Path:
        name = f"whole_{script.replace(' ', '')}_{abs(hash(extra)) % 10**8}"
        if name not in wholes:
            _finished(_fork(fork_server, script, config, f"name={name}", *extra))
            wholes[name] = root / "runs" / name
        return wholes[name]

    return config, root / "runs", whole


# ----------------------------------------------------------------------------------------------- SIGKILL soak

SOAKED = {"exp1": ["train.batch_size=4"], "exp2": ACCUMULATE, "accelerate x2": ACCUMULATE}
CONTROLS = ["train.eval_every_steps=15", "train.early_stopping_patience=2"]  # mid-epoch validations, early stop


def test_kills_aimed_at_training_a_validation_a_point_and_the_test_each_resumed_end_exactly(workspace, fork_server):
    """SIGKILL where a kill hurts, aimed by what the run has done: after an optimizer step mid-epoch, as a mid-epoch
    validation starts, right after an epoch's resume point is written (before last/best are linked to it), and as
    the test starts; each time --resume must resume (it says so) and the run ends exactly like an uninterrupted one,
    with validations every 15 steps and early stopping on. Sabotage: a resume point that omits the scheduler, the
    RNG, the position in the data order or the early-stopping count, or that skips restoring last/best."""
    config, runs, whole = workspace
    extra = SOAKED["exp1"] + CONTROLS
    reference = whole("exp1", tuple(extra))
    assert json.loads((reference / "metrics.json").read_text())["stopped_early_at"], "early stopping never happened"
    run = runs / "aimed"
    # 45 steps an epoch; validations at 15, 30, 45 (the epoch's end), 60, 75 (early stop); points every 2 steps.
    # Killed after step 7; as validation 30 starts (resumed from 6); right after the point of step 45, the 9th
    # saved after resuming from 28; as the test starts (resumed from 44 or 45).
    for n, (kill_at, newest) in enumerate([(("step", 7), 6), (("validation", 2), 28), (("point", 9), 45),
                                           (("test", 1), 75)]):
        process = fork_server.start("exp1", ["--config", config, f"name={run.name}", *(["--resume"] if n else []),
                                             *extra], kill_at=kill_at)
        code, output = process.wait()
        assert code is None, f"{kill_at}: the run was not killed\n" + output[-3000:]
        assert not n or "resuming" in output, output[-3000:]
        assert _newest_point(run)["step"] == newest, kill_at
    code, output = fork_server.start("exp1", ["--config", config, f"name={run.name}", "--resume", *extra]).wait()
    assert code == 0 and "resuming" in output, output[-3000:]
    _same_results(reference, run)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["exp1", "exp2", "accelerate x2"])
def test_20_sigkills_at_random_moments_each_resumed_end_exactly_like_an_uninterrupted_run(script, workspace,
                                                                                          fork_server):
    """SIGKILL at random moments (training, a resume point or checkpoint write, a validation mid-epoch or at an
    epoch's end, the test) until the run finishes, each time followed by the same command with --resume (or afresh
    while no resume point exists yet), with validations every 15 steps and early stopping on. Accelerate's two
    processes are killed together, as a pre-empted machine would be. The moments are drawn within a twentieth of the
    uninterrupted run's wall time, so that on any CPU the run is killed at least 20 times before it ends."""
    config, runs, whole = workspace
    kills = 20
    extra = SOAKED[script] + CONTROLS + ["train.epochs=4"]
    reference = whole(script, tuple(extra))
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["stopped_early_at"], "early stopping never happened"
    run = runs / f"soak_{script.replace(' ', '')}_{kills}"
    rng = random.Random(len(script) + kills)
    killed, finished = 0, False
    while not finished and killed < 20 * kills:  # bounded: a run that never gets further fails, not hangs
        flag = ["--resume"] if RunDir(run).resume_points() else ["--overwrite"] if run.exists() else []
        started = time.time()
        process = _fork(fork_server, script, config, f"name={run.name}", *flag, *extra)
        _wait_until_training(process, run, started)
        time.sleep(rng.uniform(0, metrics["wall_seconds"] / kills))
        if process.running():
            process.signal(signal.SIGKILL)
            killed += 1
        code, output = process.wait()
        assert code in (0, None), output[-3000:]
        finished = (run / "metrics.json").exists()
    print(f"{script}: {killed} SIGKILLs, then {'finished' if finished else 'still not finished'}")
    assert finished and killed >= kills
    _same_results(reference, run)


# ----------------------------------------------------------------------------------------------- signals and faults

def test_sigterm_saves_a_resume_point_exits_143_and_resumes_exactly(workspace, fork_server):
    config, runs, whole = workspace
    run = runs / "terminated"
    extra = SOAKED["exp1"] + CONTROLS  # the soak's: its uninterrupted run serves both
    process = fork_server.start("exp1", ["--config", config, f"name={run.name}", *extra],
                                kill_at=("step", 10, signal.SIGTERM))  # seen at step 10's log
    code, output = process.wait(60)
    assert code == 143, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "terminated (SIGTERM) after optimizer step" in stopped[0] and "Traceback" not in output
    step = int(stopped[0].split("optimizer step ")[1].split(";")[0])
    assert step == 10 and _newest_point(run)["step"] == 10  # a resume point where it stopped
    _finished(_fork(fork_server, "exp1", config, f"name={run.name}", "--resume", *extra))
    _same_results(whole("exp1", tuple(extra)), run)


def test_ctrl_c_is_one_line_with_exit_130(workspace, fork_server):
    config, runs, _ = workspace
    run = runs / "interrupted"
    process = fork_server.start("exp1", ["--config", config, f"name={run.name}"],
                                kill_at=("step", 3, signal.SIGINT))  # what a terminal sends on Ctrl-C
    code, output = process.wait(60)
    ending = "interrupted (Ctrl-C): what was saved is kept; continue with the same command and --resume (or start " \
             "again if no resume point was saved yet)"
    assert code == 130 and output.strip().splitlines()[-1] == ending, output[-3000:]
    assert output.count("interrupted") == 1 and "Traceback" not in output


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_the_run_resumes_exactly(workspace, fork_server):
    """The kernel refuses writes beyond a file-size limit set on the running process (EFBIG, as ENOSPC would be for a
    full disk); the weights of the next resume point cannot be written."""
    config, runs, whole = workspace
    run = runs / "full_disk"
    process = _fork(fork_server, "exp1", config, f"name={run.name}", "train.batch_size=4")
    while process.running() and not RunDir(run).resume_points():
        time.sleep(0.005)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (100_000, 100_000))  # weights are ~4 MB
    code, output = process.wait(120)
    assert code == 1, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "Traceback" not in output, output[-3000:]
    assert "cannot write" in stopped[0] and ".safetensors" in stopped[0] and "--resume" in stopped[0]
    _finished(_fork(fork_server, "exp1", config, f"name={run.name}", "--resume", "train.batch_size=4"))
    _same_results(whole("exp1", ("train.batch_size=4",)), run)


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return children


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                alive.append(pid)
        except OSError:
            continue
    return alive


@pytest.mark.slow
def test_a_stopped_peer_process_ends_a_two_process_run_within_the_peer_timeout(workspace):
    config, runs, _ = workspace
    run = runs / "lost_peer"
    started = time.time()
    process = _start("accelerate x2", config, f"name={run.name}", "train.peer_timeout=10", *ACCUMULATE)
    _wait_until_training(process, run, started)
    ranks = _children(process.pid)
    assert len(ranks) == 2
    stopped_at = time.time()
    os.kill(ranks[-1], signal.SIGSTOP)  # alive but never answering, like a hung machine
    try:
        _, err = process.communicate(timeout=150)
    finally:
        for pid in _alive(ranks):
            os.kill(pid, signal.SIGKILL)
    print(f"the run ended {time.time() - stopped_at:.0f} s after a peer stopped (peer_timeout 10 s)")
    assert process.returncode != 0
    assert "a process of this run failed or stopped answering" in err and "continue with --resume" in err


@pytest.mark.slow
def test_a_killed_launcher_takes_its_training_processes_with_it(workspace, fork_server):
    config, runs, whole = workspace
    run = runs / "orphans"
    started = time.time()
    process = _start("accelerate x2", config, f"name={run.name}", *ACCUMULATE)
    _wait_until_training(process, run, started)
    ranks = _children(process.pid)
    process.kill()  # the launcher only: its training processes are not signalled by anyone
    process.communicate()
    deadline = time.time() + 60
    while _alive(ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(ranks), "training processes outlived their launcher"
    assert RunDir(run).holder() == ""
    _finished(_fork(fork_server, "accelerate x2", config, f"name={run.name}", "--resume", *ACCUMULATE))
    _same_results(whole("accelerate x2", tuple(ACCUMULATE)), run)


@pytest.mark.slow
def test_a_killed_sweep_takes_its_run_with_it_and_its_rerun_resumes_exactly(workspace):
    config, runs, whole = workspace
    run = runs / "swept"
    sweep = [sys.executable, "-m", "imdb_grad_accum.sweep", str(config), f"name={run.name}",
             "train.batch_size=4", "--out", str(runs.parent / "results")]
    started = time.time()
    process = subprocess.Popen(sweep, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_until_training(process, run, started)
    process.kill()  # the sweep only, as `kill -9 <sweep pid>` would
    process.communicate()
    deadline = time.time() + 60
    while RunDir(run).holder() and time.time() < deadline:
        time.sleep(0.1)
    assert RunDir(run).holder() == "", "the sweep's training process outlived it"
    rerun = subprocess.run(sweep, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    history = _history(run)
    assert sum("train/loss" in h for h in history) * 2 >= metrics["optimizer_steps"]  # log_every 2: no record twice
    assert [h["epoch"] for h in history if "val/loss" in h] == [1, 2]
    _same_results(whole("exp1", ("train.batch_size=4",)), run)


def test_two_simultaneous_starts_of_one_run_let_exactly_one_train(workspace, fork_server):
    config, runs, _ = workspace
    first, second = (_fork(fork_server, "exp1", config, "name=twice") for _ in range(2))
    (code_a, out_a), (code_b, out_b) = first.wait(), second.wait()
    assert sorted([code_a, code_b]) == [0, 2], (out_a[-2000:], out_b[-2000:])
    refused = out_a if code_a == 2 else out_b
    assert "is in use by process" in refused or "already holds results" in refused
    metrics = json.loads((runs / "twice" / "metrics.json").read_text())
    assert sum("train/loss" in h for h in _history(runs / "twice")) * 2 >= metrics["optimizer_steps"]


# ----------------------------------------------------------------------------------------------- damaged files

STOPPED = [*ACCUMULATE, "checkpoint.every_steps=10"]  # fewer points to write: the faults below need two


@pytest.fixture(scope="module")
def stopped_run(workspace):
    """An exp_2 run stopped (in this process) at optimizer step 57 of 90, in epoch 2, with its uninterrupted twin."""
    config, runs, _ = workspace
    exp2.main(["--config", str(config), "name=inprocess_whole", *STOPPED])
    from imdb_grad_accum.loop import TrainingState

    real = TrainingState.step_done

    def stops_at_57(self, *step):
        real(self, *step)
        if self.step == 57:
            raise KeyboardInterrupt("simulated kill")

    TrainingState.step_done = stops_at_57
    try:
        with pytest.raises(KeyboardInterrupt):
            exp2.main(["--config", str(config), "name=inprocess_stopped", *STOPPED])
    finally:
        TrainingState.step_done = real
    return config, runs / "inprocess_whole", runs / "inprocess_stopped"


@pytest.fixture
def stopped(stopped_run, tmp_path):
    """A fresh copy of the stopped run for one test to damage."""
    import shutil

    config, reference, stopped = stopped_run
    copy = Path(str(stopped) + f"_{tmp_path.name}")
    shutil.copytree(stopped, copy)
    return config, reference, copy


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", ["model.safetensors", *(pytest.param(f, marks=pytest.mark.slow) for f in (
    "manifest.json", "optimizer.safetensors", "rng_0.safetensors", "trainer.json", "history.jsonl"))])
def test_a_damaged_resume_point_falls_back_to_the_previous_one_in_one_line(file, stopped, capsys):
    config, reference, run = stopped
    newest, previous = RunDir(run).resume_points()[:2]
    _damage(newest / file)
    exp2.main(["--config", str(config), f"name={run.name}", "--resume", *STOPPED])
    said = [line for line in capsys.readouterr().out.splitlines() if "unusable" in line]
    assert said == [f"resume point {newest.name} is unusable ({'manifest.json is missing or damaged' if file == 'manifest.json' else file + ': checksum differs'}); using the previous one, {previous.name}"]
    _same_results(reference, run)


def test_no_usable_resume_point_is_one_line_and_changes_nothing(stopped):
    config, _, run = stopped
    for point in RunDir(run).resume_points():
        _damage(point / "optimizer.safetensors")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"no usable resume point .*\(point-\d+ is unusable \(optimizer.safetensors: "
                                        r"checksum differs\); point-\d+ is unusable"):
        exp2.main(["--config", str(config), f"name={run.name}", "--resume", *STOPPED])
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_damaged_best_checkpoint_is_restored_from_the_resume_point_it_is_kept_in(stopped):
    config, reference, run = stopped
    _damage(run / "checkpoints" / "best.safetensors")
    exp2.main(["--config", str(config), f"name={run.name}", "--resume", *STOPPED])
    _same_results(reference, run)


def test_a_damaged_best_checkpoint_no_point_can_restore_stops_the_resume_before_any_training(stopped):
    config, _, run = stopped
    for copy in [run / "checkpoints" / "best.safetensors", *run.glob("checkpoints/resume/point-*/best.safetensors")]:
        _damage(copy)  # as when the point's hard link shares the damaged file
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="best.safetensors is damaged or missing .* no resume point holds it; start "
                                        "the run again with --overwrite"):
        exp2.main(["--config", str(config), f"name={run.name}", "--resume", *STOPPED])
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_best_checkpoint_replaced_by_a_later_one_is_restored_from_the_resume_point(stopped):
    """Someone copies a later checkpoint over best.safetensors (a new file under the old name): --resume restores
    the best from the resume point, which kept it, and the run ends exactly as the uninterrupted one."""
    config, reference, run = stopped
    later = RunDir(run).resume_points()[0] / "model.safetensors"
    replacement = run / "checkpoints" / "replacement"
    replacement.write_bytes(later.read_bytes())
    os.replace(replacement, run / "checkpoints" / "best.safetensors")
    exp2.main(["--config", str(config), f"name={run.name}", "--resume", *STOPPED])
    _same_results(reference, run)


def test_a_resume_point_copied_from_another_run_is_skipped_in_one_line(stopped, capsys):
    """The newest point is a complete, verifiable point of another run (its id differs): the previous one is used."""
    import hashlib

    config, reference, run = stopped
    newest, previous = RunDir(run).resume_points()[:2]
    trainer = json.loads((newest / "trainer.json").read_text())
    trainer["run"]["run_id"] = "another-run"
    (newest / "trainer.json").write_text(json.dumps(trainer))
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["trainer.json"] = hashlib.sha256((newest / "trainer.json").read_bytes()).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    exp2.main(["--config", str(config), f"name={run.name}", "--resume", *STOPPED])
    assert (f"resume point {newest.name} is unusable (it belongs to another run); using the previous one, "
            f"{previous.name}") in capsys.readouterr().out
    _same_results(reference, run)


@pytest.mark.slow
def test_a_shortened_history_is_restored_exactly_from_the_resume_point(stopped):
    config, reference, run = stopped
    history = run / "history.jsonl"
    history.write_bytes(history.read_bytes()[:-700])
    exp2.main(["--config", str(config), f"name={run.name}", "--resume", *STOPPED])
    assert b"\0" not in history.read_bytes()
    _same_results(reference, run)


@pytest.mark.slow
def test_a_half_written_resume_point_is_ignored(stopped):
    """A kill while a point is written leaves a temporary folder without its manifest; resuming ignores it."""
    import shutil

    config, reference, run = stopped
    newest = RunDir(run).resume_points()[0]
    half = newest.with_name(f".point-{int(newest.name.split('-')[1]) + 1:06d}.tmp")
    shutil.copytree(newest, half)
    (half / "manifest.json").unlink()
    exp2.main(["--config", str(config), f"name={run.name}", "--resume", *STOPPED])
    _same_results(reference, run)


@pytest.mark.slow
def test_a_kill_between_the_epoch_point_and_the_best_checkpoint_is_repaired(workspace, stopped_run, monkeypatch):
    config, runs, _ = workspace
    reference = stopped_run[1]
    from imdb_grad_accum.writer import RunWriter

    def killed_before_writing(self, *args):
        raise KeyboardInterrupt("simulated kill after the epoch's resume point")

    monkeypatch.setattr(RunWriter, "save_checkpoints", killed_before_writing)
    with pytest.raises(KeyboardInterrupt):
        exp2.main(["--config", str(config), "name=unwritten_best", *STOPPED])
    monkeypatch.undo()
    assert not (runs / "unwritten_best" / "checkpoints" / "best.safetensors").exists()
    exp2.main(["--config", str(config), "name=unwritten_best", "--resume", *STOPPED])
    _same_results(reference, runs / "unwritten_best")


# ----------------------------------------------------------------------------------------------- runs themselves

def test_same_seed_same_config_gives_identical_runs(tmp_path, tiny_bert, reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, model={"dropout": 0.1, "encoder_dropout": None},
                         train={"epochs": 1})
    exp1.main(["--config", str(config), "name=a"])
    exp1.main(["--config", str(config), "name=b"])
    _same_results(tmp_path / "runs" / "a", tmp_path / "runs" / "b")


def test_a_diverging_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path, tiny_bert, reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, checkpoint={"every_steps": 1},
                         train={"lr": 1e30, "max_grad_norm": None, "warmup_ratio": 0.0})
    with pytest.raises(RunStopped, match=r"the training loss is nan at optimizer step (\d+) \(epoch 1\)") as err:
        exp1.main(["--config", str(config)])
    step = int(str(err.value).split("optimizer step ")[1].split()[0])
    assert step > 1 and _newest_point(tmp_path / "runs" / "tiny")["step"] == step - 1  # the last good step's point

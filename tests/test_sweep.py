"""Studies: value grids, several runs at a time, several sweep processes sharing one study, a stopped sweep that
continues exactly, and WandB sweep agents running the shipped sweep file."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT, tiny_config
from exp_1 import main as exp1
from imdb_grad_accum import sweep
from imdb_grad_accum.cli import run_cli
from exp_2 import main as exp2

SWEEP = [sys.executable, "-m", "imdb_grad_accum.sweep"]
TIMING = ("wall_seconds", "train_seconds", "train_samples_per_s", "train_tokens_per_s", "git_commit")


def _metrics(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in TIMING}


def _first_table(readme: Path) -> list[str]:
    """The rows of a results README's first table (one per configuration, the seeds of a point together)."""
    lines = readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |")) + 2
    return list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))


def _starts(run: Path) -> int:
    """How many times training started this run (from scratch or from a resume point), from its train.log."""
    return (run / "train.log").read_text().count("\n=== ")


def grid_study(tmp_path, tiny_bert, reviews_dir, seeds=("1", "2"), grid=("train.lr=1e-3,5e-4", "train.epochs=1,2")):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, name="grid")
    args = [str(config), "--out", str(tmp_path / "results"), "--seeds", *seeds]
    for item in grid:
        args += ["--grid", item]
    return config, args


def test_a_grid_runs_two_at_a_time_tabulates_them_and_skips_them_when_run_again(tmp_path, tiny_bert, reviews_dir,
                                                                                   capsys):
    _, args = grid_study(tmp_path, tiny_bert, reviews_dir, seeds=("1",), grid=("train.lr=1e-3,5e-4",))
    outcomes = sweep.main([*args, "--jobs", "2"])
    assert sorted(path.name for path in outcomes) == ["grid_lr1e-3_seed1", "grid_lr5e-4_seed1"]
    assert set(outcomes.values()) == {"finished"}
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sweep ")]
    events = [("start" if ": started" in line else "end") for line in said if ": started" in line or " after " in line]
    assert events[:2] == ["start", "start"], said  # the second started before the first ended: two at a time
    assert len(_first_table(tmp_path / "results" / "exp_1" / "README.md")) == 2
    assert set(sweep.main([*args, "--jobs", "2"]).values()) == {"skipped"}  # the same command again: all done


@pytest.mark.slow
def test_each_run_of_a_grid_run_two_at_a_time_ends_as_if_run_alone(tmp_path, tiny_bert, reviews_dir):
    config, args = grid_study(tmp_path, tiny_bert, reviews_dir)
    outcomes = sweep.main([*args, "--jobs", "2"])
    expected = [f"grid_lr{lr}_epochs{e}_seed{s}" for lr, e, s in itertools.product(("1e-3", "5e-4"), ("1", "2"),
                                                                                     ("1", "2"))]
    assert sorted(path.name for path in outcomes) == sorted(expected) and set(outcomes.values()) == {"finished"}
    assert len(_first_table(tmp_path / "results" / "exp_1" / "README.md")) == 4
    first = next(iter(outcomes))
    point = [f"train.lr={first.name.split('_lr')[1].split('_')[0]}", f"seed={first.name.rsplit('seed', 1)[1]}",
             f"train.epochs={first.name.split('_epochs')[1].split('_')[0]}"]
    alone = subprocess.run([sys.executable, str(PROJECT / "exp_1" / "main.py"), "--config", str(config), "name=alone",
                            *point], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # as the sweep gives each of its 2 jobs
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert _metrics(tmp_path / "runs" / "alone") == _metrics(first)


@pytest.mark.slow
def test_two_sweep_processes_share_one_study_and_train_each_run_once(tmp_path, tiny_bert, reviews_dir):
    _, args = grid_study(tmp_path, tiny_bert, reviews_dir, seeds=("1", "2"), grid=("train.lr=1e-3,5e-4",))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([*SWEEP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "runs").glob("grid_*"))
    assert len(runs) == 4
    for run in runs:
        assert _starts(run) == 1, run  # trained by exactly one of the two
        steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()
                 if "train/loss" in line]
        assert steps == sorted(set(steps))
    for out, _ in outputs:  # each one's summary and results cover the whole study
        summary = out.split("sweep summary:")[1]
        assert all(str(run) in summary for run in runs)
    trained = [sum(f"{run}: started" in out for run in runs) for out, _ in outputs]
    assert sum(trained) == 4, trained
    assert len(_first_table(tmp_path / "results" / "exp_1" / "README.md")) == 2


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_sweep_stops_its_runs_and_the_same_command_finishes_them_exactly(signum, tmp_path, tiny_bert,
                                                                                   reviews_dir):
    config, args = grid_study(tmp_path, tiny_bert, reviews_dir, seeds=("1",), grid=("train.lr=1e-3,5e-4",))
    args += ["checkpoint.every_steps=2", "train.epochs=3"]
    reference = subprocess.run([*SWEEP, *args, "--jobs", "2", "output_dir=" + str(tmp_path / "reference")],
                               capture_output=True, text=True, timeout=900)  # the same threads per run
    assert reference.returncode == 0, reference.stderr[-3000:]
    process = subprocess.Popen([*SWEEP, *args, "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    runs = [tmp_path / "runs" / f"grid_lr{lr}_seed1" for lr in ("1e-3", "5e-4")]
    deadline = time.time() + 300
    while time.time() < deadline and not all(list(r.glob("checkpoints/resume/point-*")) for r in runs):
        time.sleep(0.05)
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)  # what a terminal's Ctrl-C does: the whole foreground group
    else:
        process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode == (143 if signum == signal.SIGTERM else 130), err[-3000:]
    assert "every running run saved a resume point" in err
    from imdb_grad_accum.rundir import RunDir

    assert all(RunDir(run).holder() == "" for run in runs), "a run outlived its sweep"
    assert not any((run / "metrics.json").exists() for run in runs)
    rerun = subprocess.run([*SWEEP, *args, "--jobs", "2"], capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    for run in runs:
        assert _metrics(run) == _metrics(tmp_path / "reference" / run.name)
        assert (run / "checkpoints" / "best.safetensors").read_bytes() == (
            tmp_path / "reference" / run.name / "checkpoints" / "best.safetensors").read_bytes()


def _agent_commands(sweep_file: Path) -> list[tuple[list[str], dict]]:
    """The command line of every run of a grid sweep file, expanded as `wandb agent` expands it."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    spec = yaml.safe_load(sweep_file.read_text())
    assert spec["method"] == "grid"
    names = list(spec["parameters"])
    commands = []
    for values in itertools.product(*(spec["parameters"][n]["values"] for n in names)):
        args = {"args": {n: {"value": v} for n, v in zip(names, values)}}
        macros = create_sweep_command_args(args)
        macros.update(interpreter=[sys.executable], program=[str(PROJECT / spec["program"])], env=[])
        line = []
        for chunk in create_sweep_command(list(spec["command"])):
            chunk = str(chunk)
            line += macros.get(chunk[2:-1], []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
        commands.append((line, dict(zip(names, values))))
    return commands


def test_the_wandb_sweep_file_runs_the_study_with_a_distinct_run_per_grid_point(tmp_path, monkeypatch, capsys):
    commands = _agent_commands(PROJECT / "configs" / "sweeps" / "exp2_study.yaml")
    assert len(commands) == 24
    names, settings = set(), set()
    for number, (line, params) in enumerate(commands):
        assert line[0] == sys.executable and line[1] == str(PROJECT / "exp_2" / "main.py")
        param_file = tmp_path / f"config-{number}.yaml"
        param_file.write_text(yaml.safe_dump({"wandb_version": 1, **{k: {"value": v} for k, v in params.items()}}))
        monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
        monkeypatch.setenv("WANDB_RUN_ID", f"run{number}")
        monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(param_file))
        monkeypatch.chdir(PROJECT)
        with pytest.raises(SystemExit) as exit_info:
            exp2.main([*line[2:], "--print-config"])
        assert exit_info.value.code == 0
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert cfg["seed"] == params["seed"] and cfg["output_dir"] == "runs/wandb_study"
        assert {k: cfg["train"][k] for k in params["train"]} == params["train"]
        names.add(cfg["name"])
        settings.add((cfg["train"]["effective_batch_size"], cfg["train"]["epochs"], cfg["train"]["lr_scaling"]))
    assert len(names) == 24 and len(settings) == 8
    assert "study_effective_batch_size256_epochs4_lr_scalingnone_seed1" in names


def test_under_a_wandb_agent_the_run_takes_the_agents_id_and_continues(tmp_path, tiny_bert, reviews_dir, monkeypatch):
    from imdb_grad_accum.rundir import RunDir
    from imdb_grad_accum.tracking import wandb_run_id

    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"epochs": 1})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"wandb_version": 1, "seed": {"value": 5}}))
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    argv = ["--config", str(config), "seed=5", "data.max_length=48", "--continue"]
    metrics = exp1.main(argv)
    run = tmp_path / "runs" / "tiny_seed5"  # named from the sweep's parameter only
    assert metrics["seed"] == 5 and (run / "metrics.json").is_file()
    assert wandb_run_id(RunDir(run)) == "agentrun1"
    with pytest.raises(SystemExit) as exit_info:  # the agent hands the same run out again: nothing to do
        exp1.main(argv)
    assert exit_info.value.code == 0


@pytest.mark.parametrize("argv, expected", [
    (["--grid", "train.lrr=1,2"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    (["--grid", "train.lr="], "give one or more values"),
    (["--grid", "train.lr=1e-3,,2e-3"], "give one or more values"),
    (["--grid", "train.batch_size=8,0"], "train.batch_size=0 must be a positive integer"),
    (["--grid", "train.lr"], "must look like KEY=V1,V2"),
    (["--jobs", "0"], "--jobs 0 must be 1 or more"),
    (["--devices", "7"], "there is no CUDA device 7 here"),
    (["--devices", "gpu0"], "give CUDA device numbers"),
    (["--grid", "train={epochs: 1},{epochs: 2}", "--grid", "train.epochs=3"], "train.epochs is set by two grids"),
    (["--grid", "name=a,b"], "--grid name: name cannot be a grid key"),
    (["--grid", "seed=1,2", "--seeds", "3"], "--grid seed: seed cannot be a grid key; use --seeds"),
    (["--grid", "train.lr=1e-3,0.001"], "are the same run (their grid values are equal once read)"),
    (["--baseline", "tiny", "--compare", "a vs b"], "give the comparisons one way"),
], ids=["unknown key", "no values", "an empty value", "a value that fails validation", "no =", "no jobs",
        "a missing device", "a device that is no number", "two grids of one key", "a grid over name",
        "a grid over seed with --seeds", "two values that are one", "comparisons given two ways"])
def test_bad_sweep_input_is_one_line_exit_2_before_any_run(argv, expected, tmp_path, tiny_bert, reviews_dir,
                                                          monkeypatch, capsys):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir)
    monkeypatch.setattr(sys, "argv", ["sweep.py", str(config), *argv, "--out", str(tmp_path / "results")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sweep.run)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == "" and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()

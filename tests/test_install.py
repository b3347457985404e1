"""Installs and behaves the way GPU users and the HF ecosystem expect: no silent CPU training when a GPU is there but
unusable, the launcher's mixed precision honoured in its place of the precedence, a fast --help listing every
config key, --print-config, `python -m`, and a package that works installed outside the repository."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import PROJECT, tiny_config
from exp_1 import main as exp1
from imdb_grad_accum.config import Config, load_config, to_plain_dict
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.device import cpu_has_fast_bf16
from exp_2 import main_accelerate


def _leaves(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        keys += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


def test_help_answers_fast_without_torch_and_lists_every_config_key():
    probe = ("import runpy, sys, atexit; sys.argv = ['exp_1/main.py', '--help']; "
             "atexit.register(lambda: print('heavy imports:', sorted({'torch', 'transformers', 'datasets', 'accelerate'} "
             "& set(sys.modules)))); runpy.run_path('exp_1/main.py', run_name='__main__')")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    print(f"--help took {seconds:.2f} s")
    assert result.returncode == 0, result.stderr
    assert "heavy imports: []" in result.stdout  # what lets it answer in under a second (timed above)
    listed = {}
    for line in result.stdout.split("config keys")[1].splitlines()[1:]:
        if line.startswith("  ") and ", default " in line:
            key, rest = line.split(None, 1)
            listed[key] = rest
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    assert sorted(listed) == sorted(_leaves(schema))
    for key, text in listed.items():
        kind, rest = text.split(", default ", 1)
        default, meaning = rest.split(": ", 1)
        value = OmegaConf.select(OmegaConf.structured(Config), key)
        value = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
        assert default == ("null" if value is None else str(value)), key
        assert meaning.strip(), f"{key} has no meaning (a comment on its line in imdb_grad_accum/schema.py)"


def test_print_config_prints_the_resolved_config_and_touches_nothing(tmp_path, tiny_bert, reviews_dir, capsys):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        exp1.main(["--config", str(config), "--print-config", "train.lr=3e-4"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_plain_dict(load_config(config, ["train.lr=3e-4"])) and printed["train"]["lr"] == 3e-4
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(UserError, match="train.effective_batch_size=50 is not a multiple of train.batch_size=8"):
        exp1.main(["--config", str(config), "--print-config", "train.effective_batch_size=50"])  # as a run refuses it


@pytest.mark.slow
def test_the_scripts_and_python_dash_m_answer_help():
    commands = [[script, "--help"] for script in ("exp_1/main.py", "exp_2/main.py", "exp_2/main_accelerate.py")]
    commands += [["-m", f"imdb_grad_accum.{name}", "--help"] for name in ("sweep", "results", "evaluate", "predict",
                                                                            "export")]
    for command in commands:
        result = subprocess.run([sys.executable, *command], cwd=PROJECT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, (command, result.stderr[-2000:])


@pytest.fixture
def gpu_without_cuda(tmp_path, monkeypatch):
    """A machine whose NVIDIA driver answers (a stand-in nvidia-smi on PATH) while this torch cannot use CUDA."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_an_unusable_gpu_stops_the_run_in_one_line_with_the_fix(device, gpu_without_cuda, tmp_path, tiny_bert,
                                                               reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"device": device})
    with pytest.raises(UserError) as err:
        exp1.main(["--config", str(config)])
    message = str(err.value)
    print(message)
    assert "\n" not in message and f"train.device={device}" in message
    assert "driver 570.86.15, CUDA up to 12.8" in message and "a CPU-only build" in message
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in message
    assert not (tmp_path / "runs").exists()


def test_device_check_says_what_a_run_would_use_and_why(gpu_without_cuda, tmp_path, tiny_bert, reviews_dir, capsys):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"device": "auto"})
    with pytest.raises(SystemExit) as exit_info:
        exp1.main(["--config", str(config), "--device-check"])
    assert exit_info.value.code == 2  # the run would stop: scripts can check with --device-check
    report = capsys.readouterr().out
    assert "a CPU-only build" in report and "NVIDIA driver: 570.86.15, supports CUDA up to 12.8" in report
    assert "this run would stop: train.device=auto: an NVIDIA GPU is here" in report
    with pytest.raises(SystemExit) as exit_info:
        exp1.main(["--config", str(config), "--device-check", "train.device=cpu"])
    assert exit_info.value.code == 0 and "this run would use: cpu" in capsys.readouterr().out


AUTO = "bf16" if cpu_has_fast_bf16() else "fp32"


@pytest.mark.parametrize("level, config_value, override, launcher, expected", [
    ("default", "auto", None, None, AUTO),
    ("launcher/environment", "auto", None, "bf16", "bf16"),
    ("config file", "fp32", None, "bf16", "fp32"),
    ("command line", "fp32", "train.precision=bf16", "bf16", "bf16"),
], ids=lambda value: value if isinstance(value, str) and " " not in value and "=" not in value else None)
def test_precision_precedence_command_line_over_file_over_launcher_over_default(
        level, config_value, override, launcher, expected, tmp_path, tiny_bert, reviews_dir, monkeypatch, capsys):
    """`accelerate launch --mixed_precision X` (or `accelerate config`) sets ACCELERATE_MIXED_PRECISION."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if launcher:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"precision": config_value})
    with pytest.raises(SystemExit):
        main_accelerate.main(["--config", str(config), "--device-check", *([override] if override else [])])
    assert f"this run would use: cpu, {expected}" in capsys.readouterr().out, level


def test_a_launchers_unchosen_default_is_not_taken_for_a_choice(tmp_path, tiny_bert, reviews_dir, monkeypatch, capsys):
    """`accelerate launch` without --mixed_precision or a config file still sets ACCELERATE_MIXED_PRECISION=no: "no"
    is never taken for a choice (train.precision=fp32 asks for fp32)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"precision": "auto"})
    with pytest.raises(SystemExit):
        main_accelerate.main(["--config", str(config), "--device-check"])
    assert f"this run would use: cpu, {AUTO}" in capsys.readouterr().out


@pytest.mark.slow
def test_the_installed_package_runs_outside_the_repository(tmp_path, tiny_bert, reviews_dir):
    """What `pip install .` puts on the path (the package imdb_grad_accum and its commands, no exp_1 or exp_2) runs a
    tiny experiment, with the experiment script of a checkout, from another folder, and its commands answer; the
    dependencies come from this environment (CI installs them afresh too)."""
    import shutil

    site, source = tmp_path / "site", tmp_path / "source"  # built from a copy: the build leaves build/ and egg-info
    shutil.copytree(PROJECT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "wandb", "build",
                                                                   "*.egg-info", "training_results", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target",
                            str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    installed = {p.name for p in site.iterdir()}
    assert "imdb_grad_accum" in installed and not {"exp_1", "exp_2"} & installed, installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"epochs": 1})
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, str(source / "exp_1" / "main.py"), "--config", str(config)], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())["n_test"] == 20
    results = subprocess.run([str(site / "bin" / "imdb-results"), str(tmp_path / "runs" / "tiny")], cwd=elsewhere,
                             env=env, capture_output=True, text=True, timeout=300)
    assert results.returncode == 0 and (tmp_path / "runs" / "results" / "exp_1" / "README.md").is_file(), results.stderr

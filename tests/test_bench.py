"""The benchmarks run end to end on a tiny model and report what they measure."""

import subprocess
import sys

import pytest

from conftest import PROJECT, tiny_config


@pytest.mark.slow
def test_benchmark_smoke(tiny_bert, reviews_dir):
    result = subprocess.run(
        [sys.executable, str(PROJECT / "bench" / "train_throughput.py"), "--model", tiny_bert, "--data", str(reviews_dir),
         "--max-length", "64", "--batch-size", "4", "--steps", "2", "--warmup", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == [
        "this project", "this project, activation checkpointing", "HF Trainer, defaults", "HF Trainer, same settings",
        "original pipeline"]
    assert rows[3].endswith("| 1.00x |")  # speeds are relative to HF Trainer with the same settings
    original_padding = float(rows[4].split(" | ")[4])
    assert float(rows[0].split(" | ")[4]) > original_padding  # dynamic padding beats padding to max_length


@pytest.mark.slow
def test_first_step_benchmark_smoke(tmp_path, tiny_bert, reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir)
    result = subprocess.run([sys.executable, str(PROJECT / "bench" / "first_step.py"), "--starts", "2", "--config",
                             str(config)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    later = result.stdout.split("later starts: ")[1].split(" s;")[0]
    assert 0 < float(later) < 300 and "first start (may tokenise):" in result.stdout
    assert not (tmp_path / "runs").exists()  # its runs go to a temporary folder

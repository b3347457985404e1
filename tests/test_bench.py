"""The throughput benchmark runs end to end (tiny model, a few steps) and reports every variant against ours."""

import subprocess
import sys

from conftest import PROJECT


def test_benchmark_smoke(tiny_bert, reviews_dir):
    result = subprocess.run(
        [sys.executable, str(PROJECT / "bench" / "train_throughput.py"), "--model", tiny_bert, "--data", str(reviews_dir),
         "--max-length", "64", "--batch-size", "4", "--steps", "2", "--warmup", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == [
        "this project", "HF Trainer, defaults", "HF Trainer, same settings", "original pipeline"]
    assert rows[0].endswith("| 1.00x |")
    original_padding = float(rows[3].split(" | ")[4])
    assert float(rows[0].split(" | ")[4]) > original_padding  # dynamic padding beats padding to max_length

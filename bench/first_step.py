"""Seconds from starting an experiment to its first training step, on repeated starts of the same config.

    python bench/first_step.py --config configs/quickstart.yaml data.path=/path/to/imdb
    python bench/first_step.py --config configs/quickstart.yaml tracking.wandb_mode=disabled

Starts `exp_1/main.py` with the given config and overrides (into a temporary output_dir) several times and stops each
start when the first training step begins (the progress bar of epoch 1 appears). The first start may tokenise and
fill caches; the later ones are what a user sees when starting the same config again.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def time_to_first_step(argv: list[str], output_dir: str, timeout: float = 300) -> float:
    started = time.perf_counter()
    # the bar (on stderr) marks the first step; a pipe would otherwise get plain lines, at log steps only
    process = subprocess.Popen([sys.executable, str(PROJECT / "exp_1" / "main.py"), *argv, f"output_dir={output_dir}",
                                "name=first_step", "train.progress=bar", "--overwrite"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = ""
    while not seen.endswith("epoch 1:"):
        chunk = process.stderr.read(1)
        if not chunk or time.perf_counter() - started > timeout:
            process.kill()
            raise SystemExit(f"no training step within {timeout:.0f} s:\n{seen[-2000:]}")
        seen = (seen + chunk)[-2000:]
    elapsed = time.perf_counter() - started
    process.kill()
    process.wait()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--starts", type=int, default=4, help="starts in all, the first of them a warm-up")
    args, passthrough = p.parse_known_args()
    if args.starts < 2:
        p.error("--starts must be at least 2: a warm-up, then the starts that are timed")
    with tempfile.TemporaryDirectory() as output_dir:
        seconds = [time_to_first_step(passthrough, output_dir) for _ in range(args.starts)]
    print(f"first start (may tokenise): {seconds[0]:.2f} s")
    later = seconds[1:]
    print(f"later starts: {', '.join(f'{s:.2f}' for s in later)} s; median {statistics.median(later):.2f} s")


if __name__ == "__main__":
    main()

"""Run several configs one after another, then plot and tabulate them into training_results/ (exp_1/results.py).

    python exp_1/sweep.py configs/bert.yaml configs/modernbert.yaml
    python exp_1/sweep.py --script exp_2/main.py configs/exp2_eb64.yaml configs/exp2_eb256.yaml configs/exp2_eb1024.yaml
    python exp_1/sweep.py configs/quickstart.yaml --seeds 1 2 3        # one run per training seed, one shared split
    python exp_1/sweep.py --script exp_2/main_accelerate.py \\
        --launcher "accelerate launch --multi_gpu --num_processes 8" configs/exp2_eb64.yaml configs/exp2_eb1024.yaml

key=value overrides apply to every config (e.g. output_dir=runs/demo data.max_train_samples=2000). Each run is its
own process, and dies with the sweep; the runs share a WandB group (--group). A run that already finished (metrics.json in its run directory) is skipped, an interrupted one resumes
from its resume point, and a run that fails is reported while the sweep goes on; the exit code is 1 if any failed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from exp_1.cli import CliParser, die_with_parent, run_cli
from exp_1.config import UserError, load_config
from exp_1.results import PROJECT, find_runs, write_results
from exp_1.rundir import RunDir, run_path

SCRIPTS = ["exp_1/main.py", "exp_2/main.py", "exp_2/main_accelerate.py"]


def main(argv=None) -> dict[Path, str]:
    """Runs every config (once per seed with --seeds); returns each run directory's outcome: finished, skipped,
    resumed or failed."""
    p = CliParser(description=__doc__.splitlines()[0])
    p.add_argument("items", nargs="+", metavar="config.yaml | key=value", help="configs to run, and overrides for all")
    p.add_argument("--script", choices=SCRIPTS, default=SCRIPTS[0], help="entry script (default: exp_1/main.py)")
    p.add_argument("--launcher", help='what runs exp_2/main_accelerate.py, e.g. "accelerate launch --multi_gpu '
                   '--num_processes 8" (default: this python)')
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run each config once per training seed, named <name>_seed<SEED> (the split stays "
                   "data.split_seed's, so the runs share a test set); may come before the configs")
    p.add_argument("--group", help="WandB group of the sweep's runs (default: the config names joined with +)")
    p.add_argument("--out", type=Path, default=Path("training_results"), help="default: training_results/")
    args = p.parse_intermixed_args(_seeds_first(sys.argv[1:] if argv is None else list(argv)))
    overrides = [item for item in args.items if "=" in item]
    configs = [Path(item) for item in args.items if "=" not in item]
    if not configs:
        raise UserError("no config given: list the YAML files to run, e.g. configs/bert.yaml configs/modernbert.yaml")
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    if args.launcher and args.script != "exp_2/main_accelerate.py":
        raise UserError(f"--launcher starts exp_2/main_accelerate.py; {args.script} would train once per process")
    if not shutil.which(launcher[0]):
        raise UserError(f"--launcher: {launcher[0]} not found; is it installed and on PATH?")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; give the folder for the results tables (default: training_results)")
    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: a seed appears twice; give each once")
    if not any(o.startswith("tracking.group=") for o in overrides) and not os.environ.get("WANDB_RUN_GROUP"):
        overrides.append(f"tracking.group={args.group or '+'.join(config.stem for config in configs)[:120]}")

    runs: dict[Path, tuple[Path, list[str]]] = {}  # run directory -> config and its overrides; all checked first
    for config in configs:
        for seed in args.seeds or [None]:
            extra = list(overrides)
            if seed is not None:
                extra += [f"seed={seed}", f"name={load_config(config, overrides).name}_seed{seed}"]
            cfg = load_config(config, extra)
            run = RunDir(run_path(cfg))
            if run.path.resolve() in {r.resolve() for r in runs}:
                raise UserError(f"two configs write to {run.path}; give them different names (name= in the config)")
            if run.is_run() and (run.is_finished() or run.resume_points()):  # to be skipped or resumed
                changed = run.config_changes(cfg)
                if changed:
                    raise UserError(f"{run.path} was run with another config (it differs in {', '.join(changed)}); "
                                    "sweep into another output_dir= or remove that run")
            runs[run.path] = (config, extra)

    outcomes = {}
    for number, (run_dir, (config, extra)) in enumerate(runs.items(), 1):
        header = f"[sweep {number}/{len(runs)}] {config} -> {run_dir}"
        run = RunDir(run_dir)
        if run.is_finished():
            print(f"{header}: finished before, skipped", flush=True)
            outcomes[run_dir] = "skipped"
            continue
        resume = bool(run.resume_points())
        restart = not resume and run.is_run() and run.has_results()  # stopped before its first resume point
        print(header + (": resuming" if resume else ": restarting (no resume point yet)" if restart else ""),
              flush=True)
        started = time.time()
        command = [*launcher, str(PROJECT / args.script), "--config", str(config), *extra,
                   *(["--resume"] if resume else ["--overwrite"] if restart else [])]
        code = run_child(command)
        outcomes[run_dir] = "failed" if code else "resumed" if resume else "finished"
        print(f"{header}: {outcomes[run_dir]}" + (f" (exit code {code})" if code else "")
              + f" after {(time.time() - started) / 60:.1f} min", flush=True)

    print("\nsweep summary:\n" + "\n".join(f"  {outcome:9s} {run_dir}" for run_dir, outcome in outcomes.items()))
    done = [run_dir for run_dir, outcome in outcomes.items() if outcome != "failed"]
    if done:
        written = write_results(find_runs(done), args.out)
        print(f"results: {', '.join(sorted({str(path.parent) for path in written}))}")
    return outcomes


def _seeds_first(argv: list[str]) -> list[str]:
    """Move `--seeds 1 2 3` (only its numbers) to the end, so that configs and overrides after it stay configs and
    overrides: `--seeds 1 2 3 configs/a.yaml` and `configs/a.yaml --seeds 1 2 3` mean the same."""
    if "--seeds" not in argv:
        return argv
    start = argv.index("--seeds")
    end = start + 1
    while end < len(argv) and argv[end].lstrip("-").isdigit():
        end += 1
    return argv[:start] + argv[end:] + argv[start:end]


class SweepStopped(Exception):
    """SIGTERM reached the sweep."""


def _stop(*_) -> None:
    raise SweepStopped()


def run_child(command: list[str]) -> int:
    """One run in its own process, which Linux ends with SIGTERM if the sweep dies (even by SIGKILL). When the sweep
    is stopped (Ctrl-C, SIGTERM), the run gets SIGTERM too: it saves a resume point and exits before the sweep does."""
    child = subprocess.Popen(command, preexec_fn=die_with_parent)
    try:
        return child.wait()
    except BaseException:
        child.send_signal(signal.SIGTERM)
        child.wait()
        raise


def run(argv: list[str]) -> None:
    """main, with the sweep's own exit codes: 1 when a run failed, 130/143 when the sweep was stopped."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        outcomes = main(argv)
    except (KeyboardInterrupt, SweepStopped) as err:
        print("\nsweep stopped; run the same command again to continue where it stopped", file=sys.stderr)
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else 143)
    if "failed" in outcomes.values():
        sys.exit(1)


def cli() -> None:
    """The console command (pyproject.toml)."""
    run_cli(run)


if __name__ == "__main__":
    cli()

"""A study: every config x grid point x seed, run several at a time on every device, shared between any number of
sweep processes and machines, then tabulated and plotted into training_results/ (exp_1/results.py).

    python exp_1/sweep.py configs/bert.yaml configs/modernbert.yaml
    python exp_1/sweep.py configs/quickstart.yaml --grid train.lr=3e-5,5e-5 --grid train.epochs=1,2 --seeds 1 2 3
    python exp_1/sweep.py --script exp_2/main.py configs/study.yaml --grid train.effective_batch_size=64,256,1024 \
        --seeds 1 2 3 --jobs 16 --devices 0,1,2,3,4,5,6,7
    python exp_1/sweep.py --script exp_2/main_accelerate.py \\
        --launcher "accelerate launch --multi_gpu --num_processes 8" configs/exp2_eb64.yaml configs/exp2_eb1024.yaml

key=value overrides apply to every config (e.g. output_dir=runs/demo data.max_train_samples=2000); each grid point
and seed is a run of its own, named <name>_<key><value>..._seed<N>. Each run is its own process, writing its output
to train.log in its run directory, and dies with the sweep. A finished run (metrics.json) is skipped, an
interrupted one resumes from its resume point, a failing one is reported while the others go on (exit code 1 if
any failed). Ctrl-C or SIGTERM stops every running run, each saving a resume point; the same command continues.
The same command started again, on this machine or another sharing output_dir, shares the study: each process
takes the next run that no other is training, so every run is trained once.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from exp_1.cli import CliParser, die_with_parent, run_cli
from exp_1.config import load_config, run_name
from exp_1.errors import UserError
from exp_1.results import PROJECT, find_runs, write_results
from exp_1.rundir import RunDir, run_path

SCRIPTS = ["exp_1/main.py", "exp_2/main.py", "exp_2/main_accelerate.py"]
CLAIMS = ".sweep-claims"  # in output_dir: which sweep process trains which run


@dataclass
class Run:
    path: Path
    config: Path
    overrides: list[str]
    number: int = 0
    outcome: Optional[str] = None  # finished | skipped | resumed | failed | done elsewhere
    process: Optional[subprocess.Popen] = None
    claim: Optional[int] = None  # the file descriptor of our claim lock
    started: float = 0.0
    device: Optional[str] = None
    resumed: bool = False
    seen_busy: bool = False  # another process trained it when we looked


@dataclass
class Study:
    runs: list[Run]
    command: list[str]  # the launcher and the script
    jobs: int
    devices: list[str]
    threads: Optional[int]  # per run on the CPU
    active: list[Run] = field(default_factory=list)


def main(argv=None) -> dict[Path, str]:
    """Runs the study; returns each run directory's outcome."""
    p = CliParser(description=__doc__.splitlines()[0])
    p.add_argument("items", nargs="+", metavar="config.yaml | key=value", help="configs to run, and overrides for all")
    p.add_argument("--script", choices=SCRIPTS, default=SCRIPTS[0], help="entry script (default: exp_1/main.py)")
    p.add_argument("--launcher", help='what runs exp_2/main_accelerate.py, e.g. "accelerate launch --multi_gpu '
                   '--num_processes 8" (default: this python)')
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run every combination of these values (repeatable), e.g. --grid train.lr=3e-5,5e-5")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run each config and grid point once per training seed, named ..._seed<SEED> (the split stays "
                   "data.split_seed's, so the runs share a test set); may come before the configs")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1); on the CPU they share the cores")
    p.add_argument("--devices", help="CUDA devices to spread the runs over, one each, round-robin, e.g. 0,1,2,3")
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
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs} must be 1 or more")
    if args.jobs > 1 and args.launcher:
        raise UserError("--jobs with --launcher would start several multi-process launches at once, sharing the GPUs "
                        "and the rendezvous port; run them one at a time (or one sweep per machine)")
    devices = check_devices(args.devices, args.launcher)
    if not any(o.startswith("tracking.group=") for o in overrides) and not os.environ.get("WANDB_RUN_GROUP"):
        overrides.append(f"tracking.group={args.group or '+'.join(config.stem for config in configs)[:120]}")

    runs = plan(configs, overrides, grid_points(args.grid), args.seeds)
    threads = None if devices else max(1, len(os.sched_getaffinity(0)) // args.jobs)  # the cores this process has
    study = Study(runs, [*launcher, str(PROJECT / args.script)], args.jobs, devices, threads)
    signal.signal(signal.SIGTERM, _stop)
    try:
        work(study)
    except (KeyboardInterrupt, SweepStopped):
        stop_all(study)
        raise
    print("\nsweep summary:\n" + "\n".join(f"  {run.outcome:14s} {run.path}" for run in runs))
    done = [run.path for run in runs if run.outcome != "failed" and RunDir(run.path).is_finished()]
    if done:
        written = write_results(find_runs(done), args.out)
        print(f"results: {', '.join(sorted({str(path.parent) for path in written}))}")
    return {run.path: run.outcome for run in runs}


# ----------------------------------------------------------------------------------------------- what to run

def grid_points(grid: list[str]) -> list[list[str]]:
    """Every combination of the --grid values, as lists of overrides (one empty list without --grid)."""
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        if not key or not _:
            raise UserError(f"--grid {item!r} must look like KEY=V1,V2,..., e.g. --grid train.lr=3e-5,5e-5")
        parts = split_values(values)
        if not parts or any(not v.strip() for v in parts):
            raise UserError(f"--grid {item!r}: give one or more values, separated by commas")
        if key in (axis[0] for axis in axes):
            raise UserError(f"--grid {key} is given twice; give all its values in one --grid")
        axes.append((key, parts))
    return [[f"{key}={value}" for (key, _), value in zip(axes, combination)]
            for combination in itertools.product(*(values for _, values in axes))]


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets, so that a value may be a list: --grid data.split=[8,1,1],[9,1,1]."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += 1 if char in "[{" else -1 if char in "]}" else 0
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return values + [current]


def plan(configs: list[Path], overrides: list[str], points: list[list[str]], seeds: Optional[list[int]]) -> list[Run]:
    """Every run of the study, each config loaded and checked before anything runs."""
    runs: list[Run] = []
    for config in configs:
        for point in points:
            for seed in seeds or [None]:
                extra = overrides + point + ([f"seed={seed}"] if seed is not None else [])
                if point or seed is not None:
                    name = load_config(config, overrides).name
                    extra.append(f"name={run_name(name, point + ([f'seed={seed}'] if seed is not None else []))}")
                try:
                    cfg = load_config(config, extra)
                except UserError as err:
                    raise UserError(f"{config} with {' '.join(point)}: {err}" if point else str(err)) from None
                run = RunDir(run_path(cfg))
                run.refuse_foreign_folder(cfg)
                if run.path.resolve() in {r.path.resolve() for r in runs}:
                    raise UserError(f"two runs of the study write to {run.path}; give the configs different names "
                                    "(name= in the config)")
                if run.is_run() and (run.is_finished() or run.resume_points()):  # to be skipped or resumed
                    changed = run.config_changes(cfg)
                    if changed:
                        raise UserError(f"{run.path} was run with another config (it differs in "
                                        f"{', '.join(changed)}); sweep into another output_dir= or remove that run")
                runs.append(Run(run.path, config, extra, len(runs) + 1))
    return runs


def check_devices(devices: Optional[str], launcher: Optional[str]) -> list[str]:
    """The CUDA devices named by --devices, as the children must be told them: numbered as this process sees them,
    so within a CUDA_VISIBLE_DEVICES it was given (a cluster's allocation), each mapped back to the device it names."""
    if devices is None:
        return []
    if launcher:
        raise UserError("--devices gives each run one GPU; with --launcher, the launcher places its processes "
                        "(set CUDA_VISIBLE_DEVICES for it instead)")
    names = [d.strip() for d in devices.split(",")]
    if not all(name.isdigit() for name in names):
        raise UserError(f"--devices {devices}: give CUDA device numbers separated by commas, e.g. --devices 0,1")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [name for name in names if int(name) >= count]
    if missing:
        raise UserError(f"--devices {devices}: there is no CUDA device {', '.join(missing)} here ({count} visible)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [visible.split(",")[int(name)].strip() for name in names] if visible else names


# ----------------------------------------------------------------------------------------------- running

def work(study: Study) -> None:
    """Start runs while fewer than --jobs are running; a run another process trains waits until it is free, and
    is then either finished (done elsewhere) or taken over."""
    waiting = list(study.runs)
    while waiting or study.active:
        for run in list(waiting):
            if len(study.active) >= study.jobs:
                break
            state = take(run)
            if state == "busy":
                continue
            waiting.remove(run)
            if state == "finished":
                run.outcome = "done elsewhere" if run.seen_busy else "skipped"
                print(f"{header(study, run)}: " + ("finished by another process" if run.seen_busy else
                                                   "finished before, skipped"), flush=True)
                continue
            start(study, run)
        for run in [r for r in study.active if r.process.poll() is not None]:
            end(study, run)
        if waiting and not study.active and all(take_would_wait(r) for r in waiting):
            time.sleep(2)  # every remaining run is trained by another process: wait for them
        elif study.active:
            time.sleep(0.2)


def take(run: Run) -> str:
    """Claim the run for this process: finished, busy (another process trains it), or taken."""
    folder = RunDir(run.path)
    if folder.is_finished():
        return "finished"
    claims = run.path.parent / CLAIMS
    try:
        claims.mkdir(parents=True, exist_ok=True)
        fd = os.open(claims / f"{run.path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot create {claims}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        run.seen_busy = True
        return "busy"
    if folder.holder() or folder.is_finished():  # trained outside any sweep, or finished just now
        os.close(fd)
        run.seen_busy = True
        return "finished" if folder.is_finished() else "busy"
    run.claim = fd
    return "taken"


def take_would_wait(run: Run) -> bool:
    return run.seen_busy and not RunDir(run.path).is_finished()


def header(study: Study, run: Run) -> str:
    return f"[sweep {run.number}/{len(study.runs)}] {run.path}"


def start(study: Study, run: Run) -> None:
    """The run in its own process (and process group, so that a terminal's Ctrl-C reaches only the sweep, which
    then stops the run with SIGTERM), its output appended to train.log in its run directory."""
    folder = RunDir(run.path)
    resume = bool(folder.resume_points())
    restart = not resume and folder.is_run() and folder.has_results()  # stopped before its first resume point
    run.resumed = resume
    env = dict(os.environ)
    if study.devices:  # the device fewest running runs share, the first of them on a tie
        busy = [r.device for r in study.active]
        run.device = min(study.devices, key=lambda d: (busy.count(d), study.devices.index(d)))
        env["CUDA_VISIBLE_DEVICES"] = run.device
    elif study.threads:
        env.update(OMP_NUM_THREADS=str(study.threads), MKL_NUM_THREADS=str(study.threads))
    run.path.mkdir(parents=True, exist_ok=True)
    log = open(run.path / "train.log", "a")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: "
              f"{'resuming' if resume else 'starting'} ({shlex.join(run.overrides)})\n")
    log.flush()
    command = [*study.command, "--config", str(run.config), *run.overrides, "--continue"]
    run.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   preexec_fn=_own_group_dying_with_parent)
    log.close()
    run.started = time.time()
    study.active.append(run)
    where = f" on cuda:{run.device}" if run.device else f" ({study.threads} CPU threads)" if study.threads else ""
    doing = "resuming" if resume else "restarting (no resume point yet)" if restart else "started"
    print(f"{header(study, run)}: {doing}{where}; log in {run.path / 'train.log'}", flush=True)


def end(study: Study, run: Run) -> None:
    code = run.process.returncode
    study.active.remove(run)
    if run.claim is not None:
        os.close(run.claim)
        run.claim = None
    run.outcome = "failed" if code else "resumed" if run.resumed else "finished"
    print(f"{header(study, run)}: {run.outcome}" + (f" (exit code {code}{last_error(run.path / 'train.log')}; see "
                                                    f"{run.path / 'train.log'})" if code else "")
          + f" after {(time.time() - run.started) / 60:.1f} min", flush=True)


def last_error(log: Path) -> str:
    """The one line a run ended with (`error: ...` or `stopped: ...`), to show beside its exit code."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-50:]
    except OSError:
        return ""
    ends = [line for line in lines if line.startswith(("error: ", "stopped: "))]
    return f": {ends[-1]}" if ends else ""


def _own_group_dying_with_parent() -> None:
    os.setpgid(0, 0)
    die_with_parent()


def stop_all(study: Study) -> None:
    """SIGTERM to every running run (each saves a resume point and exits), then wait for them."""
    for run in study.active:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.process.pid, signal.SIGTERM)
    for run in study.active:
        with contextlib.suppress(KeyboardInterrupt, SweepStopped):
            run.process.wait()


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


def run(argv: list[str]) -> None:
    """main, with the sweep's own exit codes: 1 when a run failed, 130/143 when the sweep was stopped."""
    try:
        outcomes = main(argv)
    except (KeyboardInterrupt, SweepStopped) as err:
        print("\nsweep stopped; every running run saved a resume point: run the same command again to continue",
              file=sys.stderr)
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else 143)
    if "failed" in outcomes.values():
        sys.exit(1)


def cli() -> None:
    """The console command (pyproject.toml)."""
    run_cli(run)


if __name__ == "__main__":
    cli()

"""A study: every config x grid point x seed, run several at a time on every device, shared between any number of
sweep processes and machines, then tabulated (imdb-results) beside the runs.

    imdb-sweep configs/bert.yaml configs/modernbert.yaml
    imdb-sweep configs/quickstart.yaml --grid train.lr=3e-5,5e-5 --grid train.epochs=1,2 --seeds 1 2 3
    imdb-sweep --script exp_2/main.py configs/study.yaml --grid train.effective_batch_size=64,256,1024 \\
        --seeds 1 2 3 --jobs 16 --devices 0,1,2,3,4,5,6,7
    imdb-sweep --script exp_2/main_accelerate.py \\
        --launcher "accelerate launch --multi_gpu --num_processes 8" configs/exp2_eb64.yaml configs/exp2_eb1024.yaml

key=value overrides apply to every config (e.g. output_dir=runs/demo data.max_train_samples=2000); each grid point
and seed is a run of its own, named <name>_<key><value>..._seed<N>. Each run is its own process, writing its output
to train.log in its run directory, and dies with the sweep. A finished run (metrics.json) is skipped, an interrupted
one resumes from its resume point, a failing one is reported while the others go on (exit code 1 if any failed).
Ctrl-C or SIGTERM stops every running run, each saving a resume point; the same command continues. The same command
started again, on this machine or another sharing output_dir, shares the study: each process takes the next run that
no other is training, so every run is trained once.
"""

import contextlib
import fcntl
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from imdb_grad_accum import comparisons
from imdb_grad_accum.cli import command_parser, die_with_parent, run_cli, run_name
from imdb_grad_accum.config import PROJECT_ROOT, load_config, to_plain_dict, trained_config
from imdb_grad_accum.schema import flatten
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.results import default_out, find_runs, write_results
from imdb_grad_accum.writer import RunWriter

SCRIPTS = ["exp_1/main.py", "exp_2/main.py", "exp_2/main_accelerate.py"]
CLAIMS = ".sweep-claims"  # in output_dir: which sweep process trains which run


@dataclass
class Job:
    path: Path
    config: Path
    overrides: list[str]
    outcome: str | None = None  # finished | skipped | resumed | failed | done elsewhere
    process: subprocess.Popen | None = None
    claim: int | None = None  # the file descriptor of this process's claim lock
    started: float = 0.0
    device: str | None = None
    resumed: bool = False
    seen_busy: bool = False  # another process trained it when this one looked


@dataclass
class Study:
    jobs: list[Job]
    command: list[str]  # the launcher and the script
    parallel: int
    devices: list[str]
    threads: int | None  # per run on the CPU
    running: list[Job] = field(default_factory=list)


def main(argv=None) -> dict[Path, str]:
    p = command_parser(__doc__)
    p.add_argument("items", nargs="+", metavar="config.yaml | key=value", help="configs to run, and overrides for all")
    p.add_argument("--script", default=SCRIPTS[0], help=f"entry script, one of {', '.join(SCRIPTS)} (default: "
                   f"{SCRIPTS[0]}), or its path")
    p.add_argument("--launcher", help='what runs exp_2/main_accelerate.py, e.g. "accelerate launch --multi_gpu '
                   '--num_processes 8" (default: this python)')
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run every combination of these values (repeatable), e.g. --grid train.lr=3e-5,5e-5")
    p.add_argument("--seeds", nargs="+", metavar="SEED", help="run each config and grid point once per training seed, "
                   "named ..._seed<SEED> (the split stays data.split_seed's, so the runs share a test set)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1); on the CPU they share the cores")
    p.add_argument("--devices", help="CUDA devices to spread the runs over, one each, round-robin, e.g. 0,1,2,3")
    p.add_argument("--group", help="WandB group of the sweep's runs (default: the config names joined with +)")
    p.add_argument("--out", type=Path,
                   help="where the results tables go (default: beside the runs, <output_dir>/results)")
    comparisons.add_arguments(p)
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    seeds = [s for s in args.seeds or [] if s.lstrip("-").isdigit()]
    items = args.items + [s for s in args.seeds or [] if not s.lstrip("-").isdigit()]  # `--seeds 1 2 a.yaml`
    overrides, configs = [i for i in items if "=" in i], [Path(i) for i in items if "=" not in i]
    if not configs:
        raise UserError("no config given: list the YAML files to run, e.g. configs/bert.yaml configs/modernbert.yaml")
    script = Path(args.script) if Path(args.script).is_file() else PROJECT_ROOT / args.script
    if not script.is_file() or script.name not in ("main.py", "main_accelerate.py"):
        raise UserError(f"--script {args.script}: not one of {', '.join(SCRIPTS)} here or in this checkout; give the "
                        "path to the script in your clone")
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    if args.launcher and script.name != "main_accelerate.py":
        raise UserError(f"--launcher starts exp_2/main_accelerate.py; {args.script} would train once per process")
    if not shutil.which(launcher[0]):
        raise UserError(f"--launcher: {launcher[0]} not found; is it installed and on PATH?")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {' '.join(seeds)}: a seed appears twice; give each once")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs} must be 1 or more")
    if args.jobs > 1 and args.launcher:
        raise UserError("--jobs with --launcher would start several multi-process launches at once, sharing the GPUs "
                        "and the rendezvous port; run them one at a time (or one sweep per machine)")
    baseline, pairs = comparisons.chosen(args)
    if args.devices and args.launcher:
        raise UserError("--devices gives each run one GPU; with --launcher, the launcher places its processes "
                        "(set CUDA_VISIBLE_DEVICES for it instead)")
    if args.devices:
        from imdb_grad_accum.device import visible_devices  # here: torch loads only when GPUs are asked for
    devices = visible_devices(args.devices) if args.devices else []
    if not any(o.startswith("tracking.group=") for o in overrides) and not os.environ.get("WANDB_RUN_GROUP"):
        overrides.append(f"tracking.group={args.group or '+'.join(config.stem for config in configs)[:120]}")
    jobs = plan(configs, overrides, grid_points(args.grid, bool(seeds)), [int(s) for s in seeds] or None)
    threads = None if devices else max(1, len(os.sched_getaffinity(0)) // args.jobs)  # the cores this process has
    study = Study(jobs, [*launcher, str(script)], args.jobs, devices, threads)
    signal.signal(signal.SIGTERM, _stop)
    try:
        run_study(study)
    except (KeyboardInterrupt, SweepStopped):
        stop_all(study)
        raise
    print("\nsweep summary:\n" + "\n".join(f"  {job.outcome:14s} {job.path}" for job in jobs))
    done = [job.path for job in jobs if job.outcome != "failed" and RunWriter(job.path).is_finished()]
    if done:
        written = write_results(find_runs(done), args.out or default_out(done), baseline, pairs)
        print(f"results: {', '.join(sorted({str(path.parent) for path in written}))}")
    return {job.path: job.outcome for job in jobs}


def grid_points(grid: list[str], seeds: bool) -> list[list[str]]:
    """Every combination of the --grid values, as lists of overrides (one empty list without --grid)."""
    axes, keys = [], {}
    for item in grid:
        key, _, values = item.partition("=")
        if not key or not _:
            raise UserError(f"--grid {item!r} must look like KEY=V1,V2,..., e.g. --grid train.lr=3e-5,5e-5")
        parts = split_values(values)
        if any(not v.strip() for v in parts):
            raise UserError(f"--grid {item!r}: give one or more values, separated by commas")
        for value in parts:
            parsed = yaml.safe_load(value) if value.strip().startswith("{") else None
            for leaf in (flatten(parsed, f"{key}.") if isinstance(parsed, dict) else {key: None}):
                if leaf in ("name", "output_dir") or (leaf == "seed" and seeds):
                    advice = "use --seeds" if leaf == "seed" else "give each config its own name= in its file"
                    raise UserError(f"--grid {leaf}: {leaf} cannot be a grid key; {advice}")
                if keys.setdefault(leaf, item) != item:
                    raise UserError(f"--grid: {leaf} is set by two grids ({keys[leaf]!r} and {item!r}); give all its "
                                    "values in one --grid")
        axes.append((key, parts))
    return [[f"{key}={value}" for (key, _), value in zip(axes, combination)]
            for combination in itertools.product(*(values for _, values in axes))]


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets, so that a value may be a list: --grid data.split=[8,1,1],[9,1,1]."""
    values, depth = [""], 0
    for char in text:
        depth += 1 if char in "[{" else -1 if char in "]}" else 0
        if char == "," and depth == 0:
            values.append("")
        else:
            values[-1] += char
    return values


def plan(configs: list[Path], overrides: list[str], points: list[list[str]], seeds: list[int] | None) -> list[Job]:
    """Every run of the study, each config loaded and checked before anything runs."""
    jobs, trained = [], {}
    for config, point, seed in itertools.product(configs, points, seeds or [None]):
        varied = point + ([f"seed={seed}"] if seed is not None else [])
        extra = overrides + varied
        if varied:
            extra.append(f"name={run_name(load_config(config, overrides).name, varied)}")
        try:
            cfg = load_config(config, extra)
        except UserError as err:
            raise UserError(f"{config} with {' '.join(point)}: {err}" if point else str(err)) from None
        run = RunWriter.of(cfg)
        key = json.dumps([str(config), trained_config(to_plain_dict(cfg))], sort_keys=True, default=str)
        if key in trained:  # 1e-3 and 0.001
            raise UserError(f"{run.path.name} and {trained[key]} are the same run (their grid values are "
                            "equal once read); give each value once")
        trained[key] = run.path.name
        run.check(cfg, "continue", locked=True)  # locked: another sweep process may train it (the study shared)
        if run.path.resolve() in {job.path.resolve() for job in jobs}:
            raise UserError(f"two runs of the study write to {run.path}; give the configs different names "
                            "(name= in the config)")
        jobs.append(Job(run.path, config, extra))
    return jobs


def run_study(study: Study) -> None:
    """Start runs while fewer than --jobs run; a run another process trains waits until it is finished or free."""
    waiting = list(study.jobs)
    while waiting or study.running:
        for job in list(waiting):
            if len(study.running) >= study.parallel:
                break
            state = claim(job)
            if state != "busy":
                waiting.remove(job)
            if state == "taken":
                launch(study, job)
            elif state == "finished":
                job.outcome = "done elsewhere" if job.seen_busy else "skipped"
                print(f"{header(study, job)}: " + ("finished by another process" if job.seen_busy else
                                                   "finished before, skipped"), flush=True)
        for job in [j for j in study.running if j.process.poll() is not None]:
            reap(study, job)
        if waiting and not study.running and all(j.seen_busy and not RunWriter(j.path).is_finished() for j in waiting):
            time.sleep(2)  # every remaining run is trained by another process: wait for them
        elif study.running:
            time.sleep(0.2)


def claim(job: Job) -> str:
    """Claims the run for this process: finished, busy (another process trains it), or taken."""
    run = RunWriter(job.path)
    if run.is_finished():
        return "finished"
    claims = job.path.parent / CLAIMS
    try:
        claims.mkdir(parents=True, exist_ok=True)
        fd = os.open(claims / f"{job.path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot create {claims}: {err.strerror}") from None
    with contextlib.suppress(BlockingIOError):  # another sweep process holds the claim
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not run.holder() and not run.is_finished():  # else trained outside any sweep, or finished just now
            job.claim = fd
            return "taken"
    os.close(fd)
    job.seen_busy = True
    return "finished" if run.is_finished() else "busy"


def header(study: Study, job: Job) -> str:
    return f"[sweep {study.jobs.index(job) + 1}/{len(study.jobs)}] {job.path}"


def launch(study: Study, job: Job) -> None:
    """The run in its own process and session: a terminal's Ctrl-C reaches only the sweep, which stops it (SIGTERM)."""
    run = RunWriter(job.path)
    job.resumed = bool(run.resume_points())
    restart = not job.resumed and run.is_run()  # stopped before its first resume point
    env = dict(os.environ)
    if study.devices:  # the device fewest running runs share, the first of them on a tie
        job.device = min(study.devices, key=[j.device for j in study.running].count)
        env["CUDA_VISIBLE_DEVICES"] = job.device
    elif study.threads:
        env.update(OMP_NUM_THREADS=str(study.threads), MKL_NUM_THREADS=str(study.threads))
    job.path.mkdir(parents=True, exist_ok=True)
    with open(job.path / "train.log", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{'resuming' if job.resumed else 'starting'} ({shlex.join(job.overrides)})\n")
        log.flush()
        command = [*study.command, "--config", str(job.config), *job.overrides, "--continue"]
        job.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True, preexec_fn=die_with_parent)
    job.started = time.time()
    study.running.append(job)
    where = f" on cuda:{job.device}" if job.device else f" ({study.threads} CPU threads)" if study.threads else ""
    doing = "resuming" if job.resumed else "restarting (no resume point yet)" if restart else "started"
    print(f"{header(study, job)}: {doing}{where}; log in {job.path / 'train.log'}", flush=True)


def reap(study: Study, job: Job) -> None:
    code = job.process.returncode
    study.running.remove(job)
    os.close(job.claim)
    job.outcome = "failed" if code else "resumed" if job.resumed else "finished"
    log = job.path / "train.log"
    failure = f" (exit code {code}{last_error(log)}; see {log})" if code else ""
    print(f"{header(study, job)}: {job.outcome}{failure} after {(time.time() - job.started) / 60:.1f} min", flush=True)


def last_error(log: Path) -> str:
    with contextlib.suppress(OSError):
        ends = [line for line in log.read_text(errors="replace").splitlines()[-50:]
                if line.startswith(("error: ", "stopped: "))]
        return f": {ends[-1]}" if ends else ""
    return ""


def stop_all(study: Study) -> None:
    """SIGTERM to every running run (each saves a resume point and exits), then wait for them."""
    for job in study.running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.process.pid, signal.SIGTERM)
    for job in study.running:
        with contextlib.suppress(KeyboardInterrupt, SweepStopped):
            job.process.wait()


class SweepStopped(Exception):
    """SIGTERM reached the sweep."""


def _stop(*_) -> None:
    raise SweepStopped()


def run(argv: list[str]) -> None:
    try:
        outcomes = main(argv)
    except (KeyboardInterrupt, SweepStopped) as err:
        print("\nsweep stopped; every running run saved a resume point: run the same command again to continue",
              file=sys.stderr)
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else 143)
    if "failed" in outcomes.values():
        sys.exit(1)


def cli() -> None:
    run_cli(run)


if __name__ == "__main__":
    cli()

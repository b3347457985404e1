"""Every command in the README and docs/ runs as written: the training commands check and resolve their config and
overrides (--print-config), a sweep command plans its study (every config, grid point and seed loaded and checked,
nothing trained), and the other commands answer --help. Shell variables set in the same block are expanded. No page
points at this machine's own data."""

import itertools
import math
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import PROJECT
from exp_1 import main as exp1
from exp_2 import main as exp2
from exp_2 import main_accelerate
from imdb_grad_accum import sweep

PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
MAINS = {"exp_1/main.py": exp1.main, "exp_2/main.py": exp2.main, "exp_2/main_accelerate.py": main_accelerate.main}
HELP_ONLY = ("bench/",)
COMMANDS = ("sweep", "results", "evaluate", "predict", "export")  # imdb-<command>, python -m imdb_grad_accum.<command>


def commands(page: Path) -> list[list[str]]:
    """The project's commands in a page's bash blocks, as argument lists (continuations joined, variables set in
    the block expanded, `accelerate launch ...` and `sbatch --wrap` reduced to the script they run)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            assignment = re.match(r'^(\w+)="(.*)"', line.strip())
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            for part in line.split("&&"):
                for name, value in variables.items():
                    part = part.replace(f"${name}", value)
                words = shlex.split(part, comments=True)
                if words[:1] == ["sbatch"] and "--wrap" in words:
                    words = shlex.split(words[words.index("--wrap") + 1])
                if words[:2] == ["accelerate", "launch"]:
                    words = ["python", *words[next(i for i, w in enumerate(words) if w.endswith(".py")):]]
                if words[:2] in (["python", "-m"], ["python3", "-m"]) and words[2].startswith("imdb_grad_accum."):
                    words = [f"imdb-{words[2].split('.', 1)[1]}", *words[3:]]
                if len(words) > 1 and words[0] in ("python", "python3") and words[1].startswith(("exp_", "bench/")):
                    found.append(words[1:])
                elif words and words[0] in {f"imdb-{c}" for c in COMMANDS}:
                    found.append(words)
    return found


ALL = [(page.relative_to(PROJECT), words) for page in PAGES for words in commands(page)]


def test_the_pages_have_commands_to_check():
    scripts = {words[0] for _, words in ALL}
    assert {"exp_1/main.py", "exp_2/main.py", "exp_2/main_accelerate.py", *(f"imdb-{c}" for c in COMMANDS)} <= scripts, \
        scripts


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_no_page_points_at_this_machines_own_data(page):
    assert "../shared" not in page.read_text(), "use a placeholder a user can fill in, e.g. /path/to/imdb"


@pytest.mark.parametrize("page, words", ALL, ids=[f"{page}: {' '.join(words)[:70]}" for page, words in ALL])
def test_every_command_in_the_readme_and_docs_runs_as_written(page, words, tmp_path, monkeypatch, capsys):
    # From a folder with the project's configs but not its runs/ or training_results/: a developer's own runs neither
    # change what a command plans nor get their tables rewritten.
    (tmp_path / "configs").symlink_to(PROJECT / "configs")
    monkeypatch.chdir(tmp_path)
    script, args = words[0], words[1:]
    if script in MAINS:
        with pytest.raises(SystemExit) as exit_info:
            MAINS[script]([*args, "--print-config"])
        assert exit_info.value.code == 0, capsys.readouterr().err
    elif script == "imdb-sweep":
        planned = []

        def plan_only(study):  # every run loaded and checked by sweep.plan; none is started
            for job in study.jobs:
                job.outcome = "planned"
                planned.append(job)

        monkeypatch.setattr(sweep, "run_study", plan_only)
        monkeypatch.setattr("imdb_grad_accum.device.visible_devices", lambda devices: devices.split(","))
        sweep.main(args)
        grids = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--grid"]
        seeds = next((len(list(itertools.takewhile(str.isdigit, args[i + 1:]))) for i, a in enumerate(args)
                      if a == "--seeds"), 1)
        configs = [a for i, a in enumerate(args) if a.endswith(".yaml") and args[i - 1] != "--comparisons"]
        assert len(planned) == len(configs) * math.prod(len(sweep.split_values(g.split("=", 1)[1])) for g in grids) \
            * seeds, [str(job.path) for job in planned]
    elif script.startswith("imdb-"):  # results, evaluate, predict, export: in this process
        import importlib

        module = importlib.import_module(f"imdb_grad_accum.{script[5:]}")
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
    else:
        assert script.startswith(HELP_ONLY) and (PROJECT / script).is_file(), script
        import subprocess

        result = subprocess.run([sys.executable, PROJECT / script, "--help"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]


def test_every_sabotage_still_breaks_the_product():
    """tests/sabotage.py (the table in tests/README.md) proves each promise has a failing test only while each
    sabotage's line is still in the product: a refactor that moves the line must move the sabotage with it."""
    from sabotage import SABOTAGES

    stale = [promise for promise, file, old, _, _ in SABOTAGES if (PROJECT / file).read_text().count(old) != 1]
    assert not stale, f"update these sabotages in tests/sabotage.py: {stale}"

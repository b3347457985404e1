"""Every kind of bad input stops before anything is written: one line naming the problem and the fix, exit code 2,
no traceback, and the directory exactly as it was."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from exp_1 import main as exp1
from exp_1.config import load_config, to_plain_dict
from exp_1.utils import run_cli
from exp_2 import main as exp2


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _folder(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for file, content in files.items():
        (folder / file).write_text(content)
    return folder


CASES = {
    # case: (script, extra arguments, expected words in the message)
    "unknown key": ("exp1", ["train.lrr=1e-4"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    "misspelled section": ("exp1", ["trian.lr=1e-4"], "unknown config key 'trian'; did you mean 'train'?"),
    "wrong type": ("exp1", ["train.batch_size=big"], "train.batch_size: Value 'big'"),
    "zero size": ("exp1", ["train.batch_size=0"], "train.batch_size=0 must be a positive integer"),
    "negative size": ("exp1", ["data.max_length=-5"], "data.max_length=-5 must be a positive integer"),
    "unknown choice": ("exp1", ["train.scheduler=exponential"], "train.scheduler='exponential' is not one of"),
    "two split weights": ("exp1", ["data.split=[9,1]"], "must be three positive train:validation:test weights"),
    "zero split weight": ("exp1", ["data.split=[9,0,1]"], "must be three positive train:validation:test weights"),
    "fraction out of range": ("exp1", ["train.warmup_ratio=1.5"], "train.warmup_ratio=1.5 must be in [0, 1)"),
    "negative lr": ("exp1", ["train.lr=-1"], "train.lr=-1.0 must be a positive number"),
    "override without =": ("exp1", ["train.lr"], "override 'train.lr' must look like dotted.key=value"),
    "accumulation does not divide": ("exp2", ["train.batch_size=8", "train.effective_batch_size=20"],
                                     "train.effective_batch_size=20 is not a multiple of train.batch_size=8"),
    "accumulation given twice": ("exp2", ["train.grad_accum_steps=2", "train.effective_batch_size=16"],
                                 "set train.grad_accum_steps or train.effective_batch_size, not both"),
    "accumulation in exp_1": ("exp1", ["train.grad_accum_steps=2"], "run exp_2/main.py for gradient accumulation"),
    "fp16 on cpu": ("exp1", ["train.precision=fp16"], "train.precision=fp16 needs a GPU"),
    "max_length beyond the model": ("exp1", ["data.max_length=4096"], "data.max_length=4096 is more than"),
    "unknown model, no hub": ("exp1", ["model.name=no-such-org/no-such-model"], "model.name=no-such-org/no-such-model: cannot load it"),
    "unknown dataset, no hub": ("exp1", ["data.path=no-such-org/no-such-dataset"], "cannot load it from the HF hub"),
    "missing data folder": ("exp1", ["data.path=DIR/nowhere"], "no such folder"),
    "data path is a file": ("exp1", ["data.path=DIR/notes.txt"], "is a file, not a folder"),
    "empty data folder": ("exp1", ["data.path=DIR/empty"], "cannot read data files there"),
    "missing columns": ("exp1", ["data.path=DIR/nocolumns"], "lacks column(s) label, text"),
    "labels not 0/1": ("exp1", ["data.path=DIR/stars"], "label 5 at row 0; labels must be 0 (negative) or 1 (positive)"),
    "empty texts": ("exp1", ["data.path=DIR/blank"], "empty or missing text(s), first at row 1"),
    "unreadable YAML": ("exp1", ["--config", "DIR/broken.yaml"], "is not valid YAML"),
    "YAML that is a list": ("exp1", ["--config", "DIR/list.yaml"], "must hold a mapping of keys, not list"),
    "directory as config": ("exp1", ["--config", "DIR"], "is a directory; pass a YAML file"),
    "missing config file": ("exp1", ["--config", "DIR/missing.yaml"], "missing.yaml not found"),
    "conflicting flags": ("exp1", ["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    "resume of no run": ("exp1", ["--resume", "name=never_ran"], "--resume: there is no run at"),
    "results without a flag": ("exp1", ["name=finished"], "already holds results; pass --resume to continue it, --overwrite"),
    "resume of a finished run": ("exp1", ["--resume", "name=finished"], "has finished (metrics.json exists)"),
    "resume with another config": ("exp1", ["--resume", "name=interrupted", "train.lr=0.5"],
                                   "the config differs from"),
    "resume with another script": ("exp1", ["--resume", "name=interrupted"], "was saved with {'script': 'accelerate'"),
    "a folder that is not a run": ("exp1", ["output_dir=DIR", "name=stars"], "exists and is not a run directory"),
    "a split left empty": ("exp1", ["data.split=[1000,1,1]"], "leaves no validation reviews out of 220"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, reviews_dir, tiny_bert, monkeypatch, capsys):
    script, extra, expected = CASES[case]
    _folder(tmp_path, "empty", {})
    _folder(tmp_path, "nocolumns", {"train.csv": "review,stars\ngood,5\n"})
    _folder(tmp_path, "stars", {"train.csv": "text,label\ngood,5\nbad,1\n"})
    _folder(tmp_path, "blank", {"train.csv": "text,label\ngood,1\n   ,0\n"})
    (tmp_path / "notes.txt").write_text("not a folder")
    (tmp_path / "broken.yaml").write_text("train: {lr: 1e-4\n")
    (tmp_path / "list.yaml").write_text("- train\n- lr\n")
    config = tiny_config(tmp_path, tiny_bert, reviews_dir)
    runs = tmp_path / "runs"
    for name, files in {"finished": ["config.yaml", "metrics.json", "history.jsonl"],
                        "interrupted": ["config.yaml", "history.jsonl", "checkpoints/resume/trainer.json"]}.items():
        for file in files:
            (runs / name / file).parent.mkdir(parents=True, exist_ok=True)
            saved = to_plain_dict(load_config(config, [f"name={name}"]))  # as a run saves it, resolved
            layout = {"script": "accelerate", "processes": 2, "accum_steps": 1}
            (runs / name / file).write_text(yaml.safe_dump(saved) if file == "config.yaml" else
                                            json.dumps({"layout": layout}) if file.endswith("trainer.json") else "{}\n")
    args = [a.replace("DIR", str(tmp_path)) for a in extra]
    argv = (args if "--config" in args else ["--config", str(config), *args])
    before = _tree(tmp_path)

    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli({"exp1": exp1.main, "exp2": exp2.main}[script])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    print(f"{case}: {lines[0] if lines else err}")
    assert exit_info.value.code == 2
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert _tree(tmp_path) == before

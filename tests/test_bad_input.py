"""Every kind of bad input stops before anything is written: one line naming the problem and the fix, exit code 2,
no traceback, and the directory exactly as it was."""

import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from exp_1 import main as exp1
from exp_1.cli import run_cli
from exp_1.config import PROJECT_NAME, load_config, to_plain_dict
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
    "label names not neg/pos": ("exp1", ["data.path=DIR/words"], "label 'good' at row 0; labels must be 0"),
    "a file that is not UTF-8": ("exp1", ["data.path=DIR/latin1"], "train.csv is not UTF-8 text"),
    "an aclImdb review not UTF-8": ("exp1", ["data.path=DIR/acl"], "1_9.txt is not UTF-8 text"),
    "training data of one class": ("exp1", ["data.path=DIR/positive"], "the training reviews are all of one class"),
    "seed out of range": ("exp1", ["seed=4294967296"], "seed=4294967296 must be between 0 and 4294967295"),
    "negative split seed": ("exp1", ["data.split_seed=-1"], "data.split_seed=-1 must be between 0 and"),
    "NaN in the split": ("exp1", ["data.split=[9,nan,1]"], "data.split[1]=nan must be a finite number"),
    "NaN weight decay": ("exp1", ["train.weight_decay=nan"], "train.weight_decay=nan must be a finite number"),
    "micro-batch tokens that are not a number": ("exp2", ["train.micro_batch_tokens=lots"],
                                                 "train.micro_batch_tokens=lots must be a positive number of tokens"),
    "zero micro-batch tokens": ("exp1", ["train.micro_batch_tokens=0"],
                                "train.micro_batch_tokens=0 must be a positive number of tokens, auto, or null"),
    "infinite clipping": ("exp1", ["train.max_grad_norm=inf"], "train.max_grad_norm=inf must be a finite number"),
    "negative workers": ("exp1", ["data.num_workers=-1"], "data.num_workers=-1 must be 0"),
    "padding beyond the positions": ("exp1", ["data.pad_to_multiple_of=1000"],
                                     "data.pad_to_multiple_of=1000 pads data.max_length=64 beyond the 512 positions"),
    "max_length 1": ("exp1", ["data.max_length=1"], "data.max_length=1 leaves no room for review text"),
    "max_length too small to keep both ends": ("exp1", ["data.max_length=4", "data.truncation=head_tail"],
                                                "use data.max_length=6 or more"),
    "unresolved interpolation": ("exp1", ["name=${nowhere}"], "name: cannot resolve it"),
    "tokenizer without a pad token": ("exp1", ["model.name=DIR/nopad"], "its tokenizer has no padding token"),
    "output_dir is a file": ("exp1", ["output_dir=DIR/notes.txt"], "output_dir=DIR/notes.txt is a file"),
    "a folder someone else wrote": ("exp1", ["output_dir=DIR", "name=victim"], "victim exists and is not a run"),
    "overwriting a folder someone else wrote": ("exp1", ["output_dir=DIR", "name=victim", "--overwrite"],
                                                "victim exists and is not a run"),
    "overwriting a run holding other files": ("exp1", ["name=annotated", "--overwrite"],
                                              "holds files this project did not write (notes.txt)"),
    "a run another process writes": ("exp1", ["name=busy", "--resume"], "busy is in use by process"),
    "empty texts": ("exp1", ["data.path=DIR/blank"], "empty or missing text(s), first at row 1"),
    "unreadable YAML": ("exp1", ["--config", "DIR/broken.yaml"], "is not valid YAML"),
    "YAML that is a list": ("exp1", ["--config", "DIR/list.yaml"], "must hold a mapping of keys, not list"),
    "directory as config": ("exp1", ["--config", "DIR"], "is a directory; pass a YAML file"),
    "missing config file": ("exp1", ["--config", "DIR/missing.yaml"], "missing.yaml not found"),
    "conflicting flags": ("exp1", ["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    "resume of no run": ("exp1", ["--resume", "name=never_ran"], "--resume: there is no run at"),
    "a finished run without a flag": ("exp1", ["name=finished"], "holds a finished run; pass --overwrite to train it"),
    "an interrupted run without a flag": ("exp1", ["name=interrupted"], "already holds results; pass --resume to continue"),
    "a damaged marker": ("exp1", ["name=unmarked", "--overwrite"], "run.json is damaged or not this project's"),
    "an empty value": ("exp1", ["train.lr="], "command line: train.lr is empty; give it a value"),
    "a value for a section": ("exp1", ["train=5"], "train is a section; set its keys, e.g. train.batch_size=..."),
    "a tab in YAML": ("exp1", ["--config", "DIR/tabs.yaml"], "is not valid YAML: found character '\\t' that cannot start any token at line 2"),
    "more micro-batches than reviews": ("exp2", ["train.grad_accum_steps=1000000"],
                                        "needs at least as many training reviews, and there are 180"),
    "a size beyond any machine": ("exp1", ["train.batch_size=99999999999999"], "must be a positive integer up to 2147483647"),
    "resume of a finished run": ("exp1", ["--resume", "name=finished"], "has finished (metrics.json exists)"),
    "resume with every point damaged": ("exp1", ["--resume", "name=damaged"], "no usable resume point"),
    "resume with another config": ("exp1", ["--resume", "name=interrupted", "train.lr=0.5"],
                                   "the config differs from"),
    "resume with another script": ("exp1", ["--resume", "name=interrupted"], "was saved with {'script': 'accelerate'"),
    "a folder that is not a run": ("exp1", ["output_dir=DIR", "name=stars"], "exists and is not a run directory"),
    "a split left empty": ("exp1", ["data.split=[1000,1,1]"], "leaves no validation reviews out of 220"),
}


def _fake_run(runs: Path, name: str, config: Path, files: dict, layout=None, damaged=False) -> None:
    """A run directory as the project writes it: marker, config, and a resume point whose manifest matches."""
    run = runs / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"project": PROJECT_NAME, "wandb_id": "x"}))
    (run / ".lock").write_text("")
    (run / "config.yaml").write_text(yaml.safe_dump(to_plain_dict(load_config(config, [f"name={name}"]))))
    for file, content in files.items():
        (run / file).write_text(content)
    if layout:
        point = run / "checkpoints" / "resume" / "000001"
        point.mkdir(parents=True)
        contents = {"trainer.json": json.dumps({"layout": layout}), "model.safetensors": "m",
                    "optimizer.safetensors": "o", "history.jsonl": "", "rng_0.safetensors": "r"}
        for file, content in contents.items():
            (point / file).write_text(content)
        digests = {file: hashlib.sha256(content.encode()).hexdigest() for file, content in contents.items()}
        if damaged:
            digests["model.safetensors"] = "0" * 64
        (point / "manifest.json").write_text(json.dumps({"files": digests}))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, reviews_dir, tiny_bert, monkeypatch, capsys):
    script, extra, expected = CASES[case]
    _folder(tmp_path, "empty", {})
    _folder(tmp_path, "nocolumns", {"train.csv": "review,stars\ngood,5\n"})
    _folder(tmp_path, "stars", {"train.csv": "text,label\ngood,5\nbad,1\n"})
    _folder(tmp_path, "words", {"train.csv": "text,label\nfine,good\nawful,bad\n"})
    _folder(tmp_path, "blank", {"train.csv": "text,label\ngood,1\n   ,0\n"})
    _folder(tmp_path, "positive", {"train.csv": "text,label\n" + "".join(f"review {i},1\n" for i in range(50))})
    (_folder(tmp_path, "latin1", {}) / "train.csv").write_bytes("text,label\ntrès bon,1\nnul,0\n".encode("latin-1"))
    for split in ("train", "test"):
        for sentiment in ("pos", "neg"):
            folder = tmp_path / "acl" / "aclImdb" / split / sentiment
            folder.mkdir(parents=True)
            for i in range(20):
                (folder / f"{i}_{9 if sentiment == 'pos' else 2}.txt").write_text(f"{sentiment} review {split} {i}")
    (tmp_path / "acl" / "aclImdb" / "train" / "pos" / "1_9.txt").write_bytes("très bon".encode("latin-1"))
    nopad = tmp_path / "nopad"
    shutil.copytree(tiny_bert, nopad)
    settings = json.loads((nopad / "tokenizer_config.json").read_text())
    settings["pad_token"] = None
    (nopad / "tokenizer_config.json").write_text(json.dumps(settings))
    (tmp_path / "notes.txt").write_text("not a folder")
    (tmp_path / "broken.yaml").write_text("train: {lr: 1e-4\n")
    (tmp_path / "list.yaml").write_text("- train\n- lr\n")
    (tmp_path / "tabs.yaml").write_text("train:\n\tlr: 0.1\n")
    _folder(tmp_path, "victim", {"config.yaml": "k: v\n", "precious.txt": "notes"})
    config = tiny_config(tmp_path, tiny_bert, reviews_dir)
    runs = tmp_path / "runs"
    _fake_run(runs, "finished", config, {"metrics.json": "{}\n", "history.jsonl": "{}\n"})
    _fake_run(runs, "annotated", config, {"metrics.json": "{}\n", "notes.txt": "mine"})
    layout = {"script": "accelerate", "processes": 1, "accum_steps": 1}
    _fake_run(runs, "interrupted", config, {"history.jsonl": "{}\n"}, layout)
    _fake_run(runs, "damaged", config, {"history.jsonl": "{}\n"}, {**layout, "script": "exp_1/main.py"}, damaged=True)
    _fake_run(runs, "unmarked", config, {"metrics.json": "{}\n"})
    (runs / "unmarked" / "run.json").write_text("{garbage")
    _fake_run(runs, "busy", config, {"history.jsonl": "{}\n"}, layout)
    lock = open(runs / "busy" / ".lock", "w")  # as another process writing the run would hold it
    fcntl.flock(lock, fcntl.LOCK_EX)
    args = [a.replace("DIR", str(tmp_path)) for a in extra]
    argv = (args if "--config" in args else ["--config", str(config), *args])
    expected = expected.replace("DIR", str(tmp_path))
    before = _tree(tmp_path)

    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli({"exp1": exp1.main, "exp2": exp2.main}[script])
    lock.close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    print(f"{case}: {lines[0] if lines else err}")
    assert exit_info.value.code == 2
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert _tree(tmp_path) == before


def test_a_tilde_in_output_dir_means_home(tmp_path, reviews_dir, tiny_bert, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, output_dir="~/runs", train={"epochs": 1})
    exp1.main(["--config", str(config)])
    assert (tmp_path / "home" / "runs" / "tiny" / "metrics.json").is_file()
    assert not (tmp_path / "~").exists()

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
from imdb_grad_accum.cli import run_cli
from imdb_grad_accum.config import PROJECT_NAME, StepLayout, load_config, to_plain_dict
from imdb_grad_accum.resume import ResumePoints
from imdb_grad_accum.writer import RunWriter
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
    "zero epochs": ("exp1", ["train.epochs=0"], "train.epochs=0 must be a positive integer"),
    "an unknown pooling": ("exp1", ["model.pooling=max"], "model.pooling='max' is not one of mean, cls"),
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
    "missing data folder": ("exp1", ["data.path=DIR/nowhere"], "nowhere: no such file or folder"),
    "data path is a file": ("exp1", ["data.path=DIR/notes.txt"], "notes.txt is not a data file"),
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
    "empty texts": ("exp1", ["data.path=DIR/blank"], "empty or missing text(s) in split 'train', first at row 1"),
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
    "resume with another script": ("exp1", ["--resume", "name=interrupted"],
                                   "was saved with {'experiment': 'exp_2', 'trainer': 'accelerate'"),
    "a folder that is not a run": ("exp1", ["output_dir=DIR", "name=stars"], "exists and is not a run directory"),
    "a split left empty": ("exp1", ["data.split=[1000,1,1]"], "leaves no validation reviews out of 220"),
    # what a run directory is, checked as deeply as what it holds
    "overwriting a run with a file of its own below the top": (
        "exp1", ["name=nested", "--overwrite"], "holds files this project did not write (checkpoints/my_backup"),
    "overwriting a run with a link in it": ("exp1", ["name=linked", "--overwrite"],
                                            "holds files this project did not write (model)"),
    "a model folder without tokenizer files": ("exp1", ["model.name=MODELS/no_tokenizer"],
                                               "are the tokenizer files (tokenizer.json, vocab) missing from it?"),
    "a model with fewer embeddings than tokens": ("exp1", ["model.name=MODELS/small_vocab"],
                                                  "tokens but the model only 1000 embeddings"),
    "a model that is not an encoder": ("exp1", ["model.name=MODELS/t5"], "is a t5 model with a decoder"),
    "damaged weights in model.name": ("exp1", ["model.name=MODELS/corrupt"], "cannot load its weights"),
    "resume after the data changed": ("exp1", ["name=changed_data", "--resume"],
                                      "now gives another split than the one this run was started on"),
    "resume from another run's point": ("exp1", ["name=foreign_point", "--resume"],
                                        "point-000001 is unusable (it belongs to another run)"),
    "resume with a manifest of the wrong shape": ("exp1", ["name=null_manifest", "--resume"],
                                                  "point-000001 is unusable (manifest.json is damaged)"),
    "resume with a damaged config.yaml": ("exp1", ["name=bad_config", "--resume"], "config.yaml is missing or damaged"),
    "a duplicate key in a config": ("exp1", ["--config", "DIR/twice.yaml"],
                                    "key 'train' appears twice, at lines 1 and 3; keep one"),
    "an override with a YAML syntax error": ("exp1", ["data.split=[1,1"], "the value is not valid YAML"),
    "an override with a control character": ("exp1", ["name=a\x07b"], "the value is not valid YAML"),
    "an override without a key": ("exp1", ["=x"], "'' is not a dotted config key"),
    "an override with an empty key part": ("exp1", ["train..lr=1"], "'train..lr' is not a dotted config key"),
    "a config nested too deeply": ("exp1", ["--config", "DIR/deep.yaml"], "is nested too deeply"),
    "a name longer than a folder name may be": ("exp1", ["name=" + "n" * 300], "folder names take at most 255"),
    "a path longer than the filesystem takes": ("exp1", ["output_dir=" + "/".join(["d" * 200] * 25)],
                                                "too long for the filesystem"),
    # the training controls
    "negative patience": ("exp1", ["train.early_stopping_patience=-1"], "train.early_stopping_patience=-1 must be"),
    "NaN min_delta": ("exp1", ["train.early_stopping_min_delta=nan"], "train.early_stopping_min_delta=nan must be"),
    "validation every 0 steps": ("exp1", ["train.eval_every_steps=0"], "train.eval_every_steps=0 must be a positive"),
    "a beta of 1": ("exp1", ["train.adam_betas=[0.9,1.0]"], "train.adam_betas=[0.9, 1.0] must be two decay rates"),
    "three betas": ("exp1", ["train.adam_betas=[0.9,0.99,0.999]"], "must be two decay rates in [0, 1)"),
    "eps of 0": ("exp1", ["train.adam_eps=0"], "train.adam_eps=0.0 must be a positive number"),
    "an unknown progress mode": ("exp1", ["train.progress=fancy"], "train.progress='fancy' is not one of auto, bar"),
    # the recipes
    "a layer decay of 0": ("exp1", ["train.layer_lr_decay=0"], "train.layer_lr_decay=0.0 must be in (0, 1]"),
    "a layer decay above 1": ("exp1", ["train.layer_lr_decay=1.5"], "train.layer_lr_decay=1.5 must be in (0, 1]"),
    "label smoothing of 1": ("exp1", ["train.label_smoothing=1"], "train.label_smoothing=1.0 must be in [0, 1)"),
    "negative label smoothing": ("exp1", ["train.label_smoothing=-0.1"], "train.label_smoothing=-0.1 must be in"),
    "freezing what has no name": ("exp1", ["train.freeze=head"], "train.freeze=head must be embeddings, encoder"),
    "freezing more layers than exist": ("exp1", ["train.freeze=5"], "train.freeze=5: "),
    # messages a newcomer meets
    "one value for a list key": ("exp1", ["train.adam_betas=0.9"], "train.adam_betas takes a list, e.g. "),
    "a list as base": ("exp1", ["--config", "DIR/baselist.yaml"], "base: takes one file name"),
    "a base that is missing": ("exp1", ["--config", "DIR/missingbase.yaml"],
                               "nowhere.yaml (named by base: in DIR/missingbase.yaml) not found"),
    "a section's key at the top": ("exp1", ["lr=1e-4"], "unknown config key 'lr'; did you mean 'train.lr'?"),
    "CUDA graphs without compile": ("exp1", ["train.cuda_graphs=true"], "it needs train.compile=true"),
}


def _fake_run(runs: Path, name: str, config: Path, files: dict, layout=None, damaged=False, run_id="x",
              foreign=()) -> None:
    """A run directory as the project writes it: marker (recording every path but `foreign`), config, and a resume
    point whose manifest matches (and that belongs to the run `run_id`)."""
    run = runs / name
    (run / "checkpoints").mkdir(parents=True)
    (run / ".lock").write_text("")
    saved = yaml.safe_dump(to_plain_dict(load_config(config, [f"name={name}"])))
    (run / "config.yaml").write_text(saved)
    for file, content in files.items():
        (run / file).parent.mkdir(parents=True, exist_ok=True)
        (run / file).write_text(content)
    if layout:
        point = run / "checkpoints" / "resume" / "point-000001"
        point.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"project": PROJECT_NAME, "id": "x", "wandb_ids": ["x"],
                                                  "files": ["config.yaml"]}))
        identity = {**ResumePoints(RunWriter(run), ("x", "y"), StepLayout(1, 1, 1, None), *[None] * 4).identity(),
                    "run_id": run_id}
        contents = {"trainer.json": json.dumps({"run": identity, "layout": layout, "state": {}}), "model.safetensors": "m",
                    "optimizer.safetensors": "o", "history.jsonl": "", "rng_0.safetensors": "r"}
        for file, content in contents.items():
            (point / file).write_text(content)
        digests = {file: hashlib.sha256(content.encode()).hexdigest() for file, content in contents.items()}
        if damaged:
            digests["model.safetensors"] = "0" * 64
        (point / "manifest.json").write_text(json.dumps({"files": digests}))
    written = {str(p.relative_to(run)) for p in run.rglob("*")} - {"run.json", ".lock"} - set(foreign)
    (run / "run.json").write_text(json.dumps({"project": PROJECT_NAME, "id": "x", "wandb_ids": ["x"],
                                              "files": sorted(written)}))


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tiny_bert) -> Path:
    """Model folders that load but must not be trained: without tokenizer files, with fewer embeddings than the
    tokenizer has tokens, an encoder-decoder (T5), and with damaged weights."""
    from transformers import AutoModel, BertConfig, T5Config

    root = tmp_path_factory.mktemp("odd_models")
    AutoModel.from_config(BertConfig.from_pretrained(tiny_bert)).save_pretrained(root / "no_tokenizer")
    small = root / "small_vocab"
    shutil.copytree(tiny_bert, small)
    AutoModel.from_config(BertConfig.from_pretrained(tiny_bert, vocab_size=1000)).save_pretrained(small)
    t5 = root / "t5"
    shutil.copytree(tiny_bert, t5)
    (t5 / "model.safetensors").unlink()
    (t5 / "config.json").unlink()
    AutoModel.from_config(T5Config(vocab_size=30522, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                   d_kv=16)).save_pretrained(t5)
    corrupt = root / "corrupt"
    shutil.copytree(tiny_bert, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return root


@pytest.fixture(scope="module")
def true_split(tmp_path_factory, tiny_bert) -> str:
    """split.json as a run of the tiny config on the synthetic reviews writes it."""
    from conftest import write_reviews
    from imdb_grad_accum.data import prepare_data
    from imdb_grad_accum.model import load_model

    root = tmp_path_factory.mktemp("split")
    cfg = load_config(tiny_config(root, tiny_bert, write_reviews(root / "reviews")))
    tokenizer, model = load_model(cfg)
    return json.dumps(prepare_data(cfg, tokenizer, model.input_names).record)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert, odd_models, true_split):
    """One folder holding every bad thing the cases point at: data folders, configs, model folders and run
    directories in every state, one of them locked as a writing process would hold it. Every case must leave it
    exactly as it was, so the cases share it."""
    from conftest import write_reviews

    root = tmp_path_factory.mktemp("bad_input")
    _folder(root, "empty", {})
    _folder(root, "nocolumns", {"train.csv": "review,stars\ngood,5\n"})
    _folder(root, "stars", {"train.csv": "text,label\ngood,5\nbad,1\n"})
    _folder(root, "words", {"train.csv": "text,label\nfine,good\nawful,bad\n"})
    _folder(root, "blank", {"train.csv": "text,label\ngood,1\n   ,0\n"})
    _folder(root, "positive", {"train.csv": "text,label\n" + "".join(f"review {i},1\n" for i in range(50))})
    (_folder(root, "latin1", {}) / "train.csv").write_bytes("text,label\ntrès bon,1\nnul,0\n".encode("latin-1"))
    for split in ("train", "test"):
        for sentiment in ("pos", "neg"):
            folder = root / "acl" / "aclImdb" / split / sentiment
            folder.mkdir(parents=True)
            for i in range(20):
                (folder / f"{i}_{9 if sentiment == 'pos' else 2}.txt").write_text(f"{sentiment} review {split} {i}")
    (root / "acl" / "aclImdb" / "train" / "pos" / "1_9.txt").write_bytes("très bon".encode("latin-1"))
    nopad = root / "nopad"
    shutil.copytree(tiny_bert, nopad)
    settings = json.loads((nopad / "tokenizer_config.json").read_text())
    settings["pad_token"] = None
    (nopad / "tokenizer_config.json").write_text(json.dumps(settings))
    (root / "notes.txt").write_text("not a folder")
    (root / "broken.yaml").write_text("train: {lr: 1e-4\n")
    (root / "list.yaml").write_text("- train\n- lr\n")
    (root / "tabs.yaml").write_text("train:\n\tlr: 0.1\n")
    (root / "twice.yaml").write_text("train: {lr: 0.1}\nseed: 3\ntrain: {epochs: 1}\n")
    (root / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    (root / "baselist.yaml").write_text("base: [quickstart.yaml]\n")
    (root / "missingbase.yaml").write_text("base: nowhere.yaml\n")
    _folder(root, "victim", {"config.yaml": "k: v\n", "precious.txt": "notes"})
    config = tiny_config(root, tiny_bert, write_reviews(root / "reviews"))
    runs = root / "runs"
    _fake_run(runs, "finished", config, {"metrics.json": "{}\n", "history.jsonl": "{}\n"})
    _fake_run(runs, "annotated", config, {"metrics.json": "{}\n", "notes.txt": "mine"}, foreign={"notes.txt"})
    layout = {"experiment": "exp_2", "trainer": "accelerate", "effective_batch": 8, "processes": 1,
              "grad_accum_steps": 1, "micro_batch_tokens": None}
    _fake_run(runs, "interrupted", config, {"history.jsonl": "{}\n", "split.json": true_split}, layout)
    _fake_run(runs, "damaged", config, {"history.jsonl": "{}\n", "split.json": true_split},
              {**layout, "experiment": "exp_1", "trainer": "pytorch"}, damaged=True)
    _fake_run(runs, "unmarked", config, {"metrics.json": "{}\n"})
    (runs / "unmarked" / "run.json").write_text("{garbage")
    _fake_run(runs, "busy", config, {"history.jsonl": "{}\n"}, layout)
    _fake_run(runs, "nested", config, {"metrics.json": "{}\n", "checkpoints/my_backup.safetensors": "mine",
                                       "predictions/my_analysis.md": "mine"},
              foreign={"checkpoints/my_backup.safetensors", "predictions/my_analysis.md"})
    _fake_run(runs, "linked", config, {"metrics.json": "{}\n"})
    (runs / "linked" / "model").symlink_to(_folder(root, "elsewhere", {"precious.txt": "mine"}))
    own_layout = {**layout, "experiment": "exp_1", "trainer": "pytorch"}
    _fake_run(runs, "changed_data", config, {"history.jsonl": "{}\n", "split.json": '{"train": [1, 2, 3]}'},
              own_layout)
    _fake_run(runs, "foreign_point", config, {"history.jsonl": "{}\n", "split.json": true_split}, own_layout,
              run_id="another")
    _fake_run(runs, "null_manifest", config, {"history.jsonl": "{}\n", "split.json": true_split}, own_layout)
    (runs / "null_manifest" / "checkpoints" / "resume" / "point-000001" / "manifest.json").write_text('{"files": null}')
    _fake_run(runs, "bad_config", config, {"history.jsonl": "{}\n"}, own_layout)
    (runs / "bad_config" / "config.yaml").write_text("train: [unclosed\n")
    lock = open(runs / "busy" / ".lock", "w")  # as another process writing the run would hold it
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.write(f"{os.getpid()} python exp_1/main.py --config ...\n")
    lock.flush()
    yield root, config, odd_models
    lock.close()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, world, monkeypatch, capfd):
    """The whole of what the command prints is one line on stderr, and nothing on disk changes."""
    script, extra, expected = CASES[case]
    root, config, models = world
    args = [a.replace("DIR", str(root)).replace("MODELS", str(models)) for a in extra]
    argv = (args if "--config" in args else ["--config", str(config), *args])
    expected = expected.replace("DIR", str(root))
    before = _tree(root)

    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli({"exp1": exp1.main, "exp2": exp2.main}[script])
    out, err = capfd.readouterr()
    print(f"{case}: {err}")
    assert exit_info.value.code == 2
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and expected in err, (out[-2000:], err[-2000:])
    assert _tree(root) == before


def test_a_tilde_in_output_dir_means_home(tmp_path, reviews_dir, tiny_bert, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, output_dir="~/runs", train={"epochs": 1})
    exp1.main(["--config", str(config)])
    assert (tmp_path / "home" / "runs" / "tiny" / "metrics.json").is_file()
    assert not (tmp_path / "~").exists()

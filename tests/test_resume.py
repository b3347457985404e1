"""Crash safety: a run killed mid-epoch (SIGKILL) or during a checkpoint write resumes to exactly the metrics of an
uninterrupted run; identical seeds give identical runs; a diverging loss stops cleanly; WandB never blocks;
secrets stay out of the run directory."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import PROJECT, tiny_config
from exp_1 import main as exp1
from exp_1.config import TrainingStopped
from exp_2 import main as exp2

SCRIPTS = {"exp1": [str(PROJECT / "exp_1" / "main.py")], "exp2": [str(PROJECT / "exp_2" / "main.py")],
           "accelerate": ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(PROJECT / "exp_2" / "main_accelerate.py")]}


def _history(run):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in (run / "history.jsonl").read_text().splitlines()]


def _same_results(a, b):
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    for key in ("test_loss", "test_accuracy", "test_f1", "best_epoch", "optimizer_steps", "n_test"):
        assert ma[key] == mb[key], key
    assert _history(a) == _history(b)


def _start(script, config, *args):
    return subprocess.Popen([sys.executable, *SCRIPTS[script], "--config", str(config), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("script, extra", [("exp1", []), ("exp2", ["train.batch_size=4", "train.grad_accum_steps=2"]),
                                           ("accelerate", ["train.batch_size=4", "train.grad_accum_steps=2"])])
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(script, extra, tmp_path, tiny_bert, reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, checkpoint={"every_steps": 3},
                         model={"dropout": 0.1, "encoder_dropout": None},  # dropout on: RNG states must resume too
                         train={"epochs": 2, "log_every": 2})
    runs = tmp_path / "runs"
    whole = _start(script, config, "name=whole", *extra)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]

    killed = _start(script, config, "name=killed", *extra)
    trainer = runs / "killed" / "checkpoints" / "resume" / "trainer.json"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill as soon as a mid-epoch resume point of epoch 2 exists
        try:
            point = json.loads(trainer.read_text())
        except (OSError, ValueError):
            point = None
        if point and point["epoch"] == 2 and point["batches_done"] > 0:
            break
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and its training process, as a pre-emption would
    killed.wait()
    assert not (runs / "killed" / "metrics.json").exists()
    point = json.loads(trainer.read_text())
    print(f"{script}: killed with the latest resume point at epoch {point['epoch']}, micro-batch "
          f"{point['batches_done']}, optimizer step {point['progress']['step']}")

    resumed = _start(script, config, "name=killed", "--resume", *extra)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    _same_results(runs / "whole", runs / "killed")
    metrics = json.loads((runs / "killed" / "metrics.json").read_text())
    print(f"{script}: resumed test_loss {metrics['test_loss']!r} accuracy {metrics['test_accuracy']!r}, equal to the "
          "uninterrupted run")


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_point_usable(tmp_path, tiny_bert, reviews_dir, monkeypatch):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, checkpoint={"every_steps": 5}, train={"epochs": 2})
    exp2.main(["--config", str(config), "name=whole", "train.batch_size=4", "train.grad_accum_steps=2"])

    import exp_1.train as train

    writes = {"n": 0}
    real_save = train.save_training_state

    def dies_on_the_fourth_write(folder, model, optimizer):
        writes["n"] += 1
        real_save(folder, model, optimizer)
        if writes["n"] == 4:  # the process dies after writing the weights, before the point is complete
            (folder / "trainer.json").write_text("{half")
            raise KeyboardInterrupt("simulated kill during a checkpoint write")

    monkeypatch.setattr(train, "save_training_state", dies_on_the_fourth_write)
    monkeypatch.setattr("exp_1.main.save_training_state", dies_on_the_fourth_write)
    with pytest.raises(KeyboardInterrupt):
        exp2.main(["--config", str(config), "name=crashed", "train.batch_size=4", "train.grad_accum_steps=2"])
    monkeypatch.undo()
    run = tmp_path / "runs" / "crashed"
    assert (run / "checkpoints" / "resume.tmp").is_dir()  # the half-written point
    assert json.loads((run / "checkpoints" / "resume" / "trainer.json").read_text())["progress"]["step"] == 15
    exp2.main(["--config", str(config), "name=crashed", "--resume", "train.batch_size=4", "train.grad_accum_steps=2"])
    _same_results(tmp_path / "runs" / "whole", run)


def test_same_seed_same_config_gives_identical_runs(tmp_path, tiny_bert, reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, model={"dropout": 0.1, "encoder_dropout": None},
                         train={"epochs": 1})
    exp1.main(["--config", str(config), "name=a"])
    exp1.main(["--config", str(config), "name=b"])
    _same_results(tmp_path / "runs" / "a", tmp_path / "runs" / "b")


def test_a_diverging_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path, tiny_bert, reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, checkpoint={"every_steps": 1},
                         train={"lr": 1e30, "max_grad_norm": None, "warmup_ratio": 0.0})
    with pytest.raises(TrainingStopped, match=r"the training loss is nan at optimizer step (\d+) \(epoch 1\)") as err:
        exp1.main(["--config", str(config)])
    step = int(str(err.value).split("optimizer step ")[1].split()[0])
    point = json.loads((tmp_path / "runs" / "tiny" / "checkpoints" / "resume" / "trainer.json").read_text())
    assert step > 1 and point["progress"]["step"] == step - 1  # the last good step's resume point is kept


def test_wandb_auto_without_network_finishes_offline_and_keeps_secrets_out(tmp_path, tiny_bert, reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, tracking={"wandb_mode": "auto"}, train={"epochs": 1})
    secret = "0123456789abcdef0123456789abcdef01234567"
    env = {**os.environ, "WANDB_API_KEY": secret, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_SILENT": "true"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *SCRIPTS["exp1"], "--config", str(config)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.perf_counter() - started < 120
    run = tmp_path / "runs" / "tiny"
    assert list((run / "wandb").glob("offline-run-*")), "no offline WandB run to `wandb sync` later"
    assert "offline" in result.stdout
    for file in run.rglob("*"):
        if file.is_file() and "wandb" not in file.parts:
            assert secret.encode() not in file.read_bytes(), file

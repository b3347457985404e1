"""The training controls: validation every N optimizer steps, early stopping, activation checkpointing, AdamW's betas
and eps, and output that reads well in a log file."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import PROJECT, tiny_config, train_config, window_sampler
from exp_1 import main as exp1
from imdb_grad_accum.config import load_config
from imdb_grad_accum.batching import make_train_loader
from imdb_grad_accum.data import prepare_data
from imdb_grad_accum.model import checkpoint_activations, load_model
from imdb_grad_accum.training import Stepper, build_optimizer
from exp_2 import main as exp2


def _history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_validation_every_n_steps_happens_at_exactly_those_steps_and_any_may_be_the_best(tmp_path, tiny_bert,
                                                                                          reviews_dir):
    """180 reviews in batches of 8: 23 steps an epoch. Every 5 steps, and at each epoch's end (23, 46)."""
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"eval_every_steps": 5, "epochs": 2},
                         checkpoint={"keep_resume_points": True})
    metrics = exp1.main(["--config", str(config)])
    validations = [h for h in _history(tmp_path / "runs" / "tiny") if "val/loss" in h]
    assert [h["step"] for h in validations] == [5, 10, 15, 20, 23, 25, 30, 35, 40, 45, 46]
    for h in validations:  # each epoch: 22 steps of 8 reviews and a last one of 4
        samples = h["step"] // 23 * 180 + h["step"] % 23 * 8
        assert h["val/samples"] == samples and h["epoch"] == pytest.approx(samples / 180, abs=1e-6)
    assert [h["epoch"] for h in validations if h["step"] in (23, 46)] == [1, 2]
    best = max(validations, key=lambda h: (h["val/accuracy"], -h["step"]))  # the first of the best wins
    assert (metrics["best_step"], metrics["best_epoch"]) == (best["step"], best["epoch"])
    assert metrics["stopped_early_at"] is None
    points = sorted((tmp_path / "runs" / "tiny" / "checkpoints" / "resume").iterdir())
    assert len(points) == 2  # every validation wrote a point; the newest two are kept


@pytest.mark.parametrize("script", ["exp2", pytest.param("accelerate x2", marks=pytest.mark.slow)])
def test_early_stopping_stops_at_the_expected_validation_under_1_and_2_processes(script, tmp_path, tiny_bert,
                                                                                 reviews_dir):
    """With an lr of 0 nothing improves after the first validation: patience 2 stops at the third."""
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"eval_every_steps": 3, "epochs": 3, "lr": 1e-12,
                                                                   "early_stopping_patience": 2,
                                                                   "early_stopping_min_delta": 0.01})
    args = ["--config", str(config), "train.batch_size=4", "train.grad_accum_steps=2"]
    if script == "exp2":
        metrics = exp2.main(args)
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision",
                  "no", "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2",
                  str(PROJECT / "exp_2" / "main_accelerate.py"), *args, "train.batch_size=2"]
        result = subprocess.run(launch, capture_output=True, text=True, timeout=600,
                                env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    validations = [h for h in _history(tmp_path / "runs" / "tiny") if "val/loss" in h]
    assert [h["step"] for h in validations] == [3, 6, 9]
    assert metrics["stopped_early_at"] == {"step": 9, "epoch": validations[-1]["epoch"]}
    assert metrics["optimizer_steps"] == 9 and metrics["best_step"] == 3


def _window(tiny, tmp_path, packed: bool):
    cfg = load_config(tiny_config(tmp_path, tiny, tmp_path.parent / "reviews"))
    tokenizer, model = load_model(cfg, packed=packed)
    splits = prepare_data(cfg, tokenizer, model.input_names)
    sampler = window_sampler(splits.train["length"], 12, 1, seed=1)
    return model, next(iter(make_train_loader(splits.train, sampler, tokenizer, cfg, packed=packed)))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_modernbert"])
def test_activation_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(fixture, packed, request,
                                                                                     tmp_path, reviews_dir):
    """The encoder's layers run again in the backward pass (forward calls double), and the gradients are those of a
    plain step."""
    from imdb_grad_accum.model import encoder_layers

    (tmp_path / "cfg").mkdir()
    model, batch = _window(request.getfixturevalue(fixture), tmp_path / "cfg", packed)
    checkpointed = copy.deepcopy(model)
    checkpoint_activations(checkpointed)
    grads, calls = [], []
    for m in (model, checkpointed):
        m.train()
        count = [0]
        inside = next(encoder_layers(m)[0].children())  # a module inside the first layer: run again if recomputed
        inside.register_forward_pre_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        stepper = Stepper(m, torch.optim.SGD(m.parameters(), lr=0.0), None, torch.device("cpu"), "fp32",
                          train_config(max_grad_norm=None))
        stepper.forward_backward(batch)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-5, rtol=1e-5), name


@pytest.mark.slow
def test_activation_checkpointing_trains_under_two_processes_like_without(tmp_path, tiny_bert, reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"epochs": 1, "batch_size": 4,
                                                                   "grad_accum_steps": 2})
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", str(PROJECT / "exp_2" / "main_accelerate.py"),
              "--config", str(config)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    for name, flag in (("plain", "false"), ("checkpointed", "true")):
        result = subprocess.run([*launch, f"name={name}", f"train.activation_checkpointing={flag}"],
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    plain, checkpointed = (json.loads((tmp_path / "runs" / n / "metrics.json").read_text()) for n in ("plain",
                                                                                                         "checkpointed"))
    assert checkpointed["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-5)


def test_betas_and_eps_reach_the_optimizer(tmp_path, tiny_bert, reviews_dir):
    cfg = load_config(tiny_config(tmp_path, tiny_bert, reviews_dir, train={"adam_betas": [0.9, 0.98],
                                                                           "adam_eps": 1e-6}))
    _, model = load_model(cfg)
    for group in build_optimizer(model, cfg.train, 1e-3, torch.device("cpu")).param_groups:
        assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6


def test_a_run_whose_output_goes_to_a_file_writes_plain_lines(tmp_path, tiny_bert, reviews_dir, monkeypatch):
    """Standard output and error are a file (nohup, a cluster's log): no progress bar, no carriage return, from
    this project or the libraries (tokenising, loading weights), and plain progress lines instead."""
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"epochs": 1})
    with open(tmp_path / "train.log", "w") as log:
        monkeypatch.setattr(sys, "stdout", log)
        monkeypatch.setattr(sys, "stderr", log)
        exp1.main(["--config", str(config)])
        monkeypatch.undo()
    text = (tmp_path / "train.log").read_text()
    assert "\r" not in text and "\x1b[" not in text
    assert "epoch 1 step 1/23 (optimizer step 1): loss" in text and "test accuracy" in text

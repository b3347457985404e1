"""Experiment 2: exact gradient accumulation (plain PyTorch and Accelerate), sample order independent of how the
effective batch is cut, 2 CPU processes equal to 1, and the scheduler counting optimizer steps."""

import copy
import csv
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import PROJECT, synthetic_reviews, tiny_config, train_config, window_sampler
from exp_1 import main as exp1
from imdb_grad_accum.config import load_config
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.batching import make_train_loader
from imdb_grad_accum.data import prepare_data
from imdb_grad_accum.model import load_model
from imdb_grad_accum.training import MicroBatches, Stepper
from exp_2 import main as exp2
from exp_2.main_accelerate import backward_micro_batch

CONTRACT = ["run.json", "config.yaml", "split.json", "history.jsonl", "metrics.json", "predictions/test.csv",
            "checkpoints/best.safetensors", "checkpoints/last.safetensors", "model/config.json", "model/tokenizer.json"]


@pytest.fixture(scope="module")
def odd_reviews_dir(tmp_path_factory):
    """253 reviews: 207 train (8 windows of 24 and a last one of 15), 23 validation, 23 test."""
    folder = tmp_path_factory.mktemp("odd_reviews")
    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(synthetic_reviews(253, seed=1))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert, odd_reviews_dir):
    tmp = tmp_path_factory.mktemp("grads")
    cfg = load_config(tiny_config(tmp, tiny_bert, odd_reviews_dir))
    torch.manual_seed(0)
    tokenizer, model = load_model(cfg)
    splits = prepare_data(cfg, tokenizer, model.input_names)
    return cfg, tokenizer, model, splits


def _window_batches(setup, micro, accum, window, num_processes=1, process_index=0):
    cfg, tokenizer, _, splits = setup
    sampler = window_sampler(splits.train["length"], micro, accum, seed=5, num_processes=num_processes,
                             process_index=process_index)
    batches = list(make_train_loader(splits.train, sampler, tokenizer, cfg))
    return batches[window * accum:(window + 1) * accum]


def _real_rows(batches):
    """(token ids, label) of every sample the batches hold with a non-zero weight: the optimizer step's samples."""
    return [(tuple(row[mask.bool()].tolist()), int(label)) for b in batches
            for row, mask, label, w in zip(b["input_ids"], b["attention_mask"], b["labels"], b["loss_weight"]) if w > 0]


def _reference_grads(model, rows, label_smoothing=0.0):
    """The gradient of one big batch, computed here without the project's loss weights: plain mean cross-entropy
    over exactly the step's samples, padded by hand."""
    model = copy.deepcopy(model)
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([list(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([label for _, label in rows])
    logits = model(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids))
    torch.nn.functional.cross_entropy(logits, labels, reduction="mean", label_smoothing=label_smoothing).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _plain_grads(model, batches, **train):
    model = copy.deepcopy(model)
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.0), None, torch.device("cpu"), "fp32",
                      train_config(max_grad_norm=None, **train))
    for batch in batches:
        stepper.forward_backward(batch)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _accelerate_grads(model, batches, accum, **train):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model = accelerator.prepare(copy.deepcopy(model))
    for batch in batches:
        with accelerator.accumulate(model):
            backward_micro_batch(accelerator, model, batch, MicroBatches(), None, train_config(**train))
    assert accelerator.sync_gradients  # the window's last micro-batch is where the optimizer would step
    grads = {n: p.grad.clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return grads


def _max_relative_difference(grads, reference):
    """max over parameters of ||g - g_ref|| / ||g_ref||. Attention key biases get an exactly-zero gradient in theory
    (softmax ignores a shift shared by all keys), so theirs is float noise: those must only stay near zero."""
    total = torch.sqrt(sum(g.norm() ** 2 for g in reference.values()))
    worst = 0.0
    for name, g in reference.items():
        if g.norm() < 1e-6 * total:
            assert grads[name].norm() < 1e-6 * total, name
        else:
            worst = max(worst, ((grads[name] - g).norm() / g.norm()).item())
    return worst


@pytest.mark.parametrize("window, samples", [(0, 24), (8, 15)], ids=["full window", "partial last window"])
@pytest.mark.parametrize("path, smoothing", [("plain", 0.0), ("accelerate", 0.0), ("plain", 0.1),
                                             ("accelerate", 0.1)],
                         ids=["plain", "accelerate", "plain, label smoothing", "accelerate, label smoothing"])
def test_accumulated_window_has_the_gradient_of_one_big_batch(setup, path, smoothing, window, samples):
    """Sabotage: a wrong loss weight in the sampler (the last window under-scaled by 15/24), a loss that ignores
    the weights, or smoothing applied outside the weighted loss: each fails against a reference computed without
    the project's weights."""
    model = setup[2]
    accumulated = _window_batches(setup, 8, 3, window)
    rows = _real_rows(accumulated)
    assert len(rows) == samples and sorted(rows) == sorted(_real_rows(_window_batches(setup, 24, 1, window)))
    reference = _reference_grads(model, rows, smoothing)
    grads = (_plain_grads(model, accumulated, label_smoothing=smoothing) if path == "plain" else
             _accelerate_grads(model, accumulated, 3, label_smoothing=smoothing))
    difference = _max_relative_difference(grads, reference)
    print(f"{path}, window {window} ({samples} samples): max relative gradient difference {difference:.2e}")
    assert difference < 1e-5


def test_two_processes_accumulate_the_gradient_of_one_big_batch(setup, tmp_path, fork_server):
    """Two gloo processes, each with its share of a step in micro-batches (2 processes x 3 accumulation x 4, and the
    smaller last step), end with the gradient of one batch of all the step's samples. Sabotage: leaving the process
    count out of the loss scale halves the gradient, which AdamW and clipping would hide in an end-to-end run."""
    cfg = setup[0]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(OmegaConf.to_container(cfg)))
    out = tmp_path / "grads"
    process = fork_server.start("grads", [config, out], processes=2)
    code, output = process.wait(300)
    assert code == 0, output[-3000:]
    for window, samples in ((0, 24), (8, 15)):
        rows = _real_rows(_window_batches(setup, 24, 1, window))
        grads = load_file(out / f"window{window}.safetensors")
        assert len(rows) == samples
        assert _max_relative_difference(grads, _reference_grads(setup[2], rows)) < 1e-5


class OutOfMemory:
    """Makes a model's forward pass raise CUDA's out-of-memory error: on passes of more than `above` tokens, or once,
    on the `once_at`-th pass (after earlier passes of the step have added to the gradients)."""

    def __init__(self, model, above=None, once_at=None):
        self.above, self.once_at, self.tokens = above, once_at, []
        self.forward = model.forward
        model.forward = self

    def __call__(self, input_ids, *args, **kwargs):
        self.tokens.append(input_ids.numel())
        if (self.above and input_ids.numel() > self.above) or len(self.tokens) == self.once_at:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.forward(input_ids, *args, **kwargs)


def _window_grads(model, batch, micro_batches, path, above=None, once_at=None):
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    oom = OutOfMemory(model, above, once_at)
    if path == "plain":
        stepper = Stepper(model, optimizer, None, torch.device("cpu"), "fp32", train_config(max_grad_norm=None))
        stepper.micro_batches = micro_batches
        stepper.forward_backward(batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    else:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        with accelerator.accumulate(prepared):
            backward_micro_batch(accelerator, prepared, batch, micro_batches, optimizer, train_config())
        grads = {n: p.grad.clone() for n, p in accelerator.unwrap_model(prepared).named_parameters()}
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return grads, oom.tokens


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("path", ["plain", "accelerate"])
def test_micro_batch_tokens_and_out_of_memory_splits_keep_the_window_gradient(setup, path, layout):
    """train.micro_batch_tokens cuts a window into forward passes by tokens; an out-of-memory error cuts further and
    redoes the step from zero gradients. The window's gradient stays that of one pass over it."""
    cfg, tokenizer, model, splits = setup
    if layout == "packed":
        packed = load_model(cfg, packed=True)[1]
        packed.load_state_dict(model.state_dict())
        model = packed
    sampler = window_sampler(splits.train["length"], 24, 1, seed=5)
    window = next(iter(make_train_loader(splits.train, sampler, tokenizer, cfg, packed=layout == "packed")))
    tokens = window["input_ids"].numel()
    reference, passes = _window_grads(model, window, MicroBatches(), path)
    assert passes == [tokens]
    fixed, passes = _window_grads(model, window, MicroBatches(str(tokens // 4)), path)
    assert len(passes) >= 4 and max(passes) <= tokens // 4 + 64  # a pass may exceed the budget by one review
    assert _max_relative_difference(fixed, reference) < 1e-5
    auto, passes = _window_grads(model, window, MicroBatches("auto"), path, above=tokens // 3)
    assert passes[0] == tokens and max(passes[-4:]) <= tokens // 3  # whole window first, then what fits
    assert _max_relative_difference(auto, reference) < 1e-5
    redone, passes = _window_grads(model, window, MicroBatches(str(tokens // 3)), path, once_at=2)
    assert len(passes) > 4  # passes 1 and 2, then the whole window again in smaller passes
    assert _max_relative_difference(redone, reference) < 1e-5


def _accelerate(args, num_processes=1, timeout=600):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    launch += ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--num_processes", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if num_processes > 1 else os.environ
    result = subprocess.run(launch + [str(PROJECT / "exp_2" / "main_accelerate.py"), *args], capture_output=True,
                            text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _weights(run_dir):
    return load_file(run_dir / "checkpoints" / "last.safetensors")


def _assert_same_run(a, b, weight_atol=1e-5):
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    assert ma["test_accuracy"] == mb["test_accuracy"]
    assert ma["test_loss"] == pytest.approx(mb["test_loss"], rel=1e-4)
    assert ma["optimizer_steps"] == mb["optimizer_steps"]
    wa, wb = _weights(a), _weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < weight_atol


@pytest.mark.slow
def test_batch_12_and_4x3_end_the_same_in_exp1_exp2_and_accelerate(tmp_path, tiny_bert, odd_reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, odd_reviews_dir)
    runs = tmp_path / "runs"
    exp1.main(["--config", str(config), "name=exp1_b12", "train.batch_size=12"])
    exp2.main(["--config", str(config), "name=exp2_4x3", "train.batch_size=4", "train.grad_accum_steps=3"])
    _accelerate(["--config", str(config), "name=acc_4x3", "train.batch_size=4", "train.effective_batch_size=12"])
    for name in ("exp1_b12", "exp2_4x3", "acc_4x3"):
        for file in CONTRACT:
            assert (runs / name / file).is_file(), (name, file)
    _assert_same_run(runs / "exp1_b12", runs / "exp2_4x3")
    _assert_same_run(runs / "exp2_4x3", runs / "acc_4x3")
    assert json.loads((runs / "acc_4x3" / "metrics.json").read_text())["effective_batch_size"] == 12


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process_on_the_global_batch(tmp_path, tiny_bert, odd_reviews_dir):
    config = tiny_config(tmp_path, tiny_bert, odd_reviews_dir)
    runs = tmp_path / "runs"
    _accelerate(["--config", str(config), "name=one", "train.batch_size=8", "train.grad_accum_steps=3"])
    started = time.perf_counter()
    result = _accelerate(["--config", str(config), "name=two", "train.batch_size=4", "train.grad_accum_steps=3"],
                         num_processes=2)
    print(f"2-process run: {time.perf_counter() - started:.1f} s wall")
    assert "MULTI_CPU" in result.stdout and "x 2 process(es)" in result.stdout
    metrics = json.loads((runs / "two" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["effective_batch_size"] == 24
    _assert_same_run(runs / "one", runs / "two")
    # evaluation counts every sample once although 23 does not split evenly over 2 processes of batch 8
    split = json.loads((runs / "two" / "split.json").read_text())
    history = [json.loads(line) for line in (runs / "two" / "history.jsonl").read_text().splitlines()]
    assert len(split["validation"]) % 2 == 1
    assert {h["val/n"] for h in history if "val/n" in h} == {len(split["validation"])}
    assert metrics["n_test"] == len(split["test"])


@pytest.mark.parametrize("micro, accum", [(24, 1), (8, 3), (2, 12)])
def test_scheduler_counts_optimizer_steps(tmp_path, tiny_bert, odd_reviews_dir, micro, accum):
    config = tiny_config(tmp_path, tiny_bert, odd_reviews_dir, train={"epochs": 1, "warmup_ratio": 0.25})
    metrics = exp2.main(["--config", str(config), f"train.batch_size={micro}", f"train.grad_accum_steps={accum}"])
    history = [json.loads(line) for line in (tmp_path / "runs/tiny/history.jsonl").read_text().splitlines()]
    lrs = [h["train/lr"] for h in history if "train/lr" in h]
    steps = math.ceil(207 / 24)
    assert metrics["optimizer_steps"] == len(lrs) == steps
    warmup = math.ceil(steps * 0.25)  # each logged lr is the one its step used: 0 first, the peak after warmup
    assert lrs[0] == 0.0 and lrs.index(max(lrs)) == warmup
    assert lrs[-1] == pytest.approx(max(lrs) / (steps - warmup))


def test_effective_batch_size_is_converted_or_rejected(tmp_path, tiny_bert, odd_reviews_dir, capsys):
    config = tiny_config(tmp_path, tiny_bert, odd_reviews_dir, train={"epochs": 1})
    metrics = exp2.main(["--config", str(config), "train.batch_size=8", "train.effective_batch_size=24"])
    assert metrics["effective_batch_size"] == 24
    assert "effective batch 24 = 8 x 3 accumulation x 1 process" in capsys.readouterr().out
    with pytest.raises(UserError, match="effective_batch_size=20 is not a multiple of train.batch_size=8"):
        exp2.main(["--config", str(config), "train.batch_size=8", "train.effective_batch_size=20", "--overwrite"])


@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)])
def test_lr_scaling_relative_to_the_reference_batch(tmp_path, tiny_bert, odd_reviews_dir, scaling, factor):
    config = tiny_config(tmp_path, tiny_bert, odd_reviews_dir, train={"epochs": 1, "lr": 1e-3})
    metrics = exp2.main(["--config", str(config), "train.batch_size=8", "train.grad_accum_steps=4",
                         "train.lr_reference_batch=8", f"train.lr_scaling={scaling}"])
    history = [json.loads(line) for line in (tmp_path / "runs/tiny/history.jsonl").read_text().splitlines()]
    assert metrics["lr"] == pytest.approx(1e-3 * factor)
    assert max(h["train/lr"] for h in history if "train/lr" in h) == pytest.approx(1e-3 * factor)  # what trained


def test_micro_batch_tokens_change_speed_not_results(tmp_path, tiny_bert, odd_reviews_dir, monkeypatch):
    """The same run with micro-batches of 4 reviews, forward passes of at most 200 tokens, and the whole window in
    one pass with out-of-memory errors above 300 tokens forcing splits: the same metrics and weights (dropout 0)."""
    config = tiny_config(tmp_path, tiny_bert, odd_reviews_dir, train={"epochs": 1})
    runs = tmp_path / "runs"
    exp2.main(["--config", str(config), "name=micro4", "train.batch_size=4", "train.grad_accum_steps=3"])
    exp2.main(["--config", str(config), "name=tokens200", "train.batch_size=4", "train.grad_accum_steps=3",
               "train.micro_batch_tokens=200"])
    from imdb_grad_accum.model import SentimentClassifier

    forward = SentimentClassifier.forward
    sizes = []

    def runs_out_of_memory(self, input_ids, *args, **kwargs):
        if self.training:
            sizes.append(input_ids.numel())
            if input_ids.numel() > 300:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(SentimentClassifier, "forward", runs_out_of_memory)
    exp2.main(["--config", str(config), "name=auto_oom", "train.batch_size=12", "train.micro_batch_tokens=auto"])
    assert max(sizes) > 300 and sizes.count(max(sizes)) == 1  # one failed whole window, then passes that fit
    _assert_same_run(runs / "micro4", runs / "tokens200")
    _assert_same_run(runs / "micro4", runs / "auto_oom")


@pytest.mark.slow
def test_two_processes_with_uneven_token_passes_equal_one_process(setup, tmp_path, tiny_bert, odd_reviews_dir):
    """Under 2 processes each cuts its share of a window into forward passes by tokens, with a budget at which the
    process holding the longer reviews runs more passes in some windows; each still syncs gradients once per window."""
    cfg, tokenizer, _, splits = setup  # the same data, split and seed as the runs below

    def passes(budget, index):
        sampler = window_sampler(splits.train["length"], 6, 1, cfg.seed, num_processes=2, process_index=index)
        sampler.set_epoch(1)
        return [len(MicroBatches(str(budget)).cut(b)) for b in make_train_loader(splits.train, sampler, tokenizer, cfg)]

    budget = next(b for b in range(20, 400, 10) if passes(b, 0) != passes(b, 1))
    config = tiny_config(tmp_path, tiny_bert, odd_reviews_dir, train={"epochs": 1})
    runs = tmp_path / "runs"
    exp2.main(["--config", str(config), "name=one", "train.batch_size=12"])
    _accelerate(["--config", str(config), "name=two", "train.batch_size=6", f"train.micro_batch_tokens={budget}"],
                num_processes=2)
    _assert_same_run(runs / "one", runs / "two")

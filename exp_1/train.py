"""Training pieces every entry script shares: optimizer, schedule, the backward/step mechanics, evaluation,
progress and checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import skip_first_batches
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from exp_1.config import TrainingStopped, UserError
from exp_1.model import load_weights, model_inputs, save_weights, weighted_loss
from exp_1.utils import RunDir, autocast, to_device

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(model: torch.nn.Module, train: DictConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """No weight decay on biases and norm weights (the usual BERT recipe); fused kernels where torch has them."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[train.optimizer]
    fused = device.type in ("cuda", "cpu")
    return optimizer_class(groups, lr=lr, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, train: DictConfig, total_steps: int):
    """Counts optimizer steps, not micro-batches: warmup and decay fit every accumulation setting."""
    warmup = math.ceil(total_steps * train.warmup_ratio)
    return get_scheduler(SCHEDULES[train.scheduler], optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


@dataclass
class Stepper:
    """Backward for one micro-batch, optimizer step for one window: the plain-PyTorch mechanics."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    precision: str
    max_grad_norm: float | None
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """Adds this micro-batch's share of its window's mean loss to the gradients; returns that share."""
        batch = to_device(batch, self.device)
        with autocast(self.device, self.precision):
            logits = self.model(**model_inputs(batch))
        loss = weighted_loss(logits, batch)
        self.scaler.scale(loss).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # fp16 overflow: no step taken, so the schedule does not advance
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class Progress:
    """Where training stands (epoch, micro-batches done in it, optimizer steps) and what it has done (samples,
    tokens, seconds). Shows tqdm with loss and throughput, logs train loss and lr every `log_every` steps, stops on a
    non-finite loss, and calls `on_checkpoint` every `every_steps` optimizer steps."""

    def __init__(self, log, scheduler, log_every: int, show: bool = True, reduce=lambda t: t,
                 every_steps: int | None = None, on_checkpoint=None):
        """`reduce` sums a tensor over processes (Accelerate), so logs and rates cover the whole window."""
        self.log, self.scheduler, self.log_every = log, scheduler, log_every
        self.show, self.reduce = show, reduce
        self.every_steps, self.on_checkpoint = every_steps, on_checkpoint
        self.step = 0  # optimizer steps so far, across epochs
        self.epoch, self.batches_done = 1, 0
        self.samples = self.tokens = 0
        self.train_seconds = 0.0
        self._losses: list[float] = []

    def __call__(self, loader, epoch: int, skip: int = 0):
        """The epoch's micro-batches, from the `skip`-th on (resuming mid-epoch)."""
        self.epoch, self.batches_done = epoch, skip
        self._bar = tqdm(skip_first_batches(loader, skip) if skip else loader, desc=f"epoch {epoch}", unit="batch",
                         dynamic_ncols=True, mininterval=1.0, disable=not self.show, initial=skip, total=len(loader))
        self._lr = self.scheduler.get_last_lr()[0]  # the lr of the coming optimizer step
        self._epoch_start = time.perf_counter()
        for batch in self._bar:
            real = batch["loss_weight"] > 0
            self.samples += int(real.sum())
            self.tokens += int(batch["attention_mask"][real].sum())
            self.batches_done += 1
            yield batch
        self.train_seconds += time.perf_counter() - self._epoch_start
        if self._losses:  # the epoch's last steps, when log_every does not divide them
            self._log_losses()

    def step_done(self, window_loss: torch.Tensor) -> None:
        """Call after each optimizer step with the window's mean loss (this process's share of it)."""
        self.step += 1
        loss = self.reduce(window_loss.float()).item()
        if not math.isfinite(loss):
            raise TrainingStopped(f"the training loss is {loss} at optimizer step {self.step} (epoch {self.epoch}); "
                                  "the last resume point and checkpoints are kept. Lower train.lr, keep "
                                  "train.max_grad_norm, or use train.precision=fp32 or bf16")
        self._losses.append(loss)
        if self.step % self.log_every == 0:
            self._log_losses()
        self._lr = self.scheduler.get_last_lr()[0]
        if self.every_steps and self.step % self.every_steps == 0:
            self.train_seconds += time.perf_counter() - self._epoch_start  # keep seconds exact across a resume
            self._epoch_start = time.perf_counter()
            self.on_checkpoint()

    def _log_losses(self) -> None:
        loss = sum(self._losses) / len(self._losses)
        self._losses.clear()
        seconds = self.train_seconds + time.perf_counter() - self._epoch_start
        self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{self.samples / seconds:.1f}",
                              tokens_s=f"{self.tokens / seconds:.0f}", refresh=False)
        self.log({"train/loss": loss, "train/lr": self._lr}, step=self.step)

    def throughput(self) -> dict:
        seconds = max(self.train_seconds, 1e-9)
        samples, tokens = self.reduce(torch.tensor([self.samples, self.tokens], dtype=torch.float64)).tolist()
        return {"train_seconds": round(self.train_seconds, 2), "train_samples_per_s": round(samples / seconds, 3),
                "train_tokens_per_s": round(tokens / seconds, 1)}

    STATE = ("step", "samples", "tokens", "train_seconds", "_losses")

    def state(self) -> dict:
        return {name: getattr(self, name) for name in self.STATE}

    def load(self, state: dict) -> None:
        for name in self.STATE:
            setattr(self, name, state[name])


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32", gather=None) -> dict:
    """Loss, accuracy and F1 (positive class) over a loader. `gather` (Accelerate's gather_for_metrics) collects the
    shards of several processes, counting every sample once."""
    was_training = model.training
    model.eval()
    losses, predictions, labels = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = model(**model_inputs(batch))
        result = (F.cross_entropy(logits.float(), batch["labels"], reduction="none"), logits.argmax(-1), batch["labels"])
        if gather is not None:
            result = gather(result)
        for store, values in zip((losses, predictions, labels), result):
            store.append(values.cpu())
    model.train(was_training)
    return classification_metrics(torch.cat(losses), torch.cat(predictions), torch.cat(labels))


def classification_metrics(losses: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    true_pos = int(((predictions == 1) & (labels == 1)).sum())
    predicted_pos, actual_pos = int((predictions == 1).sum()), int((labels == 1).sum())
    precision = true_pos / predicted_pos if predicted_pos else 0.0
    recall = true_pos / actual_pos if actual_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    correct = int((predictions == labels).sum())
    return {"loss": losses.double().mean().item(), "accuracy": correct / len(labels), "f1": f1, "n": len(labels)}


def describe(cfg: DictConfig, device, precision: str, splits, loaders, accum_steps: int, num_processes: int,
             lr: float) -> str:
    return (f"{cfg.model.name} on {device} ({precision}): {len(splits.train)} train / {len(splits.validation)} val / "
            f"{len(splits.test)} test reviews; effective batch {loaders.sampler.effective_batch} = "
            f"{cfg.train.batch_size} x {accum_steps} accumulation x {num_processes} process(es); lr {lr:.3g}; "
            f"{len(loaders.sampler) // accum_steps} optimizer steps/epoch")


def final_metrics(cfg: DictConfig, test: dict, checkpoints: "Checkpoints", progress: Progress, **facts) -> dict:
    """metrics.json: test metrics of the best checkpoint, plus what a results table needs."""
    return {**{f"test_{k}": v for k, v in test.items() if k != "n"}, "n_test": test["n"],
            "best_epoch": checkpoints.best_epoch, f"best_val_{cfg.checkpoint.best_metric}": checkpoints.best_value,
            "model": cfg.model.name, "epochs": cfg.train.epochs, "optimizer_steps": progress.step, **facts,
            **progress.throughput()}


class Checkpoints:
    """checkpoints/last.safetensors every epoch and best.safetensors when validation improves: disk stays bounded."""

    def __init__(self, run: RunDir, metric: str, write: bool = True):
        """`write=False` (non-main processes) tracks the best epoch without touching the disk."""
        self.run, self.metric, self.write = run, metric, write
        self.best_value, self.best_epoch = None, None

    def save(self, model: torch.nn.Module, epoch: int, val: dict) -> bool:
        meta = {"epoch": epoch, **{f"val_{k}": v for k, v in val.items()}}
        value = val[self.metric]
        improved = self.best_value is None or (value < self.best_value if self.metric == "loss" else value > self.best_value)
        if improved:
            self.best_value, self.best_epoch = value, epoch
        if self.write:
            save_weights(model, self.run.checkpoints / "last.safetensors", meta)
            if improved:
                save_weights(model, self.best_path, meta)
        return improved

    @property
    def best_path(self):
        return self.run.checkpoints / "best.safetensors"

    def state(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch}

    def load(self, state: dict) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]


# ----------------------------------------------------------------------------------------------- resume points

def save_resume_point(run: RunDir, write_state, trainer: dict, is_main: bool = True, barrier=lambda: None) -> None:
    """Everything needed to continue exactly: `write_state(folder)` writes model, optimizer and RNG states;
    `trainer` (JSON) says where training stands. Written to resume.tmp and swapped in, so a kill at any moment leaves
    one complete resume point."""
    tmp, old = run.resume_dir.with_name("resume.tmp"), run.resume_dir.with_name("resume.old")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write_state(tmp)
    barrier()
    if is_main:
        trainer = {**trainer, "history_bytes": run.history.stat().st_size if run.history.exists() else 0}
        (tmp / "trainer.json").write_text(json.dumps(trainer))  # written last: marks the point complete
        if run.resume_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(run.resume_dir, old)
        os.replace(tmp, run.resume_dir)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_resume_point(run: RunDir, read_state, layout: dict, is_main: bool = True) -> dict:
    """Restores what `save_resume_point` wrote; the history is cut back to what it held at that point. `layout`
    (script, processes, accumulation) must be the saved one: a position in the data order means nothing otherwise."""
    folder = run.resume_point()
    trainer = json.loads((folder / "trainer.json").read_text())
    if trainer["layout"] != layout:
        raise UserError(f"--resume: {run.path} was saved with {trainer['layout']}, this run has {layout}; resume it "
                        "with the same script and number of processes")
    read_state(folder)
    if is_main:
        if run.history.exists():
            with run.history.open("r+") as f:
                f.truncate(trainer["history_bytes"])
        print(f"resuming {run.path} at epoch {trainer['epoch']}, micro-batch {trainer['batches_done']}, "
              f"optimizer step {trainer['progress']['step']}")
    return trainer


def trainer_state(progress: Progress, checkpoints: Checkpoints, scheduler, layout: dict, scaler=None,
                  epoch_done: bool = False) -> dict:
    epoch, batches_done = (progress.epoch + 1, 0) if epoch_done else (progress.epoch, progress.batches_done)
    return {"epoch": epoch, "batches_done": batches_done, "layout": layout, "progress": progress.state(),
            "best": checkpoints.state(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None}


def restore_trainer_state(trainer: dict, progress: Progress, checkpoints: Checkpoints, scheduler, scaler=None):
    """Returns (epoch to continue, micro-batches of it already done)."""
    progress.load(trainer["progress"])
    checkpoints.load(trainer["best"])
    scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(trainer["scaler"])
    return trainer["epoch"], trainer["batches_done"]


def save_training_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model, optimizer and RNG states as safetensors (no pickle); the optimizer's non-tensor parts as JSON."""
    save_weights(model, folder / "model.safetensors")
    state = optimizer.state_dict()
    tensors = {f"{param}/{name}": value.contiguous() for param, values in state["state"].items()
               for name, value in values.items() if torch.is_tensor(value)}
    others = {str(param): {name: value for name, value in values.items() if not torch.is_tensor(value)}
              for param, values in state["state"].items()}
    save_file(tensors, folder / "optimizer.safetensors",
              metadata={"param_groups": json.dumps(state["param_groups"]), "others": json.dumps(others)})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, folder / "rng.safetensors")


def load_training_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    load_weights(model, folder / "model.safetensors")
    with safe_open(folder / "optimizer.safetensors", "pt") as f:
        meta = f.metadata()
        params: dict[int, dict] = {int(p): values for p, values in json.loads(meta["others"]).items()}
        for key in f.keys():
            param, name = key.split("/", 1)
            params.setdefault(int(param), {})[name] = f.get_tensor(key)
    optimizer.load_state_dict({"state": params, "param_groups": json.loads(meta["param_groups"])})
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"cuda{i}" in rng:  # a point saved on another machine may have other GPUs
            torch.cuda.set_rng_state(rng[f"cuda{i}"], i)

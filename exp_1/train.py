"""Training mechanics every entry script shares: seeding, optimizer, schedule, the backward/step of plain PyTorch,
where training stands (`TrainingState`), the progress meter, and evaluation with per-review predictions."""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import skip_first_batches
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import get_scheduler

from exp_1.errors import RunStopped
from exp_1.model import model_inputs, weighted_loss
from exp_1.packing import select
from exp_1.precision import autocast

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`; plain numbers (a packed batch's max_seqlen) stay as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_optimizer(model: torch.nn.Module, train: DictConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """No weight decay on biases and norm weights (the usual BERT recipe); fused kernels where torch has them."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[train.optimizer]
    fused = device.type in ("cuda", "cpu")
    return optimizer_class(groups, lr=lr, betas=tuple(train.adam_betas), eps=train.adam_eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, train: DictConfig, total_steps: int):
    """Counts optimizer steps, not micro-batches: warmup and decay fit every accumulation setting. Warmup leaves at
    least one step at the full rate (10% of a single step must not round up to a run that never trains)."""
    warmup = min(math.ceil(total_steps * train.warmup_ratio), max(total_steps - 1, 0))
    return get_scheduler(SCHEDULES[train.scheduler], optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def due(every: Optional[int], step: int) -> bool:
    """Whether a thing done every `every` optimizer steps (None: never) is due at `step`."""
    return bool(every) and step % every == 0


class MicroBatches:
    """train.micro_batch_tokens: cuts a batch (all of an optimizer step's reviews on this process) into forward
    passes of at most `budget` tokens, consecutive reviews together (a padded row counts its padded width); `auto`
    starts from the whole batch. After a CUDA out-of-memory error the budget halves for the rest of the run and the
    step is redone, so a too large batch costs time, never the run. The per-review loss weights make the result that
    of the whole batch however it is cut."""

    def __init__(self, setting: str | None = None):
        self.active = setting is not None
        self.budget = None if setting in (None, "auto") else int(setting)

    def cut(self, batch: dict) -> list[dict]:
        if self.budget is None:
            return [batch]
        packed = "cu_seqlens" in batch
        rows = len(batch["labels"])
        lengths = batch["cu_seqlens"].diff().tolist() if packed else [batch["input_ids"].shape[1]] * rows
        bounds, used = [0], 0
        for i, n in enumerate(lengths):
            if i > bounds[-1] and used + n > self.budget:
                bounds.append(i)
                used = 0
            used += n
        bounds.append(rows)
        if len(bounds) == 2:
            return [batch]
        if packed:
            return [select(batch, a, b) for a, b in zip(bounds, bounds[1:])]
        return [{k: v[a:b] if torch.is_tensor(v) and v.dim() and len(v) == rows else v for k, v in batch.items()}
                for a, b in zip(bounds, bounds[1:])]

    def shrink(self, failed: dict) -> None:
        """After an out-of-memory error on the forward pass `failed`."""
        reviews = len(failed["labels"])
        tokens = failed["num_tokens"] if "cu_seqlens" in failed else failed["input_ids"].numel()
        if reviews == 1:
            raise RunStopped(f"out of GPU memory on a single review of {tokens} tokens: lower data.max_length, or "
                             "train on a GPU with more memory (--resume continues from the last resume point)")
        self.budget = max(tokens // 2, 1)
        print(f"out of GPU memory on a forward pass of {reviews} reviews, {tokens} tokens: forward passes of at most "
              f"{self.budget} tokens from here on; redoing the step", flush=True)


def run_in_passes(batch: dict, micro_batches: MicroBatches, one_pass, start_over):
    """Sum of `one_pass(part, last)` over the forward passes `micro_batches` cuts `batch` into. After a CUDA
    out-of-memory error: `start_over()` (clear the step's gradients), a smaller budget, and the batch again."""
    if not micro_batches.active:
        return one_pass(batch, True)
    while True:
        parts = micro_batches.cut(batch)
        try:
            total = 0.0
            for i, part in enumerate(parts):
                total = total + one_pass(part, i == len(parts) - 1)
            return total
        except torch.OutOfMemoryError:
            failed = part
        total = parts = None  # the failed pass's activations go with the exception, before retrying
        start_over()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        micro_batches.shrink(failed)


@dataclass
class Stepper:
    """Backward for one micro-batch, optimizer step for one window: the plain-PyTorch mechanics."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    precision: str
    max_grad_norm: float | None
    micro_batches: MicroBatches = field(default_factory=MicroBatches)
    cuda_graphs: bool = False  # train.cuda_graphs: every forward-backward is a new graph replay
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """Adds this batch's share of its window's mean loss to the gradients (in forward passes of at most
        train.micro_batch_tokens tokens when that is set); returns that share."""
        return run_in_passes(batch, self.micro_batches, lambda part, _: self._forward_backward(part),
                             lambda: self.optimizer.zero_grad(set_to_none=True))

    def _forward_backward(self, batch: dict) -> torch.Tensor:
        if self.cuda_graphs:  # only then: the call imports Inductor, about a second per run
            torch.compiler.cudagraph_mark_step_begin()
        batch = to_device(batch, self.device)
        with autocast(self.device, self.precision):
            logits = self.model(**model_inputs(batch))
        loss = weighted_loss(logits, batch)
        self.scaler.scale(loss).backward()
        return loss.detach()

    def optimizer_step(self) -> torch.Tensor:
        """Clips, steps and clears the gradients; returns their norm before clipping (unscaled under fp16)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or math.inf)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # fp16 overflow: no step taken, so the schedule does not advance
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()


# ----------------------------------------------------------------------------------------------- where training stands

@dataclass
class TrainingState:
    """Where training stands and what it has done: what a resume point records besides the model, optimizer,
    schedule and RNG states."""

    epoch: int = 1  # the epoch in progress
    batches_done: int = 0  # micro-batches of that epoch this process has trained on
    step: int = 0  # optimizer steps so far
    samples: int = 0  # training samples seen, all processes together
    tokens: int = 0  # their real (non-padding) tokens
    train_seconds: float = 0.0
    best_step: Optional[int] = None  # the validation with the best checkpoint.best_metric so far
    best_epoch: Optional[float] = None  # its fractional epoch (samples seen / training reviews)
    best_value: Optional[float] = None
    best_sha256: Optional[str] = None  # of checkpoints/best.safetensors, verified before the test
    stale_validations: int = 0  # validations in a row without improving by more than early_stopping_min_delta
    stopped_early_at: Optional[dict] = None  # {"step", "epoch"} once early stopping has stopped training
    unlogged: list = field(default_factory=list)  # (loss, grad norm) of steps since the last train log; device
    # tensors until settle() reads them back
    lr: float = 0.0  # the learning rate of the last optimizer step

    def settle(self, stop_requested: bool, reduce: Optional[Callable] = None) -> tuple[float, bool]:
        """Reads the unlogged steps' losses and gradient norms back from the device in one transfer (the only place
        the host waits for it). Returns their mean loss (not finite if any step's was not) and whether to stop.
        `reduce` (Accelerate's, under several processes) sums what each process holds, its share of each loss and
        its stop request, in the same single exchange, so that every process stops at the same step."""
        pending = [i for i, (loss, _) in enumerate(self.unlogged) if torch.is_tensor(loss)]
        losses = [self.unlogged[i][0].detach().double().reshape(()) for i in pending]
        device = losses[0].device if losses else "cpu"
        shared = torch.stack([*losses, torch.tensor(float(stop_requested), dtype=torch.float64, device=device)])
        if reduce is not None:
            shared = reduce(shared, "sum")
        norms = [self.unlogged[i][1] for i in pending]
        norms = [n.detach().double().reshape(()).to(shared.device) if torch.is_tensor(n) else
                 torch.tensor(float(n), dtype=torch.float64, device=shared.device) for n in norms]
        values = torch.cat([shared, torch.stack(norms) if norms else shared[:0]]).tolist()
        for k, i in enumerate(pending):
            self.unlogged[i] = (values[k], values[len(shared) + k])
        stop = values[len(shared) - 1] > 0
        return (sum(loss for loss, _ in self.unlogged) / len(self.unlogged) if self.unlogged else 0.0), stop

    def record_validation(self, value: float, lower_is_better: bool, weights_sha256: str, epoch: float,
                          patience: Optional[int] = None, min_delta: float = 0.0) -> bool:
        """True when this validation is the best so far (its weights then become best.safetensors). Counts the
        validations without an improvement by more than `min_delta`, and after `patience` of them in a row stops
        training early (`stopped_early_at`)."""
        gain = None if self.best_value is None else (self.best_value - value if lower_is_better else value - self.best_value)
        self.stale_validations = 0 if gain is None or gain > min_delta else self.stale_validations + 1
        if patience is not None and self.stale_validations >= patience:
            self.stopped_early_at = {"step": self.step, "epoch": epoch}
        if gain is not None and not gain > 0:
            return False
        self.best_step, self.best_epoch, self.best_value, self.best_sha256 = self.step, epoch, value, weights_sha256
        return True


class Meter:
    """Progress on screen and what training has done: each optimizer step adds its window's samples and tokens (all
    processes, known from the sampler, so nothing is communicated) and its time to the state. `progress` is
    train.progress as `progress_mode` resolved it: a bar, plain lines (one at a log step at most every
    LINE_SECONDS), or nothing; `show` is False on processes that stay quiet."""

    LINE_SECONDS = 5.0

    def __init__(self, state: TrainingState, sampler, progress: str = "bar", show: bool = True):
        self.state, self.sampler = state, sampler
        self.progress = progress if show else "none"
        self._bar = None
        self._clock = time.perf_counter()
        self._last_line = -math.inf
        self._logged = (state.samples, state.tokens, state.train_seconds)

    def epoch(self, loader, epoch: int):
        """The epoch's micro-batches, from the first one the state has not trained on yet."""
        if epoch != self.state.epoch:
            self.state.epoch, self.state.batches_done = epoch, 0
        skip = self.state.batches_done
        self._windows = self.sampler.window_totals()
        self._bar = tqdm(skip_first_batches(loader, skip) if skip else loader, desc=f"epoch {epoch}", unit="batch",
                         dynamic_ncols=True, mininterval=1.0, disable=self.progress != "bar", initial=skip,
                         total=len(loader))
        self._clock = time.perf_counter()
        for batch in self._bar:
            self.state.batches_done += 1
            yield batch

    def step_done(self, loss, grad_norm, lr: float) -> None:
        """After each optimizer step, with the window's mean loss and the gradient norm before clipping (numbers, or
        device tensors left unread until TrainingState.settle) and the learning rate the step used."""
        state = self.state
        samples, tokens = self._windows[state.batches_done // self.sampler.batches_per_step - 1]
        state.step += 1
        state.samples += int(samples)
        state.tokens += int(tokens)
        now = time.perf_counter()
        state.train_seconds += now - self._clock
        self._clock = now
        state.unlogged.append((loss, grad_norm))
        state.lr = lr

    def fractional_epoch(self) -> float | int:
        """Epochs of training samples seen: a whole number at an epoch's end, so that records read 1, 2, 3."""
        epoch = round(self.state.samples / self.sampler.num_samples, 6)
        return int(epoch) if epoch == int(epoch) else epoch

    def train_record(self) -> dict:
        """The mean loss and gradient norm of the steps since the last record (settled), and where training stands."""
        state = self.state
        samples, tokens, seconds = self._logged
        losses, grad_norms = zip(*state.unlogged)
        state.unlogged = []
        self._logged = (state.samples, state.tokens, state.train_seconds)
        tokens_per_s = (state.tokens - tokens) / max(state.train_seconds - seconds, 1e-9)
        record = {"train/loss": sum(losses) / len(losses), "train/lr": state.lr,
                  "train/grad_norm": sum(grad_norms) / len(grad_norms), "train/samples": state.samples,
                  "train/epoch": self.fractional_epoch(), "train/tokens_per_s": round(tokens_per_s, 1)}
        if self._bar is not None and self.progress == "bar":
            self._bar.set_postfix(loss=f"{record['train/loss']:.4f}", tokens_s=f"{tokens_per_s:.0f}", refresh=False)
        elif self.progress == "lines" and time.monotonic() - self._last_line >= self.LINE_SECONDS:
            self._last_line = time.monotonic()
            total = self.sampler.steps_per_epoch
            done = state.batches_done // self.sampler.batches_per_step
            print(f"epoch {state.epoch} step {done}/{total} (optimizer step {state.step}): loss "
                  f"{record['train/loss']:.4f}, lr {state.lr:.3g}, {tokens_per_s:,.0f} tokens/s", flush=True)
        return record

    def validation_record(self, metrics: dict) -> dict:
        """A validation's metrics, at the fractional epoch and the samples seen (WandB plots val/* against epoch)."""
        return {"epoch": self.fractional_epoch(), **{f"val/{k}": v for k, v in metrics.items()},
                "val/samples": self.state.samples}

    def pause(self) -> None:
        """Time spent from here to the next step (validation, checkpoints) is not training time."""
        self._clock = time.perf_counter()

    def throughput(self) -> dict:
        seconds = max(self.state.train_seconds, 1e-9)
        return {"train_seconds": round(self.state.train_seconds, 2),
                "train_samples_per_s": round(self.state.samples / seconds, 3),
                "train_tokens_per_s": round(self.state.tokens / seconds, 1)}


def progress_mode(setting: str) -> str:
    """train.progress: bar, lines or none; auto is a bar on a terminal and lines when standard output (or error, where
    a bar is drawn) goes to a file: a bar's carriage returns fill a log file. Without a bar, the libraries' own bars
    (tokenising, loading weights) are turned off too."""
    mode = setting if setting != "auto" else "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"
    if mode != "bar":
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return mode


def validation_line(val: dict, record: dict, best: bool) -> str:
    return (f"validation at epoch {record['epoch']}: loss {val['loss']:.4f} accuracy {val['accuracy']:.4f} "
            f"f1 {val['f1']:.4f}" + (" (best)" if best else ""))


# ----------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32", gather=None):
    """Loss, accuracy and F1 (positive class) over a loader, and the per-review predictions behind them. `gather`
    (Accelerate's gather_for_metrics) collects the shards of several processes, counting every review once."""
    was_training = model.training
    model.eval()
    columns = {name: [] for name in ("index", "label", "predicted", "prob_positive", "loss", "tokens")}
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = model(**model_inputs(batch)).float()
        result = (batch["index"], batch["labels"], logits.argmax(-1), logits.softmax(-1)[:, 1],
                  F.cross_entropy(logits, batch["labels"], reduction="none"), batch["full_length"])
        if gather is not None:
            result = gather(result)
        for store, values in zip(columns.values(), result):
            store.append(values.cpu())
    model.train(was_training)
    rows = {name: torch.cat(values).numpy() for name, values in columns.items()}
    order = np.argsort(rows["index"], kind="stable")  # by review: the same file however the batches fell
    rows = {name: values[order] for name, values in rows.items()}
    return classification_metrics(rows), rows


def classification_metrics(rows: dict) -> dict:
    """From per-review rows (label, predicted, loss): what the prediction file reproduces exactly (fsum does not
    depend on the order of the reviews)."""
    labels, predicted = np.asarray(rows["label"]), np.asarray(rows["predicted"])
    true_pos = int(((predicted == 1) & (labels == 1)).sum())
    predicted_pos, actual_pos = int((predicted == 1).sum()), int((labels == 1).sum())
    precision = true_pos / predicted_pos if predicted_pos else 0.0
    recall = true_pos / actual_pos if actual_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    correct = int((predicted == labels).sum())
    return {"loss": math.fsum(float(x) for x in rows["loss"]) / len(labels), "accuracy": correct / len(labels),
            "f1": f1, "n": len(labels)}

"""Where training stands (`TrainingState`), what is due after a step, progress on screen, and what runs record."""

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import datasets
import torch
import transformers
from tqdm.auto import tqdm

from imdb_grad_accum.errors import Diverged
from imdb_grad_accum.model import Weights
from imdb_grad_accum.rundir import final_metrics
from imdb_grad_accum.training import evaluate


class Due(NamedTuple):
    log: bool
    validate: bool
    save: bool


def what_is_due(cfg, step: int, end_of_epoch: bool) -> Due:
    def every(n: Optional[int]) -> bool:
        return bool(n) and step % n == 0

    validate = end_of_epoch or every(cfg.train.eval_every_steps)
    return Due(end_of_epoch or every(cfg.train.log_every), validate, validate or every(cfg.checkpoint.every_steps))


def agreed_stop(requested: bool, device: torch.device, reduce: Optional[Callable] = None) -> bool:
    """All processes stop for SIGTERM at the same step if any was asked to (NCCL reduces only CUDA tensors)."""
    if reduce is None:
        return requested
    return bool(reduce(torch.tensor([float(requested)], device=device), "sum").item() > 0)


@dataclass
class TrainingState:
    """What a resume point records besides the model, optimizer, schedule and RNG states."""

    epoch: int = 1  # the epoch in progress
    batches_done: int = 0  # loader batches of that epoch this process has trained on
    step: int = 0  # optimizer steps so far
    samples: int = 0  # training reviews seen, all processes together
    tokens: int = 0  # their real (non-padding) tokens
    train_seconds: float = 0.0
    lr: float = 0.0  # the learning rate of the last optimizer step (of the head, with layer_lr_decay)
    unlogged: list = field(default_factory=list)  # [loss, grad norm] per step since the last log (see read_back)
    best_step: Optional[int] = None  # the validation with the best checkpoint.best_metric so far
    best_epoch: Optional[float] = None  # its fractional epoch (samples seen / training reviews)
    best_value: Optional[float] = None
    best_sha256: Optional[str] = None  # of checkpoints/best.safetensors, verified before the test
    stale_validations: int = 0  # validations in a row without improving by more than early_stopping_min_delta
    stopped_early_at: Optional[dict] = None  # {"step", "epoch"} once early stopping has stopped training

    def __post_init__(self):
        self._clock = time.perf_counter()
        self._at_last_log = (self.samples, self.tokens, self.train_seconds)

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def step_done(self, loss, grad_norm, lr: float, samples: int, tokens: int) -> None:
        """`samples` and `tokens` count all processes; loss and gradient norm stay on the device."""
        now = time.perf_counter()
        self.step += 1
        self.samples += int(samples)
        self.tokens += int(tokens)
        self.train_seconds += now - self._clock
        self._clock = now
        self.unlogged.append([loss, grad_norm])
        self.lr = lr

    def resume_clock(self) -> None:
        """Validation and saving since the last step do not count as training time."""
        self._clock = time.perf_counter()

    def read_back(self, reduce: Optional[Callable] = None) -> None:
        """The unlogged losses and norms as numbers, in one transfer; a loss that is not finite stops the run."""
        pending = [pair for pair in self.unlogged if torch.is_tensor(pair[0])]
        if pending:
            losses = torch.stack([loss.detach().double().reshape(()) for loss, _ in pending])
            losses = reduce(losses, "sum") if reduce is not None else losses
            norms = [torch.as_tensor(norm).detach().double().reshape(()).to(losses.device) for _, norm in pending]
            values = torch.cat([losses, torch.stack(norms)]).tolist()
            for pair, loss, norm in zip(pending, values, values[len(pending):]):
                pair[:] = [loss, norm]
        bad = next((loss for loss, _ in self.unlogged if not math.isfinite(loss)), None)
        if bad is not None:
            raise Diverged(bad, self.step, self.epoch)

    def log_record(self, train_reviews: int) -> dict:
        samples, tokens, seconds = self._at_last_log
        losses, norms = zip(*self.unlogged)
        self.unlogged = []
        self._at_last_log = (self.samples, self.tokens, self.train_seconds)
        return {"train/loss": sum(losses) / len(losses), "train/lr": self.lr,
                "train/grad_norm": sum(norms) / len(norms),
                "train/samples": self.samples, "train/epoch": self.fractional_epoch(train_reviews),
                "train/tokens_per_s": round((self.tokens - tokens) / max(self.train_seconds - seconds, 1e-9), 1)}

    def validation_record(self, metrics: dict, train_reviews: int) -> dict:
        return {"epoch": self.fractional_epoch(train_reviews), **{f"val/{k}": v for k, v in metrics.items()},
                "val/samples": self.samples}

    def fractional_epoch(self, train_reviews: int) -> float | int:
        """Epochs of training reviews seen: a whole number at an epoch's end, so records read 1, 2, 3."""
        epoch = round(self.samples / train_reviews, 6)
        return int(epoch) if epoch == int(epoch) else epoch

    def count_for_early_stopping(self, value: float, lower_is_better: bool, patience: Optional[int],
                                 min_delta: float, epoch: float) -> None:
        """Before update_best: after `patience` validations in a row that gain no more than `min_delta`, stop."""
        best = self.best_value
        gain = None if best is None else (best - value if lower_is_better else value - best)
        self.stale_validations = 0 if gain is None or gain > min_delta else self.stale_validations + 1
        if patience is not None and self.stale_validations >= patience:
            self.stopped_early_at = {"step": self.step, "epoch": epoch}

    def update_best(self, value: float, lower_is_better: bool, sha256: str, epoch: float) -> bool:
        best = self.best_value
        if best is not None and not (value < best if lower_is_better else value > best):
            return False
        self.best_step, self.best_epoch, self.best_value, self.best_sha256 = self.step, epoch, value, sha256
        return True

    def throughput(self) -> dict:
        seconds = max(self.train_seconds, 1e-9)
        return {"train_seconds": round(self.train_seconds, 2), "train_samples_per_s": round(self.samples / seconds, 3),
                "train_tokens_per_s": round(self.tokens / seconds, 1)}


class Progress:
    """A progress bar, plain lines with elapsed and estimated time (train.progress), or nothing on quiet processes."""

    LINE_SECONDS = 5.0

    def __init__(self, setting: str, show: bool = True):
        mode = setting if setting != "auto" else "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"
        self.mode = mode if show else "none"
        if self.mode != "bar":
            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        self._bar = None
        self._last_line = -math.inf
        self._started = time.monotonic()

    def epoch(self, batches, epoch: int, done: int, total: int, steps_done: int):
        self._epoch_started, self._epoch_steps_done = time.monotonic(), steps_done
        self._bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True, mininterval=1.0,
                         disable=self.mode != "bar", initial=done, total=total)
        return self._bar

    def show_step(self, state: TrainingState, record: dict, step_in_epoch: int, steps_per_epoch: int) -> None:
        loss, speed = record["train/loss"], record["train/tokens_per_s"]
        if self.mode == "bar" and self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tokens_s=f"{speed:.0f}", refresh=False)
        elif self.mode == "lines" and time.monotonic() - self._last_line >= self.LINE_SECONDS:
            self._last_line = time.monotonic()
            seconds_per_step = (time.monotonic() - self._epoch_started) / max(step_in_epoch - self._epoch_steps_done, 1)
            left = seconds_per_step * (steps_per_epoch - step_in_epoch)
            elapsed = tqdm.format_interval(time.monotonic() - self._started)
            print(f"epoch {state.epoch} step {step_in_epoch}/{steps_per_epoch} (optimizer step {state.step}): loss "
                  f"{loss:.4f}, lr {state.lr:.3g}, {speed:,.0f} tokens/s; {elapsed} elapsed, about "
                  f"{tqdm.format_interval(left)} left in this epoch", flush=True)

    def evaluating(self, what: str, reviews: int) -> Callable:
        def shown(loader):
            if self.mode == "bar":
                yield from tqdm(loader, desc=what, unit="batch", leave=False, dynamic_ncols=True, mininterval=1.0)
                return
            started = last = time.monotonic()
            if self.mode == "lines":
                print(f"{what}: {reviews} reviews", flush=True)
            for i, batch in enumerate(loader, 1):
                yield batch
                if self.mode == "lines" and time.monotonic() - last >= self.LINE_SECONDS * 6:
                    last = time.monotonic()
                    print(f"{what}: batch {i}/{len(loader)}, {tqdm.format_interval(last - started)} elapsed",
                          flush=True)
        return shown

    def say(self, text: str) -> None:
        """A line of its own, above the bar when there is one."""
        if self.mode != "none":
            tqdm.write(text) if self.mode == "bar" else print(text, flush=True)


class Records:
    """At a validation and the test: evaluate, update the state, log, write predictions and metrics.json, say so."""

    def __init__(self, cfg, run, tracker, progress: Progress, splits, loaders, device, precision: str, gather=None,
                 is_main: bool = True):
        self.cfg, self.run, self.tracker, self.progress = cfg, run, tracker, progress
        self.splits, self.loaders = splits, loaders
        self.device, self.precision, self.gather, self.is_main = device, precision, gather, is_main
        self.reviews = loaders.sampler.num_samples

    def log_training(self, state: TrainingState, step_in_epoch: int) -> None:
        record = state.log_record(self.reviews)
        self.tracker.log(record, state.step)
        self.progress.show_step(state, record, step_in_epoch, self.loaders.sampler.steps_per_epoch)

    def validate(self, model, state: TrainingState, last: bool):
        """Returns the weights and whether they are the best so far; `last`: nothing is left to stop early."""
        metric, train = self.cfg.checkpoint.best_metric, self.cfg.train
        val, rows = evaluate(model, self.loaders.validation, self.device, self.precision, self.gather,
                             self.progress.evaluating("validation", len(self.splits.validation)))
        weights, record = Weights.of(model), state.validation_record(val, self.reviews)
        state.count_for_early_stopping(val[metric], metric == "loss", None if last else train.early_stopping_patience,
                                       train.early_stopping_min_delta, record["epoch"])
        best = state.update_best(val[metric], metric == "loss", weights.sha256, record["epoch"])
        self.tracker.log(record, state.step)
        if best and self.is_main:
            self.run.write_predictions("validation", rows, self.splits.texts(rows["index"]), self.cfg.data.max_length)
        self.progress.say(f"validation at epoch {record['epoch']}: loss {val['loss']:.4f} accuracy "
                          f"{val['accuracy']:.4f} f1 {val['f1']:.4f}" + (" (best)" if best else ""))
        if state.stopped_early_at:
            self.progress.say(f"early stopping: {state.stale_validations} validations without improving {metric} by "
                              f"more than {train.early_stopping_min_delta}")
        return weights, best

    def test(self, model, state: TrainingState, facts: dict, wall_seconds: float) -> dict:
        test, rows = evaluate(model, self.loaders.test, self.device, self.precision, self.gather,
                              self.progress.evaluating("test", len(self.splits.test)))
        metrics = final_metrics(self.cfg, test, state, facts, wall_seconds)
        if self.is_main:
            texts = self.splits.texts(rows["index"])
            self.run.write_predictions("test", rows, texts, self.cfg.data.max_length)
            self.run.write_json("metrics.json", metrics)
            self.tracker.finish(metrics, rows, texts, state.step)
        self.progress.say(f"test accuracy {test['accuracy']:.4f} f1 {test['f1']:.4f} loss {test['loss']:.4f} on "
                          f"{test['n']} reviews (best at epoch {state.best_epoch}); results in {self.run.path}")
        return metrics

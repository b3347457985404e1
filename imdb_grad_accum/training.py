"""How a model trains and is evaluated: optimizer, schedule, weighted loss, plain-PyTorch step, evaluation."""

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import get_scheduler, set_seed

from imdb_grad_accum.device import autocast
from imdb_grad_accum.errors import RunStopped
from imdb_grad_accum.model import encoder_layers, model_inputs
from imdb_grad_accum.packing import select

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
seed_everything = set_seed  # random, numpy and torch


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_optimizer(model: torch.nn.Module, train: DictConfig, lr: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """Parameter groups by lr (train.layer_lr_decay) and weight decay (none on biases and norms); frozen in none."""
    depth = {}  # parameter -> how many steps of decay below the head
    if train.layer_lr_decay is not None:
        layers = encoder_layers(model)
        for i, layer in enumerate(layers):
            depth.update({id(p): len(layers) - i for p in layer.parameters()})
        depth.update({id(p): len(layers) + 1 for p in model.encoder.embeddings.parameters()})
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((depth.get(id(p), 0), p.ndim >= 2), []).append(p)
    decay = train.layer_lr_decay or 1.0
    param_groups = [{"params": params, "lr": lr * decay ** level, "weight_decay": train.weight_decay if matrix else 0.0}
                    for (level, matrix), params in sorted(groups.items())]  # the head's lr first: train/lr logs it
    optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[train.optimizer]
    return optimizer_class(param_groups, lr=lr, betas=tuple(train.adam_betas), eps=train.adam_eps,
                           fused=device.type in ("cuda", "cpu"))


def build_scheduler(optimizer: torch.optim.Optimizer, train: DictConfig, total_steps: int):
    """Over optimizer steps; warmup leaves at least one at the full rate (10% of one step must not round up to 1)."""
    warmup = min(math.ceil(total_steps * train.warmup_ratio), max(total_steps - 1, 0))
    return get_scheduler(SCHEDULES[train.scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def weighted_loss(logits: torch.Tensor, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of per-review cross-entropy x `loss_weight`: a step's micro-batch losses add up to its mean."""
    per_review = F.cross_entropy(logits.float(), batch["labels"], reduction="none", label_smoothing=label_smoothing)
    return (per_review * batch["loss_weight"]).sum()


class MicroBatches:
    """Forward passes of at most `budget` tokens (auto: all), halved after CUDA out-of-memory and the step redone."""

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
        reviews = len(failed["labels"])
        tokens = failed["num_tokens"] if "cu_seqlens" in failed else failed["input_ids"].numel()
        if reviews == 1:
            raise RunStopped(f"out of GPU memory on a single review of {tokens} tokens: lower data.max_length, or "
                             "train on a GPU with more memory (--resume continues from the last resume point)")
        self.budget = max(tokens // 2, 1)
        print(f"out of GPU memory on a forward pass of {reviews} reviews, {tokens} tokens: forward passes of at most "
              f"{self.budget} tokens from here on; redoing the step", flush=True)


def run_in_passes(batch: dict, micro_batches: MicroBatches, one_pass: Callable[[dict, bool], torch.Tensor],
                  start_over: Callable[[], None]) -> torch.Tensor:
    """Sum of `one_pass(part, last)` over `batch`'s passes; after out-of-memory, `start_over()` and again, smaller."""
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
        torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
        micro_batches.shrink(failed)


class Stepper:
    """The plain-PyTorch step: backward for each loader batch, then the optimizer step (clip, step, schedule)."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, device: torch.device, precision: str,
                 train: DictConfig):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.precision = device, precision
        self.max_grad_norm, self.label_smoothing = train.max_grad_norm, train.label_smoothing
        self.cuda_graphs = train.cuda_graphs  # every forward-backward is a new graph replay
        self.micro_batches = MicroBatches(train.micro_batch_tokens)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """Adds this batch's share of its step's mean loss to the gradients; returns that share, on the device."""
        return run_in_passes(batch, self.micro_batches, lambda part, _: self._forward_backward(part),
                             lambda: self.optimizer.zero_grad(set_to_none=True))

    def _forward_backward(self, batch: dict) -> torch.Tensor:
        if self.cuda_graphs:  # only then: the call imports Inductor, about a second per run
            torch.compiler.cudagraph_mark_step_begin()
        batch = to_device(batch, self.device)
        with autocast(self.device, self.precision):
            logits = self.model(**model_inputs(batch))
        loss = weighted_loss(logits, batch, self.label_smoothing)
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32",
             gather: Optional[Callable] = None, progress=None) -> tuple[dict, dict]:
    """Loss, accuracy and F1 over a loader, and the per-review predictions; `gather` collects processes' shards."""
    was_training = model.training
    model.eval()
    columns = {name: [] for name in ("index", "label", "predicted", "prob_positive", "loss", "tokens")}
    for batch in progress(loader) if progress else loader:
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
    """From per-review rows (label, predicted, loss), exactly as the prediction file reproduces them (fsum)."""
    labels, predicted = np.asarray(rows["label"]), np.asarray(rows["predicted"])
    true_pos = int(((predicted == 1) & (labels == 1)).sum())
    predicted_pos, actual_pos = int((predicted == 1).sum()), int((labels == 1).sum())
    precision = true_pos / predicted_pos if predicted_pos else 0.0
    recall = true_pos / actual_pos if actual_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"loss": math.fsum(float(x) for x in rows["loss"]) / len(labels),
            "accuracy": int((predicted == labels).sum()) / len(labels), "f1": f1, "n": len(labels)}

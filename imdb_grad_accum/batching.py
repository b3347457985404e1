"""Batches: optimizer-step windows of reviews, cut into micro-batches for each process, and evaluation loaders."""

from dataclasses import dataclass
from typing import Iterator

import datasets
import numpy as np
import torch
from accelerate import skip_first_batches
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from imdb_grad_accum.config import StepLayout
from imdb_grad_accum.data import Splits
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.packing import BUCKET


class WindowBatchSampler:
    """Micro-batches for one process, in optimizer-step windows that depend only on the seed, the epoch and the
    effective batch, so `batch_size=12` and `batch_size=4, grad_accum_steps=3` make the same steps. Each sample's
    `loss_weight` is 1 / (samples in its window): k micro-batches add up to one batch (filler copies weigh 0)."""

    GROUP_WINDOWS = 50  # windows per length-sorted chunk: enough to group lengths, few enough to stay random

    def __init__(self, lengths, layout: StepLayout, seed: int, process_index: int = 0, group_by_length: bool = True):
        self.lengths = np.asarray(lengths)
        self.layout, self.seed, self.process_index = layout, seed, process_index
        self.group_by_length, self.epoch = group_by_length, 0

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.layout.effective_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    def window_totals(self) -> list[tuple[int, int]]:
        """(samples, real tokens) of each of the epoch's optimizer steps, over all processes."""
        return [(len(window), int(self.lengths[window].sum())) for window in self.windows()]

    def windows(self) -> list[np.ndarray]:
        """The epoch's optimizer steps, as arrays of dataset indices (global, across processes)."""
        size = self.layout.effective_batch
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths))
        if self.group_by_length:
            chunk = size * self.GROUP_WINDOWS
            chunks = np.split(order, range(chunk, len(order), chunk))
            order = np.concatenate([part[np.argsort(-self.lengths[part], kind="stable")] for part in chunks])
        windows = [order[i:i + size] for i in range(0, len(order), size)]
        if self.group_by_length:
            full = [w for w in windows if len(w) == size]
            perm = np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(full))
            windows = [full[i] for i in perm] + [w for w in windows if len(w) < size]
        return windows

    def __len__(self) -> int:
        return self.steps_per_epoch * self.layout.loader_batches

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        processes = self.layout.processes
        parts = self.layout.loader_batches * processes
        for window in self.windows():
            weight = 1.0 / len(window)
            if len(window) < parts:  # pad with weight-0 copies so every process gets its loader batches
                rows = [(int(i), weight) for i in window] + [(int(window[0]), 0.0)] * (parts - len(window))
                micro_batches = [[row] for row in rows]
            else:
                micro_batches = [[(int(i), weight) for i in chunk] for chunk in np.array_split(window, parts)]
            yield from micro_batches[self.process_index::processes]


class WeightedRows(torch.utils.data.Dataset):
    """The rows a WindowBatchSampler names, each with its loss weight."""

    def __init__(self, rows: datasets.Dataset):
        self.rows = rows.remove_columns(["length", "full_length"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, keys: list[tuple[int, float]]) -> list[dict]:
        columns = self.rows[[index for index, _ in keys]]
        return [{**{name: values[i] for name, values in columns.items()}, "loss_weight": keys[i][1]}
                for i in range(len(keys))]


class PackedRows(torch.utils.data.Dataset):
    """Each micro-batch as one packed row, gathered by vectorised numpy (a loop over reviews kept GPU steps waiting).
    With `slots` (train.cuda_graphs) rows have few shapes: tokens padded to a multiple of packing.BUCKET, `slots`
    review boundaries (unused ones empty, weight 0), then padding sequences of at most `max_length` tokens."""

    def __init__(self, rows: datasets.Dataset, slots: int | None = None, max_length: int = 512):
        self.slots, self.max_length = slots, max_length
        table = rows.with_format("arrow")[:]
        ids = table.column("input_ids").combine_chunks()
        offsets = ids.offsets.to_numpy().astype(np.int64)
        self.offsets = offsets - offsets[0]
        self.tokens = ids.flatten().to_numpy().astype(np.int32)
        self.token_types = (table.column("token_type_ids").combine_chunks().flatten().to_numpy().astype(np.int8)
                            if "token_type_ids" in table.column_names else None)
        self.labels = table.column("label").to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, keys: list[tuple[int, float]]) -> dict:
        index = np.fromiter((i for i, _ in keys), dtype=np.int64, count=len(keys))
        starts, lengths = self.offsets[index], self.offsets[index + 1] - self.offsets[index]
        cu_seqlens = np.zeros(len(keys) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        positions = np.arange(cu_seqlens[-1], dtype=np.int64) - np.repeat(cu_seqlens[:-1], lengths)
        gather = np.repeat(starts, lengths) + positions
        labels, weights = self.labels[index], np.fromiter((w for _, w in keys), dtype=np.float32, count=len(keys))
        batch = {"input_ids": self.tokens[gather].astype(np.int64), "position_ids": positions,
                 "cu_seqlens": cu_seqlens, "max_seqlen": int(lengths.max()), "labels": labels, "loss_weight": weights}
        if self.token_types is not None:
            batch["token_type_ids"] = self.token_types[gather].astype(np.int64)
        if self.slots:
            batch = self._bucketed(batch)
        batch["num_tokens"] = len(batch["input_ids"])
        for name in set(batch) & {"input_ids", "position_ids", "token_type_ids"}:
            batch[name] = torch.from_numpy(batch[name])[None]
        for name in ("cu_seqlens", "labels", "loss_weight"):
            batch[name] = torch.from_numpy(batch[name])
        return batch

    def _bucketed(self, batch: dict) -> dict:
        n, real = len(batch["labels"]), int(batch["cu_seqlens"][-1])
        pad = -(-real // BUCKET) * BUCKET - real
        segments = -(-(BUCKET - 1) // self.max_length)  # enough sequences of <= max_length for any padding
        cu = np.full(self.slots + 1 + segments, real, dtype=np.int32)
        cu[:n + 1] = batch["cu_seqlens"]
        cu[self.slots + 1:] = real + np.minimum(self.max_length * np.arange(1, segments + 1), pad)
        fill = np.zeros(pad, dtype=np.int64)
        out = {"input_ids": np.concatenate([batch["input_ids"], fill]),
               "position_ids": np.concatenate([batch["position_ids"], np.arange(pad) % self.max_length]),
               "cu_seqlens": cu, "max_seqlen": self.max_length, "num_reviews": self.slots,
               "labels": np.zeros(self.slots, dtype=np.int64), "loss_weight": np.zeros(self.slots, dtype=np.float32)}
        out["labels"][:n], out["loss_weight"][:n] = batch["labels"], batch["loss_weight"]
        if "token_type_ids" in batch:
            out["token_type_ids"] = np.concatenate([batch["token_type_ids"], fill])
        return out


@dataclass
class Loaders:
    sampler: WindowBatchSampler
    train: DataLoader
    validation: DataLoader
    test: DataLoader

    def epoch(self, epoch: int, done: int = 0):
        """The epoch's training batches after the first `done` (trained on before a resume)."""
        self.sampler.set_epoch(epoch)
        return skip_first_batches(self.train, done) if done else self.train


# Own generators: a DataLoader without one draws its seed from dropout's global RNG, so resumed dropout would differ.
def make_loaders(splits: Splits, tokenizer, cfg: DictConfig, layout: StepLayout, process_index: int = 0,
                 device: torch.device = torch.device("cpu"), packed: bool = False) -> Loaders:
    """Training batches cut by `layout` for process `process_index`, packed rows when `packed`; evaluation pads."""
    parts = layout.loader_batches * layout.processes
    if parts > len(splits.train):  # windows would be mostly weight-0 filler micro-batches
        raise UserError(f"an optimizer step of {layout.loader_batches} micro-batch(es) x {layout.processes} "
                        f"process(es) needs at least as many training reviews, and there are {len(splits.train)}; "
                        "lower train.grad_accum_steps (or train.effective_batch_size), or train on more reviews")
    sampler = WindowBatchSampler(splits.train["length"][:], layout, cfg.seed, process_index, cfg.data.group_by_length)
    return Loaders(sampler, make_train_loader(splits.train, sampler, tokenizer, cfg, device, packed),
                   make_eval_loader(splits.validation, tokenizer, cfg, device),
                   make_eval_loader(splits.test, tokenizer, cfg, device))


def make_train_loader(rows: datasets.Dataset, sampler: WindowBatchSampler, tokenizer, cfg: DictConfig,
                      device: torch.device = torch.device("cpu"), packed: bool = False) -> DataLoader:
    slots = sampler.layout.loader_batch_size if cfg.train.cuda_graphs else None
    dataset, collate = ((PackedRows(rows, slots, cfg.data.max_length), already_collated) if packed else
                        (WeightedRows(rows), make_collator(tokenizer, cfg, device)))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator())


def already_collated(batch: dict) -> dict:
    return batch


def make_eval_loader(rows: datasets.Dataset, tokenizer, cfg: DictConfig,
                     device: torch.device = torch.device("cpu")) -> DataLoader:
    """Longest reviews first, so each batch pads little and memory peaks at the start."""
    by_length = rows.select(np.argsort(-np.asarray(rows["length"][:]), kind="stable")).remove_columns("length")
    return DataLoader(by_length, batch_size=cfg.train.batch_size * 2, shuffle=False,
                      collate_fn=make_collator(tokenizer, cfg, device), num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator())


def make_collator(tokenizer, cfg: DictConfig, device: torch.device) -> DataCollatorWithPadding:
    """On GPUs pads to a multiple of 64 by default: cuDNN plans each new length anew (H100: 3x slower steps)."""
    multiple = cfg.data.pad_to_multiple_of or (64 if device.type == "cuda" else None)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, return_tensors="pt")

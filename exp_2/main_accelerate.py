"""Experiment 2 through HuggingFace Accelerate: exact gradient accumulation on 1 process or many.

    accelerate launch exp_2/main_accelerate.py                      # default config: ModernBERT, effective batch 64
    accelerate launch --multi_gpu --num_processes 8 exp_2/main_accelerate.py --config configs/exp2_eb1024.yaml
    accelerate launch --multi_gpu --num_processes 2 exp_2/main_accelerate.py train.device=cpu ...   # 2 CPU processes

Same data, model, windows and exact loss normalisation as exp_2/main.py; Accelerate adds processes, mixed precision,
skipping the gradient all-reduce on non-final micro-batches (`accumulate`) and `gather_for_metrics`. With
train.precision: auto, the mixed precision chosen by `accelerate launch --mixed_precision` or `accelerate config`
is used. Lines of the loop that differ from exp_2/main.py end with a tag saying why: [accelerate], [accumulation].
tests/test_loops.py keeps the rest of the three loops identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import asdict
from datetime import timedelta

from omegaconf import DictConfig

from exp_1.cli import Preemption, die_with_parent, parse_and_load, run_cli
from exp_1.config import CONFIG_DIR, scaled_lr, step_layout
from exp_1.errors import LostPeer, RunStopped

DEFAULT_CONFIG = CONFIG_DIR / "exp2_eb64.yaml"
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def backward_micro_batch(accelerator, model, batch: dict, micro_batches, optimizer, cuda_graphs: bool = False):
    """Adds this micro-batch's share of its window's mean loss (over all processes) to the gradients.

    The sampler's weights (1 / samples in the global window) already make the shares add up to the window mean.
    Accelerate divides every loss by gradient_accumulation_steps and DDP averages over processes; multiplying by
    both undoes that, so the smaller last window of an epoch is not under-scaled. With train.micro_batch_tokens the
    batch is the process's whole window, run in forward passes of that many tokens: all but the last skip the
    all-reduce, so each process syncs once per window however many passes it needs."""
    import torch

    from exp_1.model import model_inputs, weighted_loss
    from exp_1.train import run_in_passes, to_device

    def one_pass(part: dict, last: bool):
        if cuda_graphs:  # train.cuda_graphs: a new graph replay (only then: it imports Inductor, about a second)
            torch.compiler.cudagraph_mark_step_begin()
        part = to_device(part, accelerator.device)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = weighted_loss(model(**model_inputs(part)), part)
            accelerator.backward(loss * accelerator.gradient_accumulation_steps * accelerator.num_processes)
        return loss.detach()

    def start_over():
        if accelerator.num_processes > 1:  # the others may be waiting in this window's all-reduce already
            raise RunStopped("out of GPU memory under several processes: set train.micro_batch_tokens lower and "
                             "--resume from the last resume point")
        optimizer.zero_grad(set_to_none=True)

    return run_in_passes(batch, micro_batches, one_pass, start_over)


def run_experiment(cfg: DictConfig, resume: bool = False, overwrite: bool = False) -> dict:
    # Imported here, not at the top: --help, --print-config and config errors answer before torch loads (~3 s).
    from accelerate import Accelerator, PartialState

    from exp_1.data import make_loaders, prepare_data, review_starts
    from exp_1.device import pick_device
    from exp_1.errors import Diverged, Preempted
    from exp_1.model import Weights, checkpoint_activations, compile_model, load_model, load_weights
    from exp_1.packing import check_cuda_graphs, use_packing
    from exp_1.precision import launcher_precision, pick_precision
    from exp_1.resume import ResumePoints
    from exp_1.rundir import RunDir
    from exp_1.tracking import Tracker, describe, final_metrics, run_facts
    from exp_1.train import (Meter, MicroBatches, TrainingState, build_optimizer, build_scheduler, due, evaluate,
                             progress_mode, seed_everything, validation_line)

    started = time.time()

    # device: a CPU choice must reach Accelerate, or CPU processes would each train alone; a process that stops
    # answering ends the run after train.peer_timeout seconds, not gloo's or NCCL's default half hour
    cpu = pick_device(cfg.train.device).type == "cpu"
    processes = PartialState(cpu=cpu, timeout=timedelta(seconds=cfg.train.peer_timeout))
    device = processes.device
    precision = pick_precision(cfg.train.precision, device, launcher=launcher_precision())
    layout = step_layout(cfg.train, processes.num_processes)
    packed = use_packing(cfg.train.packing, cfg.model, device, precision)
    check_cuda_graphs(cfg.train, packed)
    run = RunDir.of(cfg)
    run.check(cfg, resume, overwrite)  # read only, on every process: what could not be started stops here
    accelerator = Accelerator(cpu=cpu, mixed_precision=MIXED_PRECISION[precision],
                              gradient_accumulation_steps=layout.loader_batches)
    is_main = accelerator.is_main_process
    seed_everything(cfg.seed)
    progress = progress_mode(cfg.train.progress)

    # model and data, checked before the run directory is touched
    tokenizer, model = load_model(cfg.model, cfg.data, packed)
    if cfg.train.activation_checkpointing:
        checkpoint_activations(model)
    if cfg.train.compile:
        compile_model(model, packed, cfg.train.cuda_graphs)
    with accelerator.main_process_first():  # the first process tokenises and caches, the others read the cache
        splits = prepare_data(cfg, tokenizer, model.input_names)
    # The train loader is not prepared: Accelerate's sharding would top up uneven last batches with repeated
    # samples. The sampler deals each window's micro-batches to the processes itself.
    loaders = make_loaders(splits, tokenizer, cfg, layout, accelerator.process_index, device, packed)

    # optimizer and schedule, sized in optimizer steps (the scheduler is stepped by hand, once per real step)
    lr = scaled_lr(cfg.train, layout.effective_batch)
    optimizer = build_optimizer(model, cfg.train, lr, device)
    micro_batches = MicroBatches(cfg.train.micro_batch_tokens)  # forward passes cut by tokens, when set
    scheduler = build_scheduler(optimizer, cfg.train, loaders.sampler.steps_per_epoch * cfg.train.epochs)
    # `wrapped` trains (DDP under several processes); `model` is the same module unwrapped, for weights and eval
    wrapped, optimizer, val_loader, test_loader = accelerator.prepare(model, optimizer, loaders.validation,
                                                                      loaders.test)

    # the run directory: the main process is its only writer until the run ends; a new run, or the newest verified
    # resume point
    with run.writer(cfg, resume, overwrite, splits.record) if is_main else contextlib.nullcontext():
        accelerator.wait_for_everyone()
        points = ResumePoints(run, {"script": "exp_2/main_accelerate.py", **asdict(layout)}, model, optimizer,
                              scheduler, accelerator.scaler, accelerator.process_index, accelerator.wait_for_everyone)
        if resume:
            state = TrainingState(**points.load())
        else:
            state = TrainingState()
            if is_main:
                run.save_model_parts(model, tokenizer)
                run.write_json("split.json", splits.record, indent=None)
        accelerator.wait_for_everyone()

        # tracking: history.jsonl and WandB, on the main process
        facts = run_facts("exp_2/main_accelerate.py", layout, lr, device.type, precision, splits.record, packed)
        tracker = Tracker(run, cfg, facts, active=is_main)
        meter = Meter(state, loaders.sampler, progress, show=accelerator.is_local_main_process)
        accelerator.print(describe(cfg, facts, loaders.sampler.steps_per_epoch) + f" ({accelerator.distributed_type})")

        for epoch in range(state.epoch, cfg.train.epochs + 1):
            if state.stopped_early_at:  # a resumed run that had stopped early goes straight to its test
                break
            loaders.sampler.set_epoch(epoch)
            model.train()  # from_pretrained returns the encoder in eval mode: without this its dropout would be off
            window_loss = 0.0  # [accumulation]
            for batch in meter.epoch(loaders.train, epoch):
                # every window has exactly gradient_accumulation_steps micro-batches per process, so Accelerate's
                # count of micro-batches marks the window's last one (sync_gradients) and skips the all-reduce before it
                with accelerator.accumulate(wrapped):  # [accelerate]
                    window_loss += backward_micro_batch(accelerator, wrapped, batch, micro_batches,  # [accelerate]
                                                        optimizer, cfg.train.cuda_graphs)  # [accelerate]
                    if not accelerator.sync_gradients:  # [accelerate]
                        continue  # [accumulation]
                    step_lr = scheduler.get_last_lr()[0]  # what this step uses; the scheduler then moves on
                    grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(),  # [accelerate]
                                                            cfg.train.max_grad_norm or math.inf)  # [accelerate]
                    optimizer.step()  # [accelerate]
                    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule advance [accelerate]
                        scheduler.step()  # [accelerate]
                    optimizer.zero_grad(set_to_none=True)  # [accelerate]
                meter.step_done(window_loss, grad_norm, step_lr)
                window_loss = 0.0  # [accumulation]

                # what this step logs, validates and saves; the host reads the device back only here
                end_of_epoch = state.batches_done == len(loaders.train)
                log = end_of_epoch or due(cfg.train.log_every, state.step)
                validate = end_of_epoch or due(cfg.train.eval_every_steps, state.step)
                save = validate or due(cfg.checkpoint.every_steps, state.step)
                if not (log or save):
                    continue
                if validate:
                    val, val_rows = evaluate(model, val_loader, device, precision,  # [accelerate]
                                             accelerator.gather_for_metrics)  # [accelerate]
                # all processes agree on the loss and on stopping in one exchange, so they stop at the same step
                loss, stop = state.settle(Preemption.requested, accelerator.reduce)  # [accelerate]
                if not math.isfinite(loss):  # before a resume point or checkpoint could keep the diverged weights
                    raise Diverged(loss, state.step, epoch)
                if log:
                    tracker.log(meter.train_record(), step=state.step)
                if validate:  # every validation is a candidate for the best checkpoint, and may stop training early
                    record = meter.validation_record(val)
                    weights = Weights.of(model, step=state.step, epoch=record["epoch"], **val)
                    last = end_of_epoch and epoch == cfg.train.epochs  # nothing left to stop early
                    best = state.record_validation(val[cfg.checkpoint.best_metric], cfg.checkpoint.best_metric == "loss",
                                                   weights.sha256, record["epoch"],
                                                   None if last else cfg.train.early_stopping_patience,
                                                   cfg.train.early_stopping_min_delta)
                    tracker.log(record, step=state.step)
                    if best and is_main:  # [accelerate]
                        run.write_predictions("validation", val_rows, review_starts(splits.reviews, val_rows["index"]),
                                              cfg.data.max_length)
                # the resume point first, then last/best from the same bytes: a kill between the two is repaired
                # from the point on --resume
                if save or stop:
                    points.save(weights if validate else Weights.of(model), state)
                if validate:
                    if is_main:  # [accelerate]
                        run.save_checkpoints(weights, best)
                    accelerator.print(validation_line(val, record, best))  # [accelerate]
                meter.pause()
                if stop:  # SIGTERM, seen at the step's log, validation or save
                    tracker.preempted()
                    raise Preempted(state.step)
                if state.stopped_early_at:
                    accelerator.print(f"early stopping: {state.stale_validations} validations without improving "  # [accelerate]
                                      f"{cfg.checkpoint.best_metric} by more than {cfg.train.early_stopping_min_delta}")
                    break

        # test the best checkpoint, verified against the checksum recorded when it was written
        accelerator.wait_for_everyone()  # [accelerate]
        load_weights(model, run.best, state.best_sha256)
        test, test_rows = evaluate(model, test_loader, device, precision,  # [accelerate]
                                   accelerator.gather_for_metrics)  # [accelerate]
        metrics = final_metrics(cfg, test, state, facts, meter.throughput(), time.time() - started)
        if is_main:  # [accelerate]
            texts = review_starts(splits.reviews, test_rows["index"])
            run.write_predictions("test", test_rows, texts, cfg.data.max_length)
            run.write_json("metrics.json", metrics)
            tracker.finish(metrics, test_rows, texts, step=state.step)
        accelerator.wait_for_everyone()  # no process ends the process group while another still writes [accelerate]
        leave_together(accelerator)  # [accelerate]
        # DDP's reducer goes first, while the process group is still registered: the last reference it held would
        # tear gloo down with the GIL held, a deadlock if a gloo thread is still releasing a tensor (torch 2.13)
        del wrapped  # [accelerate]
        accelerator.free_memory()  # [accelerate]
        accelerator.end_training()  # [accelerate]
    accelerator.print(f"test accuracy {test['accuracy']:.4f} f1 {test['f1']:.4f} loss {test['loss']:.4f} on "  # [accelerate]
                      f"{test['n']} reviews (best at epoch {state.best_epoch}); results in {run.path}")
    return metrics


def main(argv=None) -> dict:
    if "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ:
        die_with_parent()  # started by `accelerate launch` or torchrun: end with it, never write on as an orphan
    args, cfg = parse_and_load(argv, __doc__, DEFAULT_CONFIG, launcher=True)
    try:
        return run_experiment(cfg, args.resume, args.overwrite)
    except RuntimeError as err:
        if not _lost_peer(err):
            raise
        raise LostPeer(f"another process of this run stopped answering ({(str(err).strip().splitlines() or [type(err).__name__])[0][:160]}); "
                       f"what was saved is kept: continue with --resume (train.peer_timeout={cfg.train.peer_timeout} "
                       "s sets how long processes wait for each other)") from None


def leave_together(accelerator) -> None:
    """After the last collective, the first process (whose process hosts the rendezvous store) waits until every
    other process has returned from it before it tears down: gloo may still be delivering its last message when a
    barrier returns on one side, and a process that exits then leaves another waiting for that message until
    train.peer_timeout. Each process checks in through the store, whose requests are answered."""
    import torch.distributed as dist

    if accelerator.num_processes == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    if accelerator.is_main_process:
        store.wait([f"left/{rank}" for rank in range(1, accelerator.num_processes)])  # bounded by train.peer_timeout
    else:
        store.set(f"left/{accelerator.process_index}", "1")


def _lost_peer(err: RuntimeError) -> bool:
    """A collective failed because another process died or stopped answering: torch.distributed's DistError, or, as
    gloo raises its timeouts and closed connections in torch 2.13, a plain RuntimeError from the backend's own
    transport (its message names gloo's or NCCL's source)."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return several and re.search(r"\bgloo\b|\bnccl\b|ProcessGroup", str(err), re.IGNORECASE) is not None


def cli() -> None:
    """The console command (pyproject.toml)."""
    run_cli(main)


if __name__ == "__main__":
    cli()

"""Experiment 2 through HuggingFace Accelerate: exact gradient accumulation on 1 process or many.

    accelerate launch exp_2/main_accelerate.py                      # default config: ModernBERT, effective batch 64
    accelerate launch --multi_gpu --num_processes 8 exp_2/main_accelerate.py --config configs/exp2_eb1024.yaml
    accelerate launch --multi_gpu --num_processes 2 exp_2/main_accelerate.py train.device=cpu ...   # 2 CPU processes

Same data, model, windows and exact loss normalisation as exp_2/main.py; Accelerate adds processes, mixed precision,
skipping the gradient all-reduce on non-final micro-batches (`accumulate`) and `gather_for_metrics`. With
train.precision: auto, the mixed precision chosen by `accelerate launch --mixed_precision` or `accelerate config`
is used.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from datetime import timedelta

from omegaconf import DictConfig

from exp_1.cli import Preemption, die_with_parent, parse_and_load, run_cli
from exp_1.config import CONFIG_DIR, RunStopped, scaled_lr, window_layout

DEFAULT_CONFIG = CONFIG_DIR / "exp2_eb64.yaml"
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def backward_micro_batch(accelerator, model, batch: dict, micro_batches, optimizer):
    """Adds this micro-batch's share of its window's mean loss (over all processes) to the gradients.

    The sampler's weights (1 / samples in the global window) already make the shares add up to the window mean.
    Accelerate divides every loss by gradient_accumulation_steps and DDP averages over processes; multiplying by
    both undoes that, so the smaller last window of an epoch is not under-scaled. With train.micro_batch_tokens the
    batch is the process's whole window, run in forward passes of that many tokens: all but the last skip the
    all-reduce, so each process syncs once per window however many passes it needs."""
    from exp_1.model import model_inputs, weighted_loss
    from exp_1.train import run_in_passes
    from exp_1.utils import to_device

    def one_pass(part: dict, last: bool):
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
    import torch
    from accelerate import Accelerator, PartialState

    from exp_1.data import make_loaders, prepare_data, review_starts
    from exp_1.model import Weights, compile_model, load_model, load_weights, save_pretrained_parts
    from exp_1.rundir import ResumePoints, RunDir, write_predictions
    from exp_1.tracking import Tracker, describe, final_metrics, run_facts
    from exp_1.train import Meter, MicroBatches, TrainingState, build_optimizer, build_scheduler, diverged, evaluate
    from exp_1.utils import launcher_precision, pick_device, pick_precision, seed_everything, use_packing

    started = time.time()

    # device: a CPU choice must reach Accelerate, or CPU processes would each train alone; a process that stops
    # answering ends the run after train.peer_timeout seconds, not gloo's or NCCL's default half hour
    cpu = pick_device(cfg.train.device).type == "cpu"
    processes = PartialState(cpu=cpu, timeout=timedelta(seconds=cfg.train.peer_timeout))
    precision = pick_precision(cfg.train.precision, processes.device, launcher=launcher_precision())
    micro_batch, accum_steps = window_layout(cfg.train, processes.num_processes)
    packed = use_packing(cfg.train.packing, cfg.model, processes.device, precision)
    run = RunDir.of(cfg)
    run.check(cfg, resume, overwrite)  # read only, on every process: what could not be started stops here
    accelerator = Accelerator(cpu=cpu, mixed_precision=MIXED_PRECISION[precision],
                              gradient_accumulation_steps=accum_steps)
    is_main = accelerator.is_main_process
    seed_everything(cfg.seed)

    # model and data, checked before the run directory is touched
    tokenizer, model = load_model(cfg.model, cfg.data, packed)
    if cfg.train.compile:
        compile_model(model, packed)
    with accelerator.main_process_first():  # the first process tokenises and caches, the others read the cache
        splits = prepare_data(cfg, tokenizer, model.input_names)
    # The train loader is not prepared: Accelerate's sharding would top up uneven last batches with repeated
    # samples. The sampler deals each window's micro-batches to the processes itself.
    loaders = make_loaders(splits, tokenizer, cfg, (micro_batch, accum_steps), accelerator.num_processes, accelerator.process_index,
                           accelerator.device, packed)

    # optimizer and schedule, sized in optimizer steps (the scheduler is stepped by hand, once per real step)
    lr = scaled_lr(cfg.train, loaders.sampler.effective_batch)
    optimizer = build_optimizer(model, cfg.train, lr, accelerator.device)
    micro_batches = MicroBatches(cfg.train.micro_batch_tokens)  # forward passes cut by tokens, when set
    steps_per_epoch = len(loaders.sampler) // accum_steps
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch * cfg.train.epochs)
    model, optimizer, val_loader, test_loader = accelerator.prepare(model, optimizer, loaders.validation, loaders.test)
    plain_model = accelerator.unwrap_model(model)

    # the run directory: the main process becomes its only writer; a new run, or the newest verified resume point
    if is_main:
        run.create(cfg, resume, overwrite)
    accelerator.wait_for_everyone()
    points = ResumePoints(run, {"script": "exp_2/main_accelerate.py", "processes": accelerator.num_processes,
                                "accum_steps": accum_steps}, accelerator.process_index, accelerator.wait_for_everyone)
    if resume:
        state = TrainingState(**points.load(plain_model, optimizer, scheduler, accelerator.scaler))
    else:
        state = TrainingState()
        if is_main:
            save_pretrained_parts(plain_model, tokenizer, run.model_dir)
            run.write_json("split.json", splits.record, indent=None)
    accelerator.wait_for_everyone()

    # tracking: history.jsonl and WandB, on the main process
    facts = run_facts("exp_2/main_accelerate.py", accum_steps, loaders.sampler.effective_batch,
                      accelerator.num_processes, lr, accelerator.device.type, precision, splits.record, packed)
    tracker = Tracker(run, cfg, facts, active=is_main)
    meter = Meter(state, loaders.sampler, show=accelerator.is_local_main_process)
    accelerator.print(describe(cfg, facts, steps_per_epoch) + f" ({accelerator.distributed_type})")

    for epoch in range(state.epoch, cfg.train.epochs + 1):
        loaders.sampler.set_epoch(epoch)
        model.train()  # from_pretrained returns the encoder in eval mode: without this its dropout would be off
        window_loss = 0.0
        for batch in meter.epoch(loaders.train, epoch):
            # every window has exactly gradient_accumulation_steps micro-batches per process, so Accelerate's count
            # of micro-batches marks the window's last one (sync_gradients) and skips the all-reduce before it
            with accelerator.accumulate(model):
                window_loss += backward_micro_batch(accelerator, model, batch, micro_batches, optimizer)
                if not accelerator.sync_gradients:
                    continue
                step_lr = scheduler.get_last_lr()[0]  # what this step uses; the scheduler then moves on
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule advance
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            # one exchange per step: the window's mean loss (each process holds its share) and whether any process
            # was asked to stop, so that all of them save the same resume point
            shared = accelerator.reduce(torch.stack([window_loss.float(), torch.tensor(
                float(Preemption.requested), device=accelerator.device)]), "sum").tolist()
            loss, stop, window_loss = shared[0], shared[1] > 0, 0.0
            meter.step_done(loss, float(grad_norm), step_lr)
            if not math.isfinite(loss):
                raise diverged(loss, state)
            if state.step % cfg.train.log_every == 0:
                tracker.log(meter.train_record(), step=state.step)
            if (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0) or stop:
                points.save(Weights.of(plain_model), optimizer, scheduler, accelerator.scaler, state)
                meter.pause()
            if stop:
                raise Preemption.stop(state.step)
        if state.unlogged:  # the epoch's last steps, when log_every does not divide them
            tracker.log(meter.train_record(), step=state.step)

        # validate, then checkpoint: the epoch's resume point first, then last/best from the same bytes, so a kill
        # between the two is repaired from the point on --resume
        val, val_rows = evaluate(model, val_loader, accelerator.device, gather=accelerator.gather_for_metrics)
        weights = Weights.of(plain_model, epoch=epoch, **val)  # on every process: all record the best's checksum
        best = state.record_validation(epoch, val[cfg.checkpoint.best_metric], cfg.checkpoint.best_metric == "loss",
                                       weights.sha256)
        tracker.log({"epoch": epoch, **{f"val/{k}": v for k, v in val.items()}}, step=state.step)
        if best and is_main:
            write_predictions(run.predictions / "validation.csv", val_rows,
                              review_starts(splits.reviews, val_rows["index"]), cfg.data.max_length)
        points.save(weights, optimizer, scheduler, accelerator.scaler, state)
        if is_main:
            run.save_checkpoints(weights, best)
        meter.pause()
        accelerator.print(f"epoch {epoch}: val loss {val['loss']:.4f} accuracy {val['accuracy']:.4f} "
                          f"f1 {val['f1']:.4f}" + (" (best)" if best else ""))

    # test the best checkpoint, verified against the checksum recorded when it was written
    accelerator.wait_for_everyone()
    load_weights(plain_model, run.best, state.best_sha256)
    test, test_rows = evaluate(model, test_loader, accelerator.device, gather=accelerator.gather_for_metrics)
    metrics = final_metrics(cfg, test, state, facts, meter.throughput(), time.time() - started)
    if is_main:
        texts = review_starts(splits.reviews, test_rows["index"])
        write_predictions(run.predictions / "test.csv", test_rows, texts, cfg.data.max_length)
        run.write_json("metrics.json", metrics)
        tracker.finish(metrics, test_rows, texts, step=state.step)
    accelerator.wait_for_everyone()  # no process tears the process group down while another still writes or logs
    accelerator.end_training()
    accelerator.print(f"test accuracy {test['accuracy']:.4f} f1 {test['f1']:.4f} loss {test['loss']:.4f} on "
                      f"{test['n']} reviews (best epoch {state.best_epoch}); results in {run.path}")
    return metrics


def main(argv=None) -> dict:
    if "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ:
        die_with_parent()  # started by `accelerate launch` or torchrun: end with it, never write on as an orphan
    args, cfg = parse_and_load(argv, __doc__, DEFAULT_CONFIG, launcher=True)
    try:
        return run_experiment(cfg, args.resume, args.overwrite)
    except RuntimeError as err:  # torch.distributed: a peer process stopped answering, or died
        if not _lost_peer(err):
            raise
        raise RunStopped(f"another process of this run stopped answering ({str(err).strip().splitlines()[0][:160]}); "
                         f"what was saved is kept: continue with --resume (train.peer_timeout={cfg.train.peer_timeout} "
                         "s sets how long processes wait for each other)") from None


def _lost_peer(err: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(err).lower()
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        words in text for words in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe"))


def cli() -> None:
    """The console command (pyproject.toml)."""
    run_cli(main)


if __name__ == "__main__":
    cli()

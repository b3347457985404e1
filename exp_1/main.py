"""Experiment 1: fine-tune an encoder (BERT, ModernBERT, any HF encoder) for IMDB sentiment, one step per batch.

    python exp_1/main.py --config configs/modernbert.yaml [dotted.key=value ...]
    python exp_1/main.py --config configs/quickstart.yaml data.path=/path/to/imdb   # offline, on a laptop
    python -m exp_1.main --help                                                    # every config key

The workflow: device -> data -> optimizer/scheduler -> run directory -> tracking -> per epoch train, validating (and
saving a resume point and the checkpoints) at its end and every train.eval_every_steps -> test the best. Lines of the loop that differ from exp_2's end with a tag saying why: [one step per batch],
[plain PyTorch]. tests/test_loops.py keeps the rest of the three loops identical.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

from omegaconf import DictConfig

from exp_1.cli import Preemption, parse_and_load, run_cli
from exp_1.config import CONFIG_DIR, scaled_lr, step_layout
from exp_1.errors import UserError

DEFAULT_CONFIG = CONFIG_DIR / "quickstart.yaml"


def run_experiment(cfg: DictConfig, resume: bool = False, overwrite: bool = False) -> dict:
    # Imported here, not at the top: --help, --print-config and config errors answer before torch loads (~3 s).
    from exp_1.data import make_loaders, prepare_data, review_starts
    from exp_1.device import pick_device
    from exp_1.errors import Diverged, Preempted
    from exp_1.model import Weights, checkpoint_activations, compile_model, load_model, load_weights
    from exp_1.packing import check_cuda_graphs, use_packing
    from exp_1.precision import pick_precision
    from exp_1.resume import ResumePoints
    from exp_1.rundir import RunDir
    from exp_1.tracking import Tracker, describe, final_metrics, run_facts
    from exp_1.train import (Meter, MicroBatches, Stepper, TrainingState, build_optimizer, build_scheduler, due,
                             evaluate, progress_mode, seed_everything, validation_line)

    started = time.time()
    layout = step_layout(cfg.train)
    run = RunDir.of(cfg)
    run.check(cfg, resume, overwrite)  # read only: what could not be started, replaced or continued stops here
    seed_everything(cfg.seed)
    progress = progress_mode(cfg.train.progress)

    # device
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.precision, device)
    packed = use_packing(cfg.train.packing, cfg.model, device, precision)
    check_cuda_graphs(cfg.train, packed)

    # model and data, checked before the run directory is touched
    tokenizer, model = load_model(cfg.model, cfg.data, packed)
    model.to(device)
    if cfg.train.activation_checkpointing:
        checkpoint_activations(model)
    if cfg.train.compile:
        compile_model(model, packed, cfg.train.cuda_graphs)
    splits = prepare_data(cfg, tokenizer, model.input_names)
    loaders = make_loaders(splits, tokenizer, cfg, layout, device=device, packed=packed)

    # optimizer and schedule, sized in optimizer steps
    lr = scaled_lr(cfg.train, layout.effective_batch)
    optimizer = build_optimizer(model, cfg.train, lr, device)
    scheduler = build_scheduler(optimizer, cfg.train, loaders.sampler.steps_per_epoch * cfg.train.epochs)
    stepper = Stepper(model, optimizer, scheduler, device, precision, cfg.train.max_grad_norm,
                      MicroBatches(cfg.train.micro_batch_tokens), cfg.train.cuda_graphs)

    # the run directory: this process is its only writer until the run ends; a new run, or the newest verified
    # resume point
    with run.writer(cfg, resume, overwrite, splits.record):
        points = ResumePoints(run, {"script": "exp_1/main.py", **asdict(layout)}, model, optimizer, scheduler,
                              stepper.scaler)
        if resume:
            state = TrainingState(**points.load())
        else:
            state = TrainingState()
            run.save_model_parts(model, tokenizer)
            run.write_json("split.json", splits.record, indent=None)  # ~50k indices: one line

        # tracking: history.jsonl and WandB
        facts = run_facts("exp_1/main.py", layout, lr, device.type, precision, splits.record, packed)
        tracker = Tracker(run, cfg, facts)
        meter = Meter(state, loaders.sampler, progress)
        print(describe(cfg, facts, loaders.sampler.steps_per_epoch))

        for epoch in range(state.epoch, cfg.train.epochs + 1):
            if state.stopped_early_at:  # a resumed run that had stopped early goes straight to its test
                break
            loaders.sampler.set_epoch(epoch)
            model.train()  # from_pretrained returns the encoder in eval mode: without this its dropout would be off
            for batch in meter.epoch(loaders.train, epoch):  # one optimizer step per batch
                window_loss = stepper.forward_backward(batch)  # [one step per batch]
                step_lr = scheduler.get_last_lr()[0]  # what this step uses; the scheduler then moves on
                grad_norm = stepper.optimizer_step()  # [plain PyTorch]
                meter.step_done(window_loss, grad_norm, step_lr)

                # what this step logs, validates and saves; the host reads the device back only here
                end_of_epoch = state.batches_done == len(loaders.train)
                log = end_of_epoch or due(cfg.train.log_every, state.step)
                validate = end_of_epoch or due(cfg.train.eval_every_steps, state.step)
                save = validate or due(cfg.checkpoint.every_steps, state.step)
                if not (log or save):
                    continue
                if validate:
                    val, val_rows = evaluate(model, loaders.validation, device, precision)  # [plain PyTorch]
                loss, stop = state.settle(Preemption.requested)  # [plain PyTorch]
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
                    if best:  # [plain PyTorch]
                        run.write_predictions("validation", val_rows, review_starts(splits.reviews, val_rows["index"]),
                                              cfg.data.max_length)
                # the resume point first, then last/best from the same bytes: a kill between the two is repaired
                # from the point on --resume
                if save or stop:
                    points.save(weights if validate else Weights.of(model), state)
                if validate:
                    run.save_checkpoints(weights, best)
                    print(validation_line(val, record, best))  # [plain PyTorch]
                meter.pause()
                if stop:  # SIGTERM, seen at the step's log, validation or save
                    tracker.preempted()
                    raise Preempted(state.step)
                if state.stopped_early_at:
                    print(f"early stopping: {state.stale_validations} validations without improving "  # [plain PyTorch]
                          f"{cfg.checkpoint.best_metric} by more than {cfg.train.early_stopping_min_delta}")
                    break

        # test the best checkpoint, verified against the checksum recorded when it was written
        load_weights(model, run.best, state.best_sha256)
        test, test_rows = evaluate(model, loaders.test, device, precision)  # [plain PyTorch]
        metrics = final_metrics(cfg, test, state, facts, meter.throughput(), time.time() - started)
        texts = review_starts(splits.reviews, test_rows["index"])
        run.write_predictions("test", test_rows, texts, cfg.data.max_length)
        run.write_json("metrics.json", metrics)
        tracker.finish(metrics, test_rows, texts, step=state.step)
    print(f"test accuracy {test['accuracy']:.4f} f1 {test['f1']:.4f} loss {test['loss']:.4f} on "  # [plain PyTorch]
          f"{test['n']} reviews (best at epoch {state.best_epoch}); results in {run.path}")
    return metrics


def main(argv=None) -> dict:
    args, cfg = parse_and_load(argv, __doc__, DEFAULT_CONFIG)
    if step_layout(cfg.train).grad_accum_steps != 1:
        raise UserError("exp_1 takes one optimizer step per batch; run exp_2/main.py for gradient accumulation")
    return run_experiment(cfg, args.resume, args.overwrite)


def cli() -> None:
    """The console command (pyproject.toml)."""
    run_cli(main)


if __name__ == "__main__":
    cli()

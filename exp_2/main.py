"""Experiment 2, plain PyTorch: exact gradient accumulation by hand. The workflow of experiment 1; only the optimizer
step differs: it comes after every `grad_accum_steps` micro-batches instead of after every batch.

    python exp_2/main.py --config configs/exp2_eb256.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import math
import time

from omegaconf import DictConfig

from exp_1.cli import Preemption, parse_and_load, run_cli
from exp_1.config import CONFIG_DIR, scaled_lr, window_layout

DEFAULT_CONFIG = CONFIG_DIR / "exp2_eb64.yaml"


def run_experiment(cfg: DictConfig, resume: bool = False, overwrite: bool = False) -> dict:
    # Imported here, not at the top: --help, --print-config and config errors answer before torch loads (~3 s).
    from exp_1.data import make_loaders, prepare_data, review_starts
    from exp_1.model import Weights, compile_model, load_model, load_weights, save_pretrained_parts
    from exp_1.rundir import ResumePoints, RunDir, write_predictions
    from exp_1.tracking import Tracker, describe, final_metrics, run_facts
    from exp_1.train import Meter, MicroBatches, Stepper, TrainingState, build_optimizer, build_scheduler, diverged, evaluate
    from exp_1.utils import pick_device, pick_precision, seed_everything, use_packing

    started = time.time()
    micro_batch, accum_steps = window_layout(cfg.train)
    run = RunDir.of(cfg)
    run.check(cfg, resume, overwrite)  # read only: what could not be started, replaced or continued stops here
    seed_everything(cfg.seed)

    # device
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.precision, device)
    packed = use_packing(cfg.train.packing, cfg.model, device, precision)

    # model and data, checked before the run directory is touched; the sampler cuts every optimizer-step window
    # into exactly `accum_steps` micro-batches (one whole window with train.micro_batch_tokens, which the stepper
    # cuts by tokens)
    tokenizer, model = load_model(cfg.model, cfg.data, packed)
    model.to(device)
    if cfg.train.compile:
        compile_model(model, packed)
    splits = prepare_data(cfg, tokenizer, model.input_names)
    loaders = make_loaders(splits, tokenizer, cfg, (micro_batch, accum_steps), device=device, packed=packed)

    # optimizer and schedule, sized in optimizer steps
    lr = scaled_lr(cfg.train, loaders.sampler.effective_batch)
    optimizer = build_optimizer(model, cfg.train, lr, device)
    steps_per_epoch = len(loaders.sampler) // accum_steps
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch * cfg.train.epochs)
    stepper = Stepper(model, optimizer, scheduler, device, precision, cfg.train.max_grad_norm,
                      MicroBatches(cfg.train.micro_batch_tokens))

    # the run directory: this process becomes its only writer; a new run, or the newest verified resume point
    run.create(cfg, resume, overwrite)
    points = ResumePoints(run, layout={"script": "exp_2/main.py", "processes": 1, "accum_steps": accum_steps})
    if resume:
        state = TrainingState(**points.load(model, optimizer, scheduler, stepper.scaler))
    else:
        state = TrainingState()
        save_pretrained_parts(model, tokenizer, run.model_dir)
        run.write_json("split.json", splits.record, indent=None)  # ~50k indices: one line

    # tracking: history.jsonl and WandB
    facts = run_facts("exp_2/main.py", accum_steps, loaders.sampler.effective_batch, 1, lr, device.type, precision,
                      splits.record, packed)
    tracker = Tracker(run, cfg, facts)
    meter = Meter(state, loaders.sampler)
    print(describe(cfg, facts, steps_per_epoch))

    for epoch in range(state.epoch, cfg.train.epochs + 1):
        loaders.sampler.set_epoch(epoch)
        model.train()  # from_pretrained returns the encoder in eval mode: without this its dropout would be off
        window_loss = 0.0
        for batch in meter.epoch(loaders.train, epoch):
            # each micro-batch adds sum(loss x 1 / samples in its window) to the gradients, so after the window's
            # last one the gradient is the window's mean, exactly as for one big batch (also the smaller last window)
            window_loss += stepper.forward_backward(batch)
            if state.batches_done % accum_steps:
                continue
            step_lr = scheduler.get_last_lr()[0]  # what this step uses; the scheduler then moves on
            grad_norm = stepper.optimizer_step()
            meter.step_done(window_loss, grad_norm, step_lr)  # device tensors: the host waits only to log or save
            window_loss = 0.0
            log = state.step % cfg.train.log_every == 0
            save = (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0) or Preemption.requested
            if (log or save) and not math.isfinite(loss := state.settle()):
                raise diverged(loss, state)  # before a resume point could keep the diverged weights
            if log:
                tracker.log(meter.train_record(), step=state.step)
            if save:
                points.save(Weights.of(model), optimizer, scheduler, stepper.scaler, state)
                meter.pause()
            if Preemption.requested:
                raise Preemption.stop(state.step)
        if state.unlogged:  # the epoch's last steps, when log_every does not divide them
            if not math.isfinite(loss := state.settle()):
                raise diverged(loss, state)
            tracker.log(meter.train_record(), step=state.step)

        # validate, then checkpoint: the epoch's resume point first, then last/best from the same bytes, so a kill
        # between the two is repaired from the point on --resume
        val, val_rows = evaluate(model, loaders.validation, device, precision)
        weights = Weights.of(model, epoch=epoch, **val)
        best = state.record_validation(epoch, val[cfg.checkpoint.best_metric], cfg.checkpoint.best_metric == "loss",
                                       weights.sha256)
        tracker.log({"epoch": epoch, **{f"val/{k}": v for k, v in val.items()}}, step=state.step)
        if best:
            write_predictions(run.predictions / "validation.csv", val_rows,
                              review_starts(splits.reviews, val_rows["index"]), cfg.data.max_length)
        points.save(weights, optimizer, scheduler, stepper.scaler, state)
        run.save_checkpoints(weights, best)
        meter.pause()
        print(f"epoch {epoch}: val loss {val['loss']:.4f} accuracy {val['accuracy']:.4f} f1 {val['f1']:.4f}"
              + (" (best)" if best else ""))
        if Preemption.requested:
            raise Preemption.stop(state.step)

    # test the best checkpoint, verified against the checksum recorded when it was written
    load_weights(model, run.best, state.best_sha256)
    test, test_rows = evaluate(model, loaders.test, device, precision)
    texts = review_starts(splits.reviews, test_rows["index"])
    write_predictions(run.predictions / "test.csv", test_rows, texts, cfg.data.max_length)
    metrics = final_metrics(cfg, test, state, facts, meter.throughput(), time.time() - started)
    run.write_json("metrics.json", metrics)
    tracker.finish(metrics, test_rows, texts, step=state.step)
    print(f"test accuracy {test['accuracy']:.4f} f1 {test['f1']:.4f} loss {test['loss']:.4f} on {test['n']} reviews "
          f"(best epoch {state.best_epoch}); results in {run.path}")
    return metrics


def main(argv=None) -> dict:
    args, cfg = parse_and_load(argv, __doc__, DEFAULT_CONFIG)
    return run_experiment(cfg, args.resume, args.overwrite)


def cli() -> None:
    """The console command (pyproject.toml)."""
    run_cli(main)


if __name__ == "__main__":
    cli()

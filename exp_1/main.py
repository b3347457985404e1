"""Experiment 1: fine-tune an encoder (BERT, ModernBERT, any HF encoder) for IMDB sentiment, one step per batch.

    python exp_1/main.py --config configs/modernbert.yaml [dotted.key=value ...]
    python exp_1/main.py --config configs/quickstart.yaml data.path=../shared/data/imdb   # offline, on a laptop

The workflow: device -> data -> optimizer/scheduler -> tracking -> per epoch train, validate, checkpoint -> test best.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from exp_1.config import CONFIG_DIR, UserError, grad_accum_steps, load_config, parse_args, scaled_lr
from exp_1.data import make_loaders, prepare_data
from exp_1.model import load_model, load_weights, save_pretrained_parts
from exp_1.train import (Checkpoints, Progress, Stepper, build_optimizer, build_scheduler, describe, evaluate,
                         final_metrics, load_resume_point, load_training_state, restore_trainer_state,
                         save_resume_point, save_training_state, trainer_state)
from exp_1.utils import RunDir, RunLogger, pick_device, pick_precision, run_cli, seed_everything

DEFAULT_CONFIG = CONFIG_DIR / "quickstart.yaml"


def train_one_epoch(stepper: Stepper, batches, progress: Progress) -> None:
    """One optimizer step per batch (each batch is its own window, so its loss is the batch mean)."""
    for batch in batches:
        loss = stepper.forward_backward(batch)
        stepper.optimizer_step()
        progress.step_done(loss)


def run_experiment(cfg: DictConfig, resume: bool = False, overwrite: bool = False, train_one_epoch=train_one_epoch,
                   accum_steps: int = 1, script: str = "exp_1/main.py") -> dict:
    started = time.time()
    run = RunDir.check(cfg, overwrite, resume)
    seed_everything(cfg.seed)

    # device
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.precision, device)

    # model and data, checked before the run directory is touched
    tokenizer, model = load_model(cfg.model, cfg.data.max_length)
    model.to(device)
    if cfg.train.compile:
        model.compile()  # in place, so checkpoints keep the plain model's keys
    splits = prepare_data(cfg, tokenizer, model.input_names)
    if not resume:
        run.create(cfg)
        save_pretrained_parts(model, tokenizer, run.model_dir)
        run.write_json("split.json", splits.record, indent=None)  # ~50k indices: one line
    loaders = make_loaders(splits, tokenizer, cfg, accum_steps, device=device)

    # optimizer and schedule, sized in optimizer steps
    lr = scaled_lr(cfg.train, loaders.sampler.effective_batch)
    optimizer = build_optimizer(model, cfg.train, lr, device)
    scheduler = build_scheduler(optimizer, cfg.train, len(loaders.sampler) // accum_steps * cfg.train.epochs)
    stepper = Stepper(model, optimizer, scheduler, device, precision, cfg.train.max_grad_norm)
    print(describe(cfg, device, precision, splits, loaders, accum_steps, 1, lr))

    # tracking and checkpoints
    logger = RunLogger(run, cfg)
    logger.start()
    checkpoints = Checkpoints(run, cfg.checkpoint.best_metric)

    layout = {"script": "plain", "processes": 1, "accum_steps": accum_steps}

    def save_point(epoch_done: bool = False):
        save_resume_point(run, lambda folder: save_training_state(folder, model, optimizer),
                          trainer_state(progress, checkpoints, scheduler, layout, stepper.scaler, epoch_done))

    progress = Progress(logger.log, scheduler, cfg.train.log_every, every_steps=cfg.checkpoint.every_steps,
                        on_checkpoint=save_point)
    start_epoch, skip = 1, 0
    if resume:
        trainer = load_resume_point(run, lambda folder: load_training_state(folder, model, optimizer), layout)
        start_epoch, skip = restore_trainer_state(trainer, progress, checkpoints, scheduler, stepper.scaler)

    for epoch in range(start_epoch, cfg.train.epochs + 1):
        loaders.sampler.set_epoch(epoch)
        model.train()  # from_pretrained returns the encoder in eval mode: without this its dropout would be off
        train_one_epoch(stepper, progress(loaders.train, epoch, skip), progress)
        skip = 0
        val = evaluate(model, loaders.validation, device, precision)
        best = checkpoints.save(model, epoch, val)
        logger.log({"epoch": epoch, **{f"val/{k}": v for k, v in val.items()}}, step=progress.step)
        save_point(epoch_done=True)
        print(f"epoch {epoch}: val loss {val['loss']:.4f} accuracy {val['accuracy']:.4f} f1 {val['f1']:.4f}"
              + (" (best)" if best else ""))

    # test the best checkpoint
    load_weights(model, checkpoints.best_path)
    test = evaluate(model, loaders.test, device, precision)
    metrics = final_metrics(cfg, test, checkpoints, progress, effective_batch_size=loaders.sampler.effective_batch,
                            num_processes=1, lr=lr, script=script, device=device.type, precision=precision,
                            wall_seconds=round(time.time() - started, 2))
    run.write_json("metrics.json", metrics)
    logger.log({f"test/{k}": v for k, v in test.items()}, step=progress.step)
    logger.summary(metrics)
    logger.finish()
    print(f"test accuracy {test['accuracy']:.4f} f1 {test['f1']:.4f} loss {test['loss']:.4f} on {test['n']} reviews "
          f"(best epoch {checkpoints.best_epoch}); results in {run.path}")
    return metrics


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], DEFAULT_CONFIG)
    cfg = load_config(args.config, args.overrides)
    if grad_accum_steps(cfg.train) != 1:
        raise UserError("exp_1 takes one optimizer step per batch; run exp_2/main.py for gradient accumulation")
    return run_experiment(cfg, args.resume, args.overwrite)


if __name__ == "__main__":
    run_cli(main)

"""Experiment 2 through HuggingFace Accelerate: exact gradient accumulation on 1 process or many.

    accelerate launch exp_2/main_accelerate.py                      # default config: ModernBERT, effective batch 64
    accelerate launch --multi_gpu --num_processes 8 exp_2/main_accelerate.py --config configs/exp2_eb1024.yaml
    accelerate launch --multi_gpu --num_processes 2 exp_2/main_accelerate.py train.device=cpu ...   # 2 CPU processes

Same data, model, windows and exact loss normalisation as exp_2/main.py; Accelerate adds processes, mixed precision,
skipping the gradient all-reduce on non-final micro-batches (`accumulate`), `gather_for_metrics` and `save_state`.
"""

from __future__ import annotations

import time
import torch
from accelerate import Accelerator, PartialState
from omegaconf import DictConfig

from exp_1.config import CONFIG_DIR, grad_accum_steps, load_config, parse_args, scaled_lr
from exp_1.data import make_loaders, prepare_data
from exp_1.model import load_model, load_weights, model_inputs, save_pretrained_parts, weighted_loss
from exp_1.train import (Checkpoints, Progress, build_optimizer, build_scheduler, describe, evaluate, final_metrics,
                         load_resume_point, restore_trainer_state, save_resume_point, trainer_state)
from exp_1.utils import RunDir, RunLogger, pick_device, pick_precision, run_cli, seed_everything, to_device

DEFAULT_CONFIG = CONFIG_DIR / "exp2_eb64.yaml"
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def backward_micro_batch(accelerator: Accelerator, model, batch: dict) -> torch.Tensor:
    """Adds this micro-batch's share of its window's mean loss (over all processes) to the gradients.

    The sampler's weights (1 / samples in the global window) already make the shares add up to the window mean.
    Accelerate divides every loss by gradient_accumulation_steps and DDP averages over processes; multiplying by
    both undoes that, so the smaller last window of an epoch is not under-scaled."""
    batch = to_device(batch, accelerator.device)
    loss = weighted_loss(model(**model_inputs(batch)), batch)
    accelerator.backward(loss * accelerator.gradient_accumulation_steps * accelerator.num_processes)
    return loss.detach()


def train_one_epoch(accelerator: Accelerator, model, optimizer, scheduler, batches, progress: Progress,
                    max_grad_norm: float | None) -> None:
    window_loss = 0.0
    for batch in batches:
        # every window has exactly gradient_accumulation_steps micro-batches per process, so Accelerate's count
        # of micro-batches marks the window's last one (sync_gradients) and skips the all-reduce before it
        with accelerator.accumulate(model):
            window_loss += backward_micro_batch(accelerator, model, batch)
            if accelerator.sync_gradients:
                if max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule advance
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step_done(window_loss)
                window_loss = 0.0


def run_experiment(cfg: DictConfig, resume: bool = False, overwrite: bool = False) -> dict | None:
    started = time.time()

    # device: a CPU choice must reach Accelerate, or CPU processes would each train alone
    cpu = pick_device(cfg.train.device).type == "cpu"
    state = PartialState(cpu=cpu)
    precision = pick_precision(cfg.train.precision, state.device)
    accum_steps = grad_accum_steps(cfg.train, state.num_processes)
    run = RunDir.check(cfg, overwrite, resume)
    logger = RunLogger(run, cfg)  # history.jsonl and WandB, driven by accelerator.log on the main process only
    accelerator = Accelerator(cpu=cpu, mixed_precision=MIXED_PRECISION[precision],
                              gradient_accumulation_steps=accum_steps, log_with=[logger])
    is_main = accelerator.is_main_process
    seed_everything(cfg.seed)

    # model and data, checked before the run directory is touched
    tokenizer, model = load_model(cfg.model, cfg.data.max_length)
    if cfg.train.compile:
        model.compile()  # in place, so checkpoints keep the plain model's keys
    with accelerator.main_process_first():  # the first process tokenises and caches, the others read the cache
        splits = prepare_data(cfg, tokenizer, model.input_names)
    if is_main and not resume:
        run.create(cfg)
        save_pretrained_parts(model, tokenizer, run.model_dir)
        run.write_json("split.json", splits.record, indent=None)
    accelerator.wait_for_everyone()
    # The train loader is not prepared: Accelerate's sharding would top up uneven last batches with repeated
    # samples. The sampler deals each window's micro-batches to the processes itself.
    loaders = make_loaders(splits, tokenizer, cfg, accum_steps, accelerator.num_processes, accelerator.process_index,
                           accelerator.device)

    # optimizer and schedule, sized in optimizer steps (the scheduler is stepped by hand, once per real step)
    lr = scaled_lr(cfg.train, loaders.sampler.effective_batch)
    optimizer = build_optimizer(model, cfg.train, lr, accelerator.device)
    scheduler = build_scheduler(optimizer, cfg.train, len(loaders.sampler) // accum_steps * cfg.train.epochs)
    model, optimizer, val_loader, test_loader = accelerator.prepare(model, optimizer, loaders.validation, loaders.test)
    accelerator.print(describe(cfg, f"{accelerator.device} {accelerator.distributed_type}", precision, splits, loaders,
                               accum_steps, accelerator.num_processes, lr))

    # tracking and checkpoints (files on the main process only)
    accelerator.init_trackers(cfg.tracking.wandb_project)  # the logger sends the run's config when WandB starts
    checkpoints = Checkpoints(run, cfg.checkpoint.best_metric, write=is_main)

    layout = {"script": "accelerate", "processes": accelerator.num_processes, "accum_steps": accum_steps}

    def save_point(epoch_done: bool = False):  # save_state: model, optimizer, scaler and every process's RNG
        save_resume_point(run, accelerator.save_state,
                          trainer_state(progress, checkpoints, scheduler, layout, None, epoch_done), is_main,
                          accelerator.wait_for_everyone)

    progress = Progress(accelerator.log, scheduler, cfg.train.log_every, show=accelerator.is_local_main_process,
                        reduce=lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu(),
                        every_steps=cfg.checkpoint.every_steps, on_checkpoint=save_point)
    start_epoch, skip = 1, 0
    if resume:
        trainer = load_resume_point(run, accelerator.load_state, layout, is_main)
        start_epoch, skip = restore_trainer_state(trainer, progress, checkpoints, scheduler)

    for epoch in range(start_epoch, cfg.train.epochs + 1):
        loaders.sampler.set_epoch(epoch)
        model.train()  # from_pretrained returns the encoder in eval mode: without this its dropout would be off
        train_one_epoch(accelerator, model, optimizer, scheduler, progress(loaders.train, epoch, skip), progress,
                        cfg.train.max_grad_norm)
        skip = 0
        val = evaluate(model, val_loader, accelerator.device, gather=accelerator.gather_for_metrics)
        best = checkpoints.save(accelerator.unwrap_model(model), epoch, val)
        accelerator.log({"epoch": epoch, **{f"val/{k}": v for k, v in val.items()}}, step=progress.step)
        save_point(epoch_done=True)
        accelerator.print(f"epoch {epoch}: val loss {val['loss']:.4f} accuracy {val['accuracy']:.4f} "
                          f"f1 {val['f1']:.4f}" + (" (best)" if best else ""))

    # test the best checkpoint
    accelerator.wait_for_everyone()
    load_weights(accelerator.unwrap_model(model), checkpoints.best_path)
    test = evaluate(model, test_loader, accelerator.device, gather=accelerator.gather_for_metrics)
    metrics = final_metrics(cfg, test, checkpoints, progress, effective_batch_size=loaders.sampler.effective_batch,
                            num_processes=accelerator.num_processes, lr=lr, script="exp_2/main_accelerate.py",
                            device=accelerator.device.type, precision=precision,
                            wall_seconds=round(time.time() - started, 2))
    accelerator.log({f"test/{k}": v for k, v in test.items()}, step=progress.step)
    if is_main:
        run.write_json("metrics.json", metrics)
        logger.summary(metrics)
    accelerator.wait_for_everyone()  # no process tears the process group down while another still writes or logs
    accelerator.end_training()
    accelerator.print(f"test accuracy {test['accuracy']:.4f} f1 {test['f1']:.4f} loss {test['loss']:.4f} on "
                      f"{test['n']} reviews (best epoch {checkpoints.best_epoch}); results in {run.path}")
    return metrics


def main(argv=None) -> dict | None:
    args = parse_args(argv, __doc__.splitlines()[0], DEFAULT_CONFIG)
    return run_experiment(load_config(args.config, args.overrides), args.resume, args.overwrite)


if __name__ == "__main__":
    run_cli(main)

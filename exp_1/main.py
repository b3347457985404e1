"""Experiment 1: fine-tune an encoder (BERT, ModernBERT, any HF encoder) for IMDB sentiment, one optimizer step per
batch.

    python exp_1/main.py --config configs/modernbert.yaml [dotted.key=value ...]
    python exp_1/main.py --config configs/quickstart.yaml data.path=/path/to/imdb   # offline, on a laptop
    python exp_1/main.py --help                                                    # every config key

The workflow: device -> model and data -> optimizer and schedule -> run directory -> per step train, then what is
due (log, validate, save a resume point and the checkpoints, stop) -> test the best checkpoint. Lines of the loop
that differ from exp_2's end with a tag saying why: [one step per batch], [plain PyTorch]. tests/test_loops.py keeps
the rest of the three loops identical.
"""

import time

from omegaconf import DictConfig

from imdb_grad_accum.cli import Preemption, parse_and_load, run_cli
from imdb_grad_accum.config import CONFIG_DIR, scaled_lr, step_layout
from imdb_grad_accum.errors import UserError

TRAINER = ("exp_1", "pytorch")  # what the run records as having trained it
DEFAULT_CONFIG = CONFIG_DIR / "quickstart.yaml"


def check(cfg: DictConfig) -> None:
    """What this script refuses before it loads anything (and --print-config with it)."""
    if step_layout(cfg.train).grad_accum_steps != 1:
        raise UserError("exp_1 takes one optimizer step per batch; run exp_2/main.py for gradient accumulation")


def train(cfg: DictConfig, mode: str = "start") -> dict:
    # Imported here, not at the top: --help, --print-config and config errors answer before torch loads (~3 s).
    from imdb_grad_accum.batching import make_loaders
    from imdb_grad_accum.data import prepare_data
    from imdb_grad_accum.device import pick_device, pick_precision
    from imdb_grad_accum.errors import Preempted
    from imdb_grad_accum.loop import Progress, Records, TrainingState, agreed_stop, what_is_due
    from imdb_grad_accum.model import Weights, load_model, load_weights, prepare_for_training, save_model_parts
    from imdb_grad_accum.packing import use_packing
    from imdb_grad_accum.resume import ResumePoints
    from imdb_grad_accum.tracking import Tracker, describe, run_facts
    from imdb_grad_accum.training import Stepper, build_optimizer, build_scheduler, seed_everything
    from imdb_grad_accum.writer import RunWriter

    started = time.time()
    layout = step_layout(cfg.train)
    run = RunWriter.of(cfg)
    run.check(cfg, mode)  # read only: what could not be started, replaced or continued stops here
    seed_everything(cfg.seed)
    progress = Progress(cfg.train.progress)
    is_main, reduce = True, None  # one process [plain PyTorch]

    # device
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.precision, device)
    packed = use_packing(cfg, device, precision)

    # model and data, checked before the run directory is touched
    tokenizer, model = load_model(cfg, packed)
    prepare_for_training(model.to(device), cfg.train, packed)
    splits = prepare_data(cfg, tokenizer, model.input_names)
    loaders = make_loaders(splits, tokenizer, cfg, layout, device=device, packed=packed)

    # optimizer and schedule, counted in optimizer steps
    lr = scaled_lr(cfg.train, layout.effective_batch)
    optimizer = build_optimizer(model, cfg.train, lr, device)
    scheduler = build_scheduler(optimizer, cfg.train, loaders.sampler.steps_per_epoch * cfg.train.epochs)
    stepper = Stepper(model, optimizer, scheduler, device, precision, cfg.train)  # [plain PyTorch]

    # the run directory: this process is its only writer until the run ends
    with run.writing(cfg, mode, splits.record) as doing:
        if doing == "finished":  # --continue of a run another process finished meanwhile
            return run.metrics()
        points = ResumePoints(run, TRAINER, layout, model, optimizer, scheduler, stepper.scaler)  # [plain PyTorch]
        if doing == "resume":
            state = points.load()
        else:
            state = TrainingState()
            run.write_model_parts(lambda folder: save_model_parts(model, tokenizer, folder))
            run.write_json("split.json", splits.record, indent=None)  # ~50k indices: one line
        facts = run_facts(TRAINER, layout, lr, device, precision, splits.record, packed, cfg.train)
        tracker = Tracker(run, cfg, facts)
        records = Records(cfg, run, tracker, progress, splits, loaders, device, precision)  # [plain PyTorch]
        progress.say(describe(cfg, facts, loaders.sampler.steps_per_epoch, splits.record))

        for epoch in range(state.epoch, cfg.train.epochs + 1):
            if state.stopped_early_at:  # a resumed run that had stopped early goes straight to its test
                break
            state.start_epoch(epoch)
            steps = loaders.sampler.window_totals()  # (reviews, tokens) of each of the epoch's optimizer steps
            batches = progress.epoch(loaders.epoch(epoch, state.batches_done), epoch, state.batches_done,
                                     len(loaders.train), state.batches_done // layout.loader_batches)
            model.train()  # from_pretrained returns the encoder in eval mode: without this its dropout would be off
            for batch in batches:
                window_loss = stepper.forward_backward(batch)  # one optimizer step per batch [one step per batch]
                state.batches_done += 1
                step_lr = scheduler.get_last_lr()[0]  # what this step uses; the scheduler then moves on
                grad_norm = stepper.optimizer_step()  # [plain PyTorch]
                step_in_epoch = state.batches_done // layout.loader_batches
                state.step_done(window_loss, grad_norm, step_lr, *steps[step_in_epoch - 1])

                # what is due after this step; the host reads the device back only then
                end_of_epoch = state.batches_done == len(loaders.train)
                due = what_is_due(cfg, state.step, end_of_epoch)
                if not any(due):
                    continue
                state.read_back(reduce)  # a diverged loss stops the run here, before anything keeps its weights
                stop = agreed_stop(Preemption.requested, device, reduce)
                if due.log:
                    records.log_training(state, step_in_epoch)
                if due.validate:  # every validation may become the best checkpoint, and may stop training early
                    weights, best = records.validate(model, state, last=end_of_epoch and epoch == cfg.train.epochs)
                if due.save or stop:  # the resume point first; last/best are then links to its weights
                    saved = points.save(weights if due.validate else Weights.of(model), state, due.validate)
                if due.validate and is_main:
                    run.save_checkpoints(saved, weights.sha256, best)
                state.resume_clock()
                if stop:  # SIGTERM, acted on at this step's log, validation or save
                    tracker.preempted()
                    raise Preempted(state.step)
                if state.stopped_early_at:
                    break

        # test the best checkpoint, verified against the checksum recorded when it was written
        load_weights(model, run.best, state.best_sha256)
        metrics = records.test(model, state, facts, time.time() - started)
        if is_main and not cfg.checkpoint.keep_resume_points:  # a finished run is never resumed: they only take space
            points.remove_all()
    return metrics


def main(argv=None) -> dict:
    args, cfg = parse_and_load(argv, __doc__, DEFAULT_CONFIG, check)
    return train(cfg, args.mode)


if __name__ == "__main__":
    run_cli(main)

"""Experiment 2 through HuggingFace Accelerate: exact gradient accumulation on 1 process or many.

    accelerate launch exp_2/main_accelerate.py                      # default config: ModernBERT, effective batch 64
    accelerate launch --multi_gpu --num_processes 8 exp_2/main_accelerate.py --config configs/exp2_eb1024.yaml
    accelerate launch --multi_gpu --num_processes 2 exp_2/main_accelerate.py train.device=cpu ...   # 2 CPU processes

Same data, model, steps and exact loss normalisation as exp_2/main.py; Accelerate adds processes, mixed precision,
skipping the gradient all-reduce on all but a step's last micro-batch (`accumulate`) and `gather_for_metrics`. With
train.precision: auto, the mixed precision chosen by `accelerate launch --mixed_precision` or `accelerate config` is
used. Lines of the loop that differ from exp_2/main.py end with a tag saying why: [accelerate], [accumulation].
tests/test_loops.py keeps the rest of the three loops identical.
"""

import contextlib
import math
import os
import time
from datetime import timedelta

from omegaconf import DictConfig

from imdb_grad_accum.cli import Preemption, die_with_parent, parse_and_load, run_cli
from imdb_grad_accum.config import CONFIG_DIR, scaled_lr, step_layout
from imdb_grad_accum.errors import LostPeer, RunStopped

TRAINER = ("exp_2", "accelerate")  # what the run records as having trained it
DEFAULT_CONFIG = CONFIG_DIR / "exp2_eb64.yaml"


def check(cfg: DictConfig) -> None:
    """What this script refuses before it loads anything (and --print-config with it, for one process)."""
    step_layout(cfg.train)


def backward_micro_batch(accelerator, model, batch: dict, micro_batches, optimizer, train: DictConfig):
    """Adds this loader batch's share of its step's mean loss (over all processes) to the gradients.

    The sampler's weights (1 / reviews in the global step) already make the shares add up to the step's mean.
    Accelerate divides every loss by gradient_accumulation_steps and DDP averages over processes; multiplying by
    both undoes that, so the smaller last step of an epoch is not under-scaled. With train.micro_batch_tokens the
    batch is the process's whole share of the step, run in forward passes of that many tokens: all but the last skip
    the all-reduce, so each process syncs once per step however many passes it needs."""
    import torch

    from imdb_grad_accum.model import model_inputs
    from imdb_grad_accum.training import run_in_passes, to_device, weighted_loss

    def one_pass(part: dict, last: bool):
        if train.cuda_graphs:  # a new graph replay (only then: it imports Inductor, about a second)
            torch.compiler.cudagraph_mark_step_begin()
        part = to_device(part, accelerator.device)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = weighted_loss(model(**model_inputs(part)), part, train.label_smoothing)
            accelerator.backward(loss * accelerator.gradient_accumulation_steps * accelerator.num_processes)
        return loss.detach()

    def start_over():
        if accelerator.num_processes > 1:  # the others may be waiting in this step's all-reduce already
            raise RunStopped("out of GPU memory under several processes: set train.micro_batch_tokens lower and "
                             "--resume from the last resume point")
        optimizer.zero_grad(set_to_none=True)

    return run_in_passes(batch, micro_batches, one_pass, start_over)


def train(cfg: DictConfig, mode: str = "start") -> dict:
    # Imported here, not at the top: --help, --print-config and config errors answer before torch loads (~3 s).
    from accelerate import Accelerator, PartialState
    from accelerate.utils import broadcast_object_list

    from imdb_grad_accum.batching import make_loaders
    from imdb_grad_accum.data import prepare_data
    from imdb_grad_accum.device import pick_device, pick_precision
    from imdb_grad_accum.errors import Preempted
    from imdb_grad_accum.loop import Progress, Records, TrainingState, agreed_stop, what_is_due
    from imdb_grad_accum.model import Weights, load_model, load_weights, prepare_for_training, save_model_parts
    from imdb_grad_accum.packing import use_packing
    from imdb_grad_accum.resume import ResumePoints
    from imdb_grad_accum.tracking import Tracker, describe, run_facts
    from imdb_grad_accum.training import MicroBatches, build_optimizer, build_scheduler, seed_everything
    from imdb_grad_accum.writer import RunWriter

    started = time.time()

    # device: a CPU choice must reach Accelerate, or CPU processes would each train alone; a process that stops
    # answering ends the run after train.peer_timeout seconds, not gloo's or NCCL's default half hour
    cpu = pick_device(cfg.train.device).type == "cpu"
    processes = PartialState(cpu=cpu, timeout=timedelta(seconds=cfg.train.peer_timeout))
    device = processes.device
    precision = pick_precision(cfg.train.precision, device)
    packed = use_packing(cfg, device, precision)
    layout = step_layout(cfg.train, processes.num_processes)
    run = RunWriter.of(cfg)
    run.check(cfg, mode)  # read only, on every process: what could not be started, replaced or continued stops here
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if precision == "fp32" else precision,
                              gradient_accumulation_steps=layout.loader_batches)
    seed_everything(cfg.seed)
    progress = Progress(cfg.train.progress, show=accelerator.is_local_main_process)
    is_main, reduce, gather = accelerator.is_main_process, accelerator.reduce, accelerator.gather_for_metrics

    # model and data, checked before the run directory is touched
    tokenizer, model = load_model(cfg, packed)
    prepare_for_training(model, cfg.train, packed)
    with accelerator.main_process_first():  # the first process tokenises and caches, the others read the cache
        splits = prepare_data(cfg, tokenizer, model.input_names)
    # The train loader is not prepared: Accelerate's sharding would top up uneven last batches with repeated
    # samples. The sampler deals each step's loader batches to the processes itself.
    loaders = make_loaders(splits, tokenizer, cfg, layout, accelerator.process_index, device, packed)

    # optimizer and schedule, counted in optimizer steps (the scheduler is stepped by hand, once per real step)
    lr = scaled_lr(cfg.train, layout.effective_batch)
    optimizer = build_optimizer(model, cfg.train, lr, device)
    scheduler = build_scheduler(optimizer, cfg.train, loaders.sampler.steps_per_epoch * cfg.train.epochs)
    micro_batches = MicroBatches(cfg.train.micro_batch_tokens)  # forward passes cut by tokens, when set
    # `wrapped` trains (DDP under several processes); `model` is the same module unwrapped, for weights and eval
    wrapped, optimizer, loaders.validation, loaders.test = accelerator.prepare(model, optimizer, loaders.validation,
                                                                               loaders.test)

    # the run directory: the first process is its only writer until the run ends, and decides under its lock
    with run.writing(cfg, mode, splits.record) if is_main else contextlib.nullcontext(None) as doing:
        doing = broadcast_object_list([doing])[0]
        if doing == "finished":  # --continue of a run another process finished meanwhile
            return run.metrics()
        points = ResumePoints(run, TRAINER, layout, model, optimizer, scheduler, accelerator.scaler,
                              accelerator.process_index, accelerator.wait_for_everyone)
        if doing == "resume":
            state = points.load()
        else:
            state = TrainingState()
            if is_main:
                run.write_model_parts(lambda folder: save_model_parts(model, tokenizer, folder))
                run.write_json("split.json", splits.record, indent=None)  # ~50k indices: one line
        accelerator.wait_for_everyone()
        facts = run_facts(TRAINER, layout, lr, device, precision, splits.record, packed, cfg.train)
        tracker = Tracker(run, cfg, facts, active=is_main)
        records = Records(cfg, run, tracker, progress, splits, loaders, device, precision, gather, is_main)
        progress.say(describe(cfg, facts, loaders.sampler.steps_per_epoch, splits.record)
                     + f" ({accelerator.distributed_type})")

        for epoch in range(state.epoch, cfg.train.epochs + 1):
            if state.stopped_early_at:  # a resumed run that had stopped early goes straight to its test
                break
            state.start_epoch(epoch)
            steps = loaders.sampler.window_totals()  # (reviews, tokens) of each of the epoch's optimizer steps
            batches = progress.epoch(loaders.epoch(epoch, state.batches_done), epoch, state.batches_done,
                                     len(loaders.train), state.batches_done // layout.loader_batches)
            model.train()  # from_pretrained returns the encoder in eval mode: without this its dropout would be off
            window_loss = 0.0  # [accumulation]
            for batch in batches:
                # each micro-batch adds sum(loss x 1 / reviews in its step) to the gradients, so after the step's last
                # one the gradient is the step's mean, as for one big batch (also the smaller last step of an epoch)
                # Accelerate's count of loader batches marks the step's last (sync_gradients) and skips the all-reduce
                # before it: every step has exactly gradient_accumulation_steps of them on each process
                with accelerator.accumulate(wrapped):  # [accelerate]
                    window_loss += backward_micro_batch(accelerator, wrapped, batch, micro_batches,  # [accelerate]
                                                        optimizer, cfg.train)  # [accelerate]
                    state.batches_done += 1
                    if not accelerator.sync_gradients:  # [accelerate]
                        continue  # [accumulation]
                    step_lr = scheduler.get_last_lr()[0]  # what this step uses; the scheduler then moves on
                    grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(),  # [accelerate]
                                                            cfg.train.max_grad_norm or math.inf)  # [accelerate]
                    optimizer.step()  # [accelerate]
                    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step [accelerate]
                        scheduler.step()  # [accelerate]
                    optimizer.zero_grad(set_to_none=True)  # [accelerate]
                step_in_epoch = state.batches_done // layout.loader_batches
                state.step_done(window_loss, grad_norm, step_lr, *steps[step_in_epoch - 1])
                window_loss = 0.0  # [accumulation]

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
        accelerator.wait_for_everyone()  # the first process has written it [accelerate]
        load_weights(model, run.best, state.best_sha256)
        metrics = records.test(model, state, facts, time.time() - started)
        if is_main and not cfg.checkpoint.keep_resume_points:  # a finished run is never resumed: they only take space
            points.remove_all()
        accelerator.wait_for_everyone()  # no process ends the process group while another still writes [accelerate]
        leave_together(accelerator)  # [accelerate]
        # DDP's reducer goes first, while the process group is still registered: its last reference would tear gloo
        # down with the GIL held, a deadlock if a gloo thread is still releasing a tensor (torch 2.13)
        del wrapped  # [accelerate]
        accelerator.free_memory()  # [accelerate]
        accelerator.end_training()  # [accelerate]
    return metrics


def leave_together(accelerator) -> None:
    """After the last collective, the first process (which hosts the rendezvous store) waits until every other
    process has returned from it before it tears down: gloo may still be delivering its last message when a barrier
    returns on one side, and a process that exits then leaves another waiting for it until train.peer_timeout."""
    import torch.distributed as dist

    if accelerator.num_processes == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    if accelerator.is_main_process:
        store.wait([f"left/{rank}" for rank in range(1, accelerator.num_processes)])  # bounded by train.peer_timeout
    else:
        store.set(f"left/{accelerator.process_index}", "1")


def main(argv=None) -> dict:
    if "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ:
        die_with_parent()  # started by `accelerate launch` or torchrun: end with it, never train on as an orphan
    args, cfg = parse_and_load(argv, __doc__, DEFAULT_CONFIG, check)
    try:
        return train(cfg, args.mode)
    except RuntimeError as err:
        import torch.distributed as dist

        # under several processes, a failed collective is how a process learns that another died or hung
        if not (isinstance(err, dist.DistError) or (dist.is_initialized() and dist.get_world_size() > 1)):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise LostPeer(f"a process of this run failed or stopped answering ({first}); what was saved is kept: continue "
                       f"with --resume (train.peer_timeout={cfg.train.peer_timeout} s sets how long processes wait for "
                       "each other)") from None


if __name__ == "__main__":
    run_cli(main)

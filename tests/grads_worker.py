"""One of two gloo processes of test_accumulation's cross-process case, started by the fork server (conftest.py):
each accumulates its share of two optimizer steps (the first, and the smaller last) of effective batch 24 in
micro-batches of 4, 3 per process, and the first writes the gradients it ends with, all-reduced, per step."""

from pathlib import Path

from conftest import train_config, window_sampler


def main(argv: list[str]) -> None:
    import torch
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from exp_2.main_accelerate import backward_micro_batch
    from imdb_grad_accum.batching import make_train_loader
    from imdb_grad_accum.config import load_config
    from imdb_grad_accum.data import prepare_data
    from imdb_grad_accum.model import load_model
    from imdb_grad_accum.training import MicroBatches

    config, out = (Path(a) for a in argv)
    cfg = load_config(config)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    torch.manual_seed(0)  # the model test_accumulation's `setup` loads
    tokenizer, model = load_model(cfg)
    splits = prepare_data(cfg, tokenizer, model.input_names)
    wrapped = accelerator.prepare(model)
    sampler = window_sampler(splits.train["length"], 4, 3, seed=5, num_processes=2,
                             process_index=accelerator.process_index)
    batches = list(make_train_loader(splits.train, sampler, tokenizer, cfg))
    out.mkdir(exist_ok=True)
    for window in (0, 8):
        for batch in batches[window * 3:(window + 1) * 3]:
            with accelerator.accumulate(wrapped):
                backward_micro_batch(accelerator, wrapped, batch, MicroBatches(), None, train_config())
        if accelerator.is_main_process:
            save_file({n: p.grad.contiguous() for n, p in model.named_parameters()}, out / f"window{window}.safetensors")
        model.zero_grad(set_to_none=True)
    accelerator.wait_for_everyone()

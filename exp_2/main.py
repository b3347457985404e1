"""Experiment 2, plain PyTorch: exact gradient accumulation by hand. Same workflow as experiment 1; only the
optimizer step differs: it comes after every `grad_accum_steps` micro-batches instead of after every batch.

    python exp_2/main.py --config configs/exp2_eb256.yaml [dotted.key=value ...]
"""

from __future__ import annotations

from functools import partial

from exp_1.config import CONFIG_DIR, grad_accum_steps, load_config, parse_args
from exp_1.main import run_experiment
from exp_1.train import Progress, Stepper
from exp_1.utils import run_cli

DEFAULT_CONFIG = CONFIG_DIR / "exp2_eb64.yaml"


def train_one_epoch(stepper: Stepper, batches, progress: Progress, accum_steps: int) -> None:
    """Each micro-batch adds sum(loss) / samples-in-its-window to the gradients, so after a window the gradient is
    the window's mean, exactly as for one big batch, including the smaller last window. The sampler cuts every
    window into exactly `accum_steps` micro-batches, so a step follows every `accum_steps`-th one."""
    window_loss = 0.0
    for i, batch in enumerate(batches, 1):
        window_loss += stepper.forward_backward(batch)
        if i % accum_steps == 0:
            stepper.optimizer_step()
            progress.step_done(window_loss)
            window_loss = 0.0


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], DEFAULT_CONFIG)
    cfg = load_config(args.config, args.overrides)
    accum_steps = grad_accum_steps(cfg.train)
    return run_experiment(cfg, args.resume, args.overwrite, partial(train_one_epoch, accum_steps=accum_steps),
                          accum_steps, script="exp_2/main.py")


if __name__ == "__main__":
    run_cli(main)

"""Which precision a run trains in (the config, the launcher's choice, the hardware), and autocast for it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from exp_1.errors import UserError


def pick_precision(name: str, device: torch.device, launcher: str | None = None) -> str:
    """'fp32' | 'bf16' | 'fp16'. auto: what the launcher chose (`accelerate launch --mixed_precision`, `accelerate
    config`), else bf16 on GPUs that support it, fp16 on older GPUs, bf16 on CPUs with native bf16 matmuls (AMX or
    AVX512-BF16: several times the fp32 matmul rate, same quickstart accuracy), else fp32."""
    if name == "auto" and launcher is not None:
        name = launcher
        if name == "fp16" and device.type == "cpu":
            raise UserError("the launcher's mixed precision fp16 needs a GPU; on CPU launch with --mixed_precision "
                            "bf16 or no, or set train.precision")
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("train.precision=fp16 needs a GPU; on CPU use bf16 or fp32")
    return name


def launcher_precision() -> str | None:
    """The mixed precision `accelerate launch` or `accelerate config` chose for this process, or None. The launcher
    also sets "no" when nobody chose anything, so "no" counts only when it was asked for: on the launcher's command
    line (--mixed_precision) or in the accelerate config file it read."""
    value = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(os.environ.get("ACCELERATE_MIXED_PRECISION", ""))
    if value != "fp32":
        return value
    launcher = launcher_command()
    if any(arg.startswith(("--mixed_precision", "--mixed-precision")) for arg in launcher):
        return value
    config_file = next((launcher[i + 1] for i, arg in enumerate(launcher[:-1]) if arg in ("--config_file", "--config-file")),
                       None)
    if config_file is None:
        from accelerate.commands.config import default_config_file

        config_file = default_config_file
    with contextlib.suppress(OSError, ValueError):
        import yaml

        if "mixed_precision" in (yaml.safe_load(Path(config_file).read_text()) or {}):
            return value
    return None


def launcher_command() -> list[str]:
    """The command line of the process that started this one (Linux), e.g. `accelerate launch --mixed_precision bf16`."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def cpu_has_fast_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private in torch.cpu, hence the care
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)

"""What every entry script needs of torch: seeding, the device and its precision, moving batches."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from exp_1.config import UserError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """auto: a CUDA GPU, else Apple's MPS, else the CPU. Never the CPU silently when an NVIDIA GPU is there but this
    torch cannot use it (a CPU-only build, or one built for a newer CUDA than the driver's): that is one line with
    the fix."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        driver = nvidia_driver()
        if driver:
            raise UserError(f"train.device=auto: {unusable_gpu(driver)}, or set train.device=cpu to train on the CPU")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        driver = nvidia_driver()
        raise UserError(f"train.device=cuda: {unusable_gpu(driver)}" if driver else
                        "train.device=cuda but no NVIDIA GPU or driver is visible here; use train.device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but Apple's MPS is not available here; use train.device=auto or cpu")
    return torch.device(name)


def nvidia_driver() -> dict | None:
    """The NVIDIA driver of this machine: its version and the newest CUDA it supports (from nvidia-smi), or None
    when there is none."""
    smi = shutil.which("nvidia-smi")
    text = ""
    if smi:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
    driver, cuda = re.search(r"Driver Version:\s*([\d.]+)", text), re.search(r"CUDA Version:\s*([\d.]+)", text)
    if driver:
        return {"driver": driver.group(1), "cuda": cuda.group(1) if cuda else None}
    with contextlib.suppress(OSError):
        module = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        return {"driver": module.group(1) if module else "?", "cuda": None}
    return None


def unusable_gpu(driver: dict) -> str:
    """Why this torch cannot use the NVIDIA GPU that is there, and the install command that fixes it."""
    build = torch.version.cuda
    supports = driver["cuda"]
    what = (f"an NVIDIA GPU is here (driver {driver['driver']}" + (f", CUDA up to {supports}" if supports else "")
            + f") but torch {torch.__version__} cannot use it: ")
    if build is None:
        what += "it is a CPU-only build"
    elif supports and _version(build) > _version(supports):
        what += f"it is built for CUDA {build}, newer than the driver supports"
    else:
        what += f"CUDA {build} did not initialise (check `nvidia-smi` and that the driver supports this GPU)"
    base = torch.__version__.split("+")[0]
    index = wheel_index(supports)
    fix = (f"install the build for your driver: pip install torch=={base} --index-url "
           f"https://download.pytorch.org/whl/{index}" if index else
           "update the NVIDIA driver (CUDA 12.6 or newer), or install a torch build for your driver from pytorch.org")
    return what + "; " + fix


def wheel_index(driver_cuda: str | None) -> str | None:
    """PyTorch's wheel index for the newest CUDA a driver supports (README: Installing on a GPU machine)."""
    if driver_cuda is None:
        return "cu126"
    for index, needs in (("cu130", "13.0"), ("cu128", "12.8"), ("cu126", "12.6")):
        if _version(driver_cuda) >= _version(needs):
            return index
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


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


def device_report(cfg, launcher: str | None = None) -> str:
    """What --device-check prints: what this machine offers, and what a run of `cfg` would use and why
    (`launcher`: the mixed precision `accelerate launch` chose, for the Accelerate script)."""
    lines = [f"torch {torch.__version__}: " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                                                else "a CPU-only build"),
             f"CUDA usable: {torch.cuda.is_available()}" + (
                 f" ({torch.cuda.device_count()} GPU(s): {', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))})"
                 if torch.cuda.is_available() else "")]
    driver = nvidia_driver()
    lines.append(f"NVIDIA driver: {driver['driver']}" + (f", supports CUDA up to {driver['cuda']}" if driver["cuda"] else "")
                 if driver else "NVIDIA driver: none found (no nvidia-smi, no /proc/driver/nvidia)")
    lines.append(f"Apple MPS usable: {torch.backends.mps.is_available()}")
    lines.append(f"CPU: {torch.get_num_threads()} threads, native bf16 matmuls: {cpu_has_fast_bf16()}")
    if launcher:
        lines.append(f"launcher's mixed precision: {launcher} (used when train.precision is auto)")
    try:
        device = pick_device(cfg.train.device)
        precision = pick_precision(cfg.train.precision, device, launcher)
        lines.append(f"this run would use: {device.type}, {precision} (train.device={cfg.train.device}, "
                     f"train.precision={cfg.train.precision})")
    except UserError as err:
        lines.append(f"this run would stop: {err}")
    return "\n".join(lines)


def cpu_has_fast_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private in torch.cpu, hence the care
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`; plain numbers (a packed batch's max_seqlen) stay as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def use_packing(setting: str, model_cfg, device: torch.device, precision: str) -> bool:
    """train.packing: true packs (on a CPU through a reference attention that is exact but not faster); false pads;
    auto packs where the flash varlen kernel runs and was measured faster (README: Performance): on CUDA in bf16 or
    fp16, with model.attention_dropout set to 0 (the kernel has none) and no model.attn_implementation chosen."""
    setting = setting.lower()
    if setting == "true" and device.type == "cuda" and (model_cfg.attention_dropout or 0) > 0:
        raise UserError("train.packing=true on a GPU needs model.attention_dropout=0: the flash varlen kernel has no "
                        "attention dropout")
    if setting == "auto":
        return (device.type == "cuda" and precision in ("bf16", "fp16") and model_cfg.attention_dropout == 0
                and not model_cfg.attn_implementation)
    return setting == "true"

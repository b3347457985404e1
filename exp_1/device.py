"""Which device a run trains on, and why: never the CPU silently when an NVIDIA GPU is there but this torch cannot
use it (that is one line with the install command that fixes it); and what --device-check reports."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from pathlib import Path

import torch

from exp_1.errors import UserError
from exp_1.precision import cpu_has_fast_bf16, pick_precision


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
    """PyTorch's wheel index for the newest CUDA a driver supports (docs/install.md)."""
    if driver_cuda is None:
        return "cu126"
    for index, needs in (("cu130", "13.0"), ("cu128", "12.8"), ("cu126", "12.6")):
        if _version(driver_cuda) >= _version(needs):
            return index
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


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

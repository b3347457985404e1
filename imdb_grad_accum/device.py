"""Which device and precision a run trains in, and why; never the CPU silently when an NVIDIA GPU is unusable."""

import contextlib
import os
import re
import subprocess
from pathlib import Path

import torch

from imdb_grad_accum.errors import UserError


def pick_device(name: str) -> torch.device:
    """auto: a CUDA GPU, else Apple's MPS, else the CPU unless an NVIDIA GPU is there that this torch cannot use."""
    driver = None if name in ("cpu", "mps") or torch.cuda.is_available() else nvidia_driver()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if driver:
            raise UserError(f"train.device=auto: {unusable_gpu(driver)}, or set train.device=cpu to train on the CPU")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device=cuda: {unusable_gpu(driver)}" if driver else
                        "train.device=cuda but no NVIDIA GPU or driver is visible here; use train.device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but Apple's MPS is not available here; use train.device=auto or cpu")
    return torch.device(name)


def nvidia_driver() -> dict | None:
    """This machine's NVIDIA driver version and the newest CUDA it supports, or None."""
    text = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # OSError: no nvidia-smi here
        text = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    driver, cuda = re.search(r"Driver Version:\s*([\d.]+)", text), re.search(r"CUDA Version:\s*([\d.]+)", text)
    if driver:
        return {"driver": driver[1], "cuda": cuda[1] if cuda else None}
    with contextlib.suppress(OSError):
        module = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        return {"driver": module[1] if module else "?", "cuda": None}
    return None


def unusable_gpu(driver: dict) -> str:
    build, supports = torch.version.cuda, driver["cuda"]
    what = (f"an NVIDIA GPU is here (driver {driver['driver']}" + (f", CUDA up to {supports}" if supports else "")
            + f") but torch {torch.__version__} cannot use it: ")
    if build is None:
        what += "it is a CPU-only build"
    elif supports and _version(build) > _version(supports):
        what += f"it is built for CUDA {build}, newer than the driver supports"
    else:
        what += f"CUDA {build} did not initialise (check `nvidia-smi` and that the driver supports this GPU)"
    index = wheel_index(supports)
    fix = (f"install the build for your driver: pip install torch=={torch.__version__.split('+')[0]} --index-url "
           f"https://download.pytorch.org/whl/{index}" if index else
           "update the NVIDIA driver (CUDA 12.6 or newer), or install a torch build for your driver from pytorch.org")
    return what + "; " + fix


def wheel_index(driver_cuda: str | None) -> str | None:
    """PyTorch's wheel index for the newest CUDA a driver supports (docs/install.md)."""
    if driver_cuda is None:
        return "cu126"
    return next((index for index, needs in (("cu130", "13.0"), ("cu128", "12.8"), ("cu126", "12.6"))
                 if _version(driver_cuda) >= _version(needs)), None)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def visible_devices(devices: str) -> list[str]:
    """A sweep's --devices as its runs must be told them, through a CUDA_VISIBLE_DEVICES this process was given."""
    names = [d.strip() for d in devices.split(",")]
    if not all(name.isdigit() for name in names):
        raise UserError(f"--devices {devices}: give CUDA device numbers separated by commas, e.g. --devices 0,1")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [name for name in names if int(name) >= count]
    if missing:
        raise UserError(f"--devices {devices}: there is no CUDA device {', '.join(missing)} here ({count} visible)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [visible.split(",")[int(name)].strip() for name in names] if visible else names


def launcher_precision() -> str | None:
    """fp16 or bf16 when `accelerate launch` or `accelerate config` chose it (its "no" is also the default)."""
    return {"fp16": "fp16", "bf16": "bf16"}.get(os.environ.get("ACCELERATE_MIXED_PRECISION", ""))


def pick_precision(name: str, device: torch.device) -> str:
    """auto: the launcher's choice, else bf16 where the GPU or CPU has it natively, fp16 on older GPUs, else fp32."""
    launcher = launcher_precision() if name == "auto" else None
    if launcher == "fp16" and device.type == "cpu":
        raise UserError("the launcher's mixed precision fp16 needs a GPU; on CPU launch with --mixed_precision bf16 or "
                        "no, or set train.precision")
    if launcher:
        return launcher
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("train.precision=fp16 needs a GPU; on CPU use bf16 or fp32")
    return name


def cpu_has_fast_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private in torch.cpu, hence the care
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def device_report(cfg) -> str:
    cuda = torch.cuda.is_available()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ""
    driver = nvidia_driver()
    supports = f", supports CUDA up to {driver['cuda']}" if driver and driver["cuda"] else ""
    lines = [f"torch {torch.__version__}: "
             + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"),
             f"CUDA usable: {cuda}" + (f" ({torch.cuda.device_count()} GPU(s): {gpus})" if gpus else ""),
             f"NVIDIA driver: {driver['driver']}{supports}" if driver
             else "NVIDIA driver: none found (no nvidia-smi, no /proc/driver/nvidia)",
             f"Apple MPS usable: {torch.backends.mps.is_available()}",
             f"CPU: {torch.get_num_threads()} threads, native bf16 matmuls: {cpu_has_fast_bf16()}"]
    if launcher_precision():
        lines.append(f"launcher's mixed precision: {launcher_precision()} (used when train.precision is auto)")
    try:
        device = pick_device(cfg.train.device)
        precision = pick_precision(cfg.train.precision, device)
        lines.append(f"this run would use: {device.type}, {precision} (train.device={cfg.train.device}, "
                     f"train.precision={cfg.train.precision})")
    except UserError as err:
        lines.append(f"this run would stop: {err}")
    return "\n".join(lines)

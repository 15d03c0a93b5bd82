"""Which device: the only module that asks torch which backends exist, and what the machine is called.

The precision to run on it is yem.hardware.precision's.
"""

import sys
from typing import Literal

from yem.errors import HardwareError

Backend = Literal["cuda", "mps", "cpu"]


def pick_backend(requested: str) -> Backend:
    import torch

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return next(name for name in ("cuda", "mps", "cpu") if available[name])
    if not available[requested]:
        found = ", ".join(name for name, ok in available.items() if ok)
        raise HardwareError(f"device.backend: {requested} is not available on this machine (available: {found}). "
                            f"Set device.backend: auto.")
    return requested  # type: ignore[return-value]


def device_name(backend: Backend) -> str:
    import platform

    import torch

    if backend == "cuda":
        return torch.cuda.get_device_name(0)
    if backend == "mps":
        return _apple_chip() or "Apple GPU"
    found = _apple_chip() if sys.platform == "darwin" else _linux_cpu()
    return found or platform.processor() or platform.machine()


def _linux_cpu() -> str | None:
    try:
        lines = open("/proc/cpuinfo", encoding="utf-8").read().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def synchronize(backend: Backend) -> None:
    import torch

    if backend == "cuda":
        torch.cuda.synchronize()
    elif backend == "mps":
        torch.mps.synchronize()


def empty_cache(backend: Backend) -> None:
    """Free what the process no longer uses, so the next phase (and any memory reading) starts clean."""
    import gc

    import torch

    gc.collect()
    if backend == "cuda":
        torch.cuda.empty_cache()
    elif backend == "mps":
        torch.mps.empty_cache()
    else:
        _trim_heap()


def _trim_heap() -> None:
    """glibc keeps freed heap memory in the process (RSS stays high); malloc_trim hands it back to the OS."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _apple_chip() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def os_name() -> str:
    """'macOS 15.1', or the platform string elsewhere, for the model card's provenance."""
    import platform
    import sys

    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return platform.platform(terse=True)


def autocast(backend: str, dtype):
    """Mixed precision for the forward pass on CUDA: the fp32 LoRA weights run in `dtype` there (tensor
    cores). Elsewhere peft computes the small LoRA path in fp32 beside the half-precision base, no autocast."""
    from contextlib import nullcontext

    import torch

    if backend == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def fast_math(backend: str) -> None:
    """TF32 for whatever fp32 matmuls remain on CUDA (the loss, the LoRA weights' optimizer math)."""
    import torch

    if backend == "cuda":
        torch.set_float32_matmul_precision("high")

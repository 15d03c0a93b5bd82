"""Which device and which precision: the only module that asks torch about backends.

The precision is chosen by probing the device (a small matmul + backward in bf16 and fp16, checked finite and
close to fp32), not from a table of chip and OS versions. On CPU yem trains in fp32: half precision there is
emulated and slower.
"""

import sys
import time
from typing import Literal

from yem.errors import HardwareError

Backend = Literal["cuda", "mps", "cpu"]
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}
# A half-precision result this close to fp32 (relative Frobenius error) passes; bf16 lands near 4e-3.
PROBE_TOLERANCE = 3e-2
# Prefer bf16 (fp32's exponent range: no overflow) unless fp16 is clearly faster, as on chips that emulate bf16.
FP16_PREFERRED_SPEEDUP = 1.5


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


def pick_dtype(backend: Backend, requested: str) -> str:
    """The compute dtype name for the frozen base weights (LoRA weights always train in fp32)."""
    if requested != "auto":
        name = DTYPE_NAMES[requested]
        if name != "float32" and not probe_dtype(backend, name):
            raise HardwareError(f"device.mixed_precision: {requested} gives wrong or non-finite results on "
                                f"{backend}. Set device.mixed_precision: auto (or no for fp32).")
        return name
    if backend == "cpu":
        return "float32"
    passing = [name for name in ("bfloat16", "float16") if probe_dtype(backend, name)]
    if not passing:
        return "float32"
    if passing == ["bfloat16", "float16"] and backend == "mps":
        if _matmul_seconds(backend, "bfloat16") > FP16_PREFERRED_SPEEDUP * _matmul_seconds(backend, "float16"):
            return "float16"
    return passing[0]


def probe_dtype(backend: Backend, name: str) -> bool:
    """Run a small matmul + backward in `name` on the device; True when finite and close to fp32."""
    import torch

    dtype = getattr(torch, name)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 256, generator=generator)
    b = torch.randn(256, 256, generator=generator)
    try:
        x = a.to(backend, dtype).requires_grad_(True)
        y = (x @ b.to(backend, dtype)).float()
        y.square().mean().backward()
        low = torch.cat([y.detach().flatten(), x.grad.float().flatten()]).cpu()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    x = a.clone().requires_grad_(True)
    y = x @ b
    y.square().mean().backward()
    exact = torch.cat([y.detach().flatten(), x.grad.flatten()])
    if not torch.isfinite(low).all():
        return False
    return bool((low - exact).norm() / exact.norm() < PROBE_TOLERANCE)


def _matmul_seconds(backend: Backend, name: str) -> float:
    import torch

    dtype = getattr(torch, name)
    a = torch.randn(1024, 1024, device=backend, dtype=dtype)
    for _ in range(2):
        (a @ a).sum().item()  # warm-up, and .item() waits for the device
    start = time.perf_counter()
    for _ in range(5):
        a = a @ a / 32
    a.sum().item()
    return time.perf_counter() - start


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

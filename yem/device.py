"""Which device and which precision: the only module that asks torch about backends.

The precision is chosen by probing the device (a small matmul + backward in bf16 and fp16, checked finite and
close to fp32), not from a table of chip and OS versions. On CPU yem trains in fp32: half precision there is
emulated and slower.

Some settings are read once, when torch is imported: `configure_environment()` sets them first (the stages
package and `yem doctor` call it before any torch import). They include the MPS allocator's watermark pair (see
`mps_watermarks`), and `cpu_fallbacks()` collects the ops that MPS then runs on the CPU.
"""

import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

from yem.errors import HardwareError

Backend = Literal["cuda", "mps", "cpu"]
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}
# A half-precision result this close to fp32 (relative Frobenius error) passes; bf16 lands near 4e-3.
PROBE_TOLERANCE = 3e-2
# Prefer bf16 (fp32's exponent range: no overflow) unless fp16 is clearly faster, as on chips that emulate bf16.
FP16_PREFERRED_SPEEDUP = 1.5

MPS_HIGH_WATERMARK = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
MPS_LOW_WATERMARK = "PYTORCH_MPS_LOW_WATERMARK_RATIO"
# Both ratios multiply Metal's recommended working set. High is the hard limit (torch's default 1.7 exceeds the RAM
# of most Macs, so overcommit swaps instead of failing); yem's is its memory budget (memory.MPS_SHARE).
YEM_HIGH_WATERMARK = 0.9
# Low is the soft limit above which the allocator frees cached blocks; yem keeps torch's own 1.4 : 1.7 proportion.
LOW_PER_HIGH = 1.4 / 1.7
TORCH_LOW_WATERMARK, TORCH_MAX_WATERMARK = 1.4, 2.0  # torch's unified-memory default; the allowed maximum
_FALLBACK_WARNING = re.compile(r"The operator '([^']+)' is not currently supported on the MPS backend and will "
                               r"fall back to run on the CPU")


def configure_environment(platform: str = sys.platform) -> None:
    """Set allocator and fallback variables; must run before torch is imported (torch reads them at import)."""
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # unsupported MPS ops run on the CPU, logged
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # yem shows one bar per phase instead
    if platform == "darwin":
        updates, note = mps_watermarks(os.environ)
        os.environ.update(updates)
        if note:
            print(f"note: {note}", file=sys.stderr)


def mps_watermarks(env: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The watermark variables to set so that torch accepts the pair, and a note when yours had to change.

    torch checks 0 <= high <= 2 and 0 <= low <= high (or <= 2 when high is 0, "unlimited") when the MPS allocator
    starts, and dies with "invalid low watermark ratio 1.4" when only a high ratio below 1.4 is set. So yem sets
    both or neither: its own pair when you set none, and a low ratio that fits under yours when you set only high.
    """
    high_text, low_text = env.get(MPS_HIGH_WATERMARK), env.get(MPS_LOW_WATERMARK)
    if high_text is None and low_text is None:
        return _yem_watermarks(), None
    if high_text is None:  # only low: yem's hard limit, raised where needed to stay above it
        low = _ratio(low_text)
        if low is None:
            return _yem_watermarks(), _not_a_ratio(MPS_LOW_WATERMARK, low_text)
        return {MPS_HIGH_WATERMARK: _text(max(YEM_HIGH_WATERMARK, low))}, None
    high = _ratio(high_text)
    if high is None:
        return _yem_watermarks(), _not_a_ratio(MPS_HIGH_WATERMARK, high_text)
    limit = high or TORCH_MAX_WATERMARK  # high 0: no hard limit
    low = TORCH_LOW_WATERMARK if low_text is None else _ratio(low_text)
    if low is not None and low <= limit:
        return {}, None
    fitted = {MPS_LOW_WATERMARK: _text(limit * LOW_PER_HIGH)}
    if low_text is None:  # the trap: torch's default low (1.4) above a high below 1.4
        return fitted, None
    return fitted, (f"{MPS_LOW_WATERMARK}: must not exceed {MPS_HIGH_WATERMARK} ({high_text}) (got {low_text!r}). "
                    f"yem uses {fitted[MPS_LOW_WATERMARK]}; fix or unset it.")


def user_high_watermark(env: Mapping[str, str]) -> bool:
    """Whether the MPS hard limit in the environment is someone else's choice rather than yem's."""
    return env.get(MPS_HIGH_WATERMARK, _text(YEM_HIGH_WATERMARK)) != _text(YEM_HIGH_WATERMARK)


def _yem_watermarks() -> dict[str, str]:
    return {MPS_HIGH_WATERMARK: _text(YEM_HIGH_WATERMARK), MPS_LOW_WATERMARK: _text(YEM_HIGH_WATERMARK * LOW_PER_HIGH)}


def _not_a_ratio(name: str, text: str) -> str:
    return f"{name}: not a ratio between 0 and 2 (got {text!r}). yem uses its own watermarks; unset it or give 0.9."


def _ratio(text: str) -> float | None:
    """A watermark ratio torch accepts (0 to 2), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value <= TORCH_MAX_WATERMARK else None


def _text(ratio: float) -> str:
    return f"{ratio:.3f}".rstrip("0").rstrip(".")


@contextmanager
def cpu_fallbacks() -> Iterator[list[str]]:
    """Collect the operators MPS ran on the CPU ('aten::…'), from torch's "will fall back to run on the CPU"
    warning, into the yielded list; other warnings pass through. torch warns once per process (TORCH_WARN_ONCE),
    so wrap the whole stage, from before the first MPS op, to see it."""
    found: list[str] = []
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.filterwarnings("always", message=_FALLBACK_WARNING.pattern, category=UserWarning)

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            match = _FALLBACK_WARNING.search(str(message))
            if match is None:
                shown(message, category, filename, lineno, file, line)
            elif match.group(1) not in found:
                found.append(match.group(1))

        warnings.showwarning = show
        yield found


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

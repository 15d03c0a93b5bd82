"""Which precision the frozen base runs in: a function of the machine's facts and the probe's verdicts only.

The facts are the backend, the chip, the operating system and the torch version (`Machine`); the verdicts say
whether a small matmul + backward in bf16 and in fp16 comes out finite and close to fp32 on the device (fixed
inputs, so the same machine always answers the same). The choice goes into build/preflight.json and into the
checkpoint fingerprint, so it must never depend on a timing taken this run: a flip would rerun encode, train and
render, and an interrupted run could not resume.

One speed fact does matter on a Mac: M1 and M2 emulate bf16, so fp16 is much faster there. It is measured once
per machine (bf16 against fp16 matmuls) and kept in $YEM_HOME/precision/, keyed by chip, system and torch
version, outside DVC's outputs; every later preflight on that machine reads it back. Delete the file to measure
again.

fp16 trains with loss scaling (yem.training.scaling: torch.amp.GradScaler). On MPS GradScaler needs torch 2.8
(its unscale and update kernels), so with an older torch fp16 is never chosen there, and refused when asked for.
"""

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from yem import atomic
from yem.errors import HardwareError
from yem.hardware import device
from yem.paths import yem_home

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}
# A half-precision result this close to fp32 (relative Frobenius error) passes; bf16 lands near 4e-3.
PROBE_TOLERANCE = 3e-2
# On MPS prefer bf16 (fp32's exponent range: nothing to scale) unless fp16 is at least this much faster, as on
# the chips that emulate bf16.
FP16_PREFERRED_SPEEDUP = 1.5
# torch.amp.GradScaler on MPS: _amp_foreach_non_finite_check_and_unscale_ and _amp_update_scale_ got MPS kernels
# in torch 2.8 (accelerate refuses "Grad Scaler with MPS device" below it).
MPS_LOSS_SCALING_TORCH = (2, 8)
SPEED_CACHE = "precision"  # folder under $YEM_HOME


@dataclass(frozen=True, slots=True)
class Machine:
    """The facts a precision choice may depend on."""
    backend: str  # cuda, mps or cpu
    chip: str  # "Apple M2 Pro"
    system: str  # "macOS 15.1"
    torch: str  # "2.13.0"

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def torch_at_least(version: str, wanted: tuple[int, int]) -> bool:
    """'2.8.0+cpu' >= (2, 8)."""
    parts = version.split("+")[0].split(".")
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts[:2]) >= wanted


def loss_scaling_available(backend: str, torch_version: str) -> bool:
    """Whether torch.amp.GradScaler runs natively on `backend` with this torch."""
    return backend != "mps" or torch_at_least(torch_version, MPS_LOSS_SCALING_TORCH)


def pick_dtype(backend: str, requested: str, home: Path | None = None) -> str:
    """The precision for this machine: probed on the device, with the recorded speed comparison on MPS."""
    machine = this_machine(backend)
    return choose(machine, requested, lambda name: probe_dtype(backend, name),
                  lambda: recorded_speedup(machine, lambda: measure_fp16_speedup(backend), home))


def this_machine(backend: str) -> Machine:
    from importlib import metadata

    return Machine(backend=backend, chip=device.device_name(backend), system=device.os_name(),
                   torch=metadata.version("torch"))


def choose(machine: Machine, requested: str, passes: Callable[[str], bool],
           fp16_speedup: Callable[[], float]) -> str:
    """The compute dtype name of the frozen base (LoRA weights always train in fp32).

    `passes(name)` is the probe's verdict for a dtype; `fp16_speedup()` is this machine's recorded bf16/fp16
    time ratio, asked for only on MPS when both half precisions pass."""
    fp16_ok = loss_scaling_available(machine.backend, machine.torch)
    if requested != "auto":
        return _as_requested(machine, DTYPE_NAMES[requested], passes, fp16_ok)
    if machine.backend == "cpu":
        return "float32"  # half precision is emulated on a CPU: slower, and no memory to save
    candidates = ["bfloat16"] + (["float16"] if fp16_ok else [])
    passing = [name for name in candidates if passes(name)]
    if not passing:
        return "float32"
    if passing == ["bfloat16", "float16"] and machine.backend == "mps" and fp16_speedup() >= FP16_PREFERRED_SPEEDUP:
        return "float16"
    return passing[0]


def _as_requested(machine: Machine, name: str, passes: Callable[[str], bool], fp16_ok: bool) -> str:
    if name == "float16" and not fp16_ok:
        raise HardwareError(f"device.mixed_precision: fp16 on {machine.backend} needs loss scaling, which needs "
                            f"torch >= {'.'.join(map(str, MPS_LOSS_SCALING_TORCH))} (got {machine.torch}). "
                            f"Upgrade torch, or set device.mixed_precision: auto.")
    if name != "float32" and not passes(name):
        raise HardwareError(f"device.mixed_precision: {name} gives wrong or non-finite results on "
                            f"{machine.backend} (got a failed probe). Set device.mixed_precision: auto (or no for "
                            f"fp32).")
    return name


def recorded_speedup(machine: Machine, measure: Callable[[], float], home: Path | None = None) -> float:
    """fp16's speed-up over bf16 on this machine: read from $YEM_HOME/precision/<key>.json, measured and written
    there the first time. A damaged file is measured again."""
    path = (home or yem_home()) / SPEED_CACHE / f"{machine.key()}.json"
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["fp16_speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    speedup = measure()
    atomic.write_json(path, {**asdict(machine), "fp16_speedup": round(speedup, 3),
                             "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return speedup


def probe_dtype(backend: str, name: str) -> bool:
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


def measure_fp16_speedup(backend: str, rounds: int = 3) -> float:
    """bf16 matmul time / fp16 matmul time on the device, the median of `rounds` alternating rounds."""
    ratios = [_matmul_seconds(backend, "bfloat16") / _matmul_seconds(backend, "float16") for _ in range(rounds)]
    return statistics.median(ratios)


def _matmul_seconds(backend: str, name: str) -> float:
    import torch

    a = torch.randn(1024, 1024, device=backend, dtype=getattr(torch, name))
    for _ in range(2):
        (a @ a).sum().item()  # warm-up, and .item() waits for the device
    start = time.perf_counter()
    for _ in range(5):
        a = a @ a / 32
    device.synchronize(backend)
    return time.perf_counter() - start

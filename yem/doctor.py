"""`yem doctor`: what this machine can do with this params.yaml, explained for a person.

It gathers what preflight decides (backend, the precision probe, the memory budget) plus what preflight keeps
out of build/preflight.json (free memory, swap, heat), and sets each stage's estimated memory (yem.estimate)
against the budget, with the params.yaml change that would make a stage fit. `gather` reads the machine;
`format_report` is a pure function of what it read, so tests feed it replayed readings of other machines.
"""

import os
import platform
from dataclasses import dataclass, replace
from importlib import metadata

from yem import device, estimate, memory
from yem.errors import YemError
from yem.memory import gib
from yem.params import Params

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True)
class Precision:
    bf16: bool  # the probe's verdict on the device: finite and close to fp32
    fp16: bool
    choice: str  # the dtype preflight would record, or why none could be chosen
    fallbacks: tuple[str, ...]  # MPS ops that ran on the CPU during the probe


@dataclass(frozen=True, slots=True)
class Report:
    backend: str
    requested: str  # device.backend
    chip: str
    system: str
    libraries: str
    precision: Precision
    readings: memory.Readings
    budget: memory.Budget
    watermarks: dict[str, str]  # the MPS allocator's variables as this process has them
    thermal: str
    workload: str | None  # "SD3-medium at 1024 px, float16, batch auto": what the stages were estimated for
    stages: tuple[estimate.Verdict, ...]
    train_note: str  # how auto checkpointing / batch would go
    problem: str | None  # why there is no estimate


def gather(params: Params | None) -> Report:
    """Read this machine (and, with params, estimate every stage). Imports torch: call it from the CLI only."""
    device.configure_environment()  # before torch is imported
    settings = params.device if params else None
    requested = settings.backend if settings else "auto"
    backend = device.pick_backend(requested)
    precision = probe_precision(backend, settings.mixed_precision if settings else "auto")
    readings = memory.read(backend)
    budget = memory.budget(readings, settings.memory_limit_gib if settings else None)
    base = Report(backend=backend, requested=requested, chip=device.device_name(backend), system=_system(),
                  libraries=", ".join(f"{name} {_version(name)}" for name in ("torch", "diffusers", "peft")),
                  precision=precision, readings=readings, budget=budget,
                  watermarks={k: os.environ[k] for k in (device.MPS_HIGH_WATERMARK, device.MPS_LOW_WATERMARK)
                              if k in os.environ},
                  thermal=_thermal(backend), workload=None, stages=(), train_note="",
                  problem="no params.yaml: pass --params to estimate the stages" if params is None else None)
    return _with_estimate(base, params) if params is not None else base


def probe_precision(backend: str, requested: str) -> Precision:
    with device.cpu_fallbacks() as fell_back:
        bf16, fp16 = (device.probe_dtype(backend, name) for name in ("bfloat16", "float16"))
        try:
            choice = device.pick_dtype(backend, requested)
        except YemError as e:
            choice = f"none ({e})"
    return Precision(bf16=bf16, fp16=fp16, choice=choice, fallbacks=tuple(fell_back))


def _with_estimate(report: Report, params: Params) -> Report:
    itemsize = DTYPE_BYTES.get(report.precision.choice)
    if itemsize is None:
        return replace(report, problem="no precision could be chosen, so no estimate")
    try:
        arch = estimate.architecture_for(params.model.id, params.model.revision)
    except YemError as e:
        return replace(report, problem=str(e))
    work = estimate.workload(params, report.backend, itemsize)
    work, note = estimate.resolve_auto(arch, work, report.budget.bytes, params.train)
    batch = params.train.batch_size
    described = (f"{arch.name} at {params.data.resolution} px, {report.precision.choice}, batch {batch}"
                 f"{', T5 off' if not params.encode.use_t5 else ''}")
    stages = estimate.verdicts(arch, work, report.budget.bytes, machine_label(report.readings))
    return replace(report, workload=described, stages=tuple(stages), train_note=note)


def machine_label(readings: memory.Readings) -> str:
    """How advice names the machine: "16 GB Mac", "80 GB CUDA card", "24 GB CPU machine"."""
    if readings.backend == "cuda":
        return f"{round(readings.device_total / memory.GIB)} GB CUDA card" if readings.device_total else "CUDA card"
    ram = round(readings.total_ram / memory.GIB)
    return f"{ram} GB Mac" if readings.backend == "mps" else f"{ram} GB CPU machine"


def format_report(report: Report) -> str:
    lines = ["yem doctor", "", "Device"]
    lines += _rows(_device_rows(report))
    lines += ["", "Memory"]
    lines += _rows(_memory_rows(report))
    lines += ["", f"Stages ({report.workload})" if report.workload else "Stages"]
    if report.problem:
        lines.append(f"  not estimated: {report.problem}")
    for verdict in report.stages:
        word = "over" if not verdict.fits else "tight" if verdict.tight else "fits"
        lines.append(f"  {verdict.stage:<8} {gib(verdict.needs):>10}  {word:<5}  largest part: {verdict.largest}")
    if report.train_note:
        lines.append(f"  train: {report.train_note}")
    advice = list(dict.fromkeys(line for verdict in report.stages for line in verdict.advice))  # once each
    if advice:
        lines += ["", "Advice"] + [f"  - {line}" for line in advice]
    return "\n".join(lines) + "\n"


def _device_rows(report: Report) -> list[tuple[str, str]]:
    p = report.precision
    probe = f"bf16 {'pass' if p.bf16 else 'fail'}, fp16 {'pass' if p.fp16 else 'fail'} -> {p.choice}"
    if report.backend == "cpu":
        probe += " (the CPU trains in fp32: half precision is emulated there)"
    rows = [("backend", f"{report.backend} (device.backend: {report.requested})"), ("chip", report.chip),
            ("system", report.system), ("libraries", report.libraries), ("precision", probe)]
    if report.backend == "mps":
        rows.append(("CPU fallback", ", ".join(p.fallbacks) or "no op fell back to the CPU in the probe"))
    return rows + [("thermal", report.thermal)]


def _memory_rows(report: Report) -> list[tuple[str, str]]:
    r = report.readings
    kind = "unified memory" if r.backend == "mps" else "RAM"
    rows = [(kind, f"{gib(r.total_ram)} total, {gib(r.available_ram)} available now, swap {gib(r.swap_used)} used")]
    if r.backend == "mps":
        rows.append(("working set", gib(r.device_total) + " (Metal's recommendation for the GPU)"
                     if r.device_total else "unknown (torch < 2.5 cannot read it)"))
        rows.append(("watermarks", ", ".join(f"{k}={v}" for k, v in report.watermarks.items()) or "torch defaults"))
    elif r.backend == "cuda":
        rows.append(("card", gib(r.device_total or 0)))
    if r.pressure_level is not None:
        level = {1: "normal", 2: "warning", 4: "critical"}.get(r.pressure_level, str(r.pressure_level))
        rows.append(("pressure", level))
    return rows + [("budget", f"{gib(report.budget.bytes)}: {report.budget.why}")]


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    return [f"  {name:<13}{value}" for name, value in rows]


def _thermal(backend: str) -> str:
    """The thermal state, where this yem has a thermal module (yem.thermal)."""
    try:
        from yem import thermal
    except ImportError:
        return "not checked (this yem has no thermal module)"
    reading = thermal.detect(backend).read()
    return f"{reading.state.label} ({reading.detail})"


def _system() -> str:
    mac = platform.mac_ver()[0]
    system = f"macOS {mac} ({platform.machine()})" if mac else platform.platform()
    return f"{system}, Python {platform.python_version()}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"

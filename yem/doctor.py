"""`yem doctor`: what this machine can do with this params.yaml, explained for a person.

It gathers what preflight decides (backend, the precision probe, the memory budget) plus what preflight keeps
out of build/preflight.json (free memory, swap, heat), and sets each stage's estimated memory (yem.model.footprint)
against the budget, with the params.yaml change that would make a stage fit. `gather` reads the machine;
`format_report` is a pure function of what it read, so tests feed it replayed readings of other machines. The
advice lives here, not beside the estimate, so rewording it reruns no pipeline stage.
"""

import math
import os
import platform
from dataclasses import dataclass, replace
from importlib import metadata

from yem.data.buckets import Bucket
from yem.data.preflight import bucket_survey
from yem.errors import YemError
from yem.hardware import apple, device, environment, fallbacks, memory, precision
from yem.hardware.budget import Budget, memory_budget
from yem.hardware.memory import gib
from yem.hardware.thermal import sensor
from yem.model import architecture, footprint
from yem.model.architecture import Architecture
from yem.model.footprint import STAGES, Workload, render_plan, train_stage
from yem.params import Params, TrainParams
from yem.training import fit, macs
from yem.training.batching import MAX_AUTO_BATCH, PLAN_MARGIN

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TIGHT = 0.85  # of the limit: an estimate this close may well not fit (allocator caches, other apps)


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
    budget: Budget
    watermarks: dict[str, str]  # the MPS allocator's variables as this process has them
    thermal: str
    workload: str | None  # "SD3-medium at 1024 px, float16, batch auto": what the stages were estimated for
    stages: tuple["Verdict", ...]
    train_note: str  # how auto checkpointing / batch would go
    problem: str | None  # why there is no estimate
    buckets: str = ""  # the aspect-ratio buckets the photos will train in, and how many each holds


def gather(params: Params | None) -> Report:
    """Read this machine (and, with params, estimate every stage). Imports torch: call it from the CLI only."""
    environment.configure_environment()  # before torch is imported
    settings = params.device if params else None
    requested = settings.backend if settings else "auto"
    backend = device.pick_backend(requested)
    precision = probe_precision(backend, settings.mixed_precision if settings else "auto")
    readings = memory.read(backend)
    budget = memory_budget(readings, settings.memory_limit_gib if settings else None)
    base = Report(backend=backend, requested=requested, chip=device.device_name(backend), system=_system(),
                  libraries=", ".join(f"{name} {_version(name)}" for name in ("torch", "diffusers", "peft")),
                  precision=precision, readings=readings, budget=budget,
                  watermarks={k: os.environ[k] for k in (environment.MPS_HIGH_WATERMARK, environment.MPS_LOW_WATERMARK)
                              if k in os.environ},
                  thermal=_thermal(backend), workload=None, stages=(), train_note="",
                  problem="no params.yaml: pass --params to estimate the stages" if params is None else None)
    return _with_estimate(base, params) if params is not None else base


def probe_precision(backend: str, requested: str) -> Precision:
    with fallbacks.cpu_fallbacks() as fell_back:
        bf16, fp16 = (precision.probe_dtype(backend, name) for name in ("bfloat16", "float16"))
        try:
            choice = precision.pick_dtype(backend, requested)
        except YemError as e:
            choice = f"none ({e})"
    return Precision(bf16=bf16, fp16=fp16, choice=choice, fallbacks=tuple(fell_back))


def _with_estimate(report: Report, params: Params) -> Report:
    itemsize = DTYPE_BYTES.get(report.precision.choice)
    if itemsize is None:
        return replace(report, problem="no precision could be chosen, so no estimate")
    try:
        arch = architecture.architecture_for(params.model.id, params.model.revision)
    except YemError as e:
        return replace(report, problem=str(e))
    sizes, buckets = bucket_line(params, arch)
    work = footprint.workload(params, report.backend, itemsize, budget=report.budget.bytes,
                              size=max(sizes, key=math.prod, default=None))
    work, note = resolve_auto(arch, work, report.budget.bytes, params.train)
    batch = params.train.batch_size
    described = (f"{arch.name} at {params.data.resolution} px, {report.precision.choice}, batch {batch}"
                 f"{', T5 off' if not params.encode.use_t5 else ''}")
    stages = verdicts(arch, work, report.budget.bytes, machine_label(report.readings))
    return replace(report, workload=described, stages=tuple(stages), train_note=note, buckets=buckets)


def bucket_line(params: Params, arch: Architecture) -> tuple[list[tuple[int, int]], str]:
    """The (height, width) of each bucket the instance photos fall in, and a line listing them with their counts
    and the photos cropped hard to fit the widest."""
    try:
        counts, clamped = bucket_survey(params.data, params.root, arch.max_side)
    except YemError as e:
        return [], f"not surveyed: {e}"
    sizes = [(bucket.height, bucket.width) for bucket in map(Bucket.parse, counts)]
    line = ", ".join(f"{label}: {count}" for label, count in counts.items())
    if clamped:
        line += f"; cropped hard to the widest bucket: {', '.join(clamped[:3])}{' …' if len(clamped) > 3 else ''}"
    return sizes, line


def resolve_auto(arch: Architecture, work: Workload, budget: int, train: TrainParams) -> tuple[Workload, str]:
    """Decide `auto` as training will (checkpointing only when batch 1 does not fit without it) and predict the
    batch `auto` will measure its way to. Returns the workload at the first batch tried, and a note."""
    notes = []
    if train.gradient_checkpointing == "auto":
        without = train_stage(arch, replace(work, checkpointing=False)).total
        work = fit.resolve_checkpointing(arch, work, budget)
        notes.append(f"gradient checkpointing {'on' if work.checkpointing else 'off'} (auto: batch "
                     f"{work.batch_size} needs {gib(without)} without it)")
    if train.batch_size == "auto":
        expected = largest_batch(arch, work, budget)
        notes.append(f"batch auto: about {expected} per step expected" if expected else
                     "batch auto: not even 1 per step is expected to fit")
    notes.append(f"{work.attention} attention (train.attention: {train.attention})")
    return work, "; ".join(notes)


def largest_batch(arch: Architecture, work: Workload, budget: int) -> int:
    """The largest batch the estimate puts under the planner's margin (0 when batch 1 does not fit)."""
    one = train_stage(arch, replace(work, batch_size=1)).total
    per_image = train_stage(arch, replace(work, batch_size=2)).total - one
    limit = budget * PLAN_MARGIN
    return 0 if one > limit else min(MAX_AUTO_BATCH, 1 + int((limit - one) / per_image))


@dataclass(frozen=True, slots=True)
class Verdict:
    stage: str
    needs: int
    fits: bool
    tight: bool  # fits, but within 15 % of the limit
    largest: str  # what takes most of it: "T5-XXL weights 9.1 GiB"
    advice: list[str]


def verdicts(arch: Architecture, work: Workload, budget: int, machine: str) -> list[Verdict]:
    """Each stage against the budget (train against the batch planner's 90 %; render as it would render on this
    budget), with advice where it is over or tight."""
    found = []
    planned = {**{stage: work for stage in STAGES}, "render": render_plan(arch, work, budget)}
    for stage, planned_work in planned.items():
        estimate = STAGES[stage](arch, planned_work)
        limit = fit.limit(stage, budget)
        fits, tight = estimate.total <= limit, TIGHT * limit < estimate.total <= limit
        name, size = max(estimate.parts.items(), key=lambda item: item[1]) if estimate.parts else ("nothing", 0)
        advice = advise(stage, arch, work, budget, machine) if tight or not fits else []
        found.append(Verdict(stage, estimate.total, fits, tight, f"{name} {gib(size)}", advice))
    return found


def advise(stage: str, arch: Architecture, work: Workload, budget: int, machine: str) -> list[str]:
    """What to change in params.yaml, each with what the stage would then need (from this same estimate)."""
    advice = []
    for setting, changed in _changes(stage, work):
        needs = fit.needs(arch, changed, (stage,), budget)[stage]
        verdict = "fits" if needs <= fit.limit(stage, budget) else "still over"
        advice.append(f"{machine}: set {setting} ({stage} then needs {gib(needs)}, {verdict} the {gib(budget)} budget)")
    weights = sum(size for part, size in STAGES[stage](arch, work).parts.items() if "weights" in part)
    if stage in ("train", "render") and weights > fit.limit(stage, budget):
        advice.append(f"{machine}: the {arch.name} weights alone exceed the budget; use a smaller base model (SD3.5 "
                      f"medium rather than large) or a machine with more memory")
    return advice


def _changes(stage: str, work: Workload) -> list[tuple[str, Workload]]:
    """The params.yaml settings that shrink a stage, and the workload each leads to."""
    found = [(change.setting, change.work) for change in fit.changes(work, auto_checkpointing=False)
             if change.stage == stage]
    half, render_half = fit.half(work.resolution), fit.half(work.render_resolution)
    if stage == "encode" and work.dtype_bytes == 4 and work.backend != "cpu":
        found.append(("device.mixed_precision: auto", replace(work, dtype_bytes=2)))
    if stage == "latents":
        found.append((f"data.resolution: {half}", replace(work, resolution=half, size=None)))
    if stage == "render":
        found.append((f"render.resolution: {render_half}", replace(work, render_resolution=render_half)))
    if stage == "train":
        smaller = replace(work, resolution=half, render_resolution=half, checkpointing=True, size=None)
        also = "" if work.checkpointing else " with train.gradient_checkpointing: auto"
        found.append((f"data.resolution: {half}{also}", smaller))
    return found


INT8_ON_MPS = ("on MPS an int8 base runs as plain MPS matmuls on weights dequantized per layer: optimum-quanto 0.2.7 "
               "registers its MPS int8 kernel under another op name (quanto_py::qbytes_mm), so it never runs")


def mac_table(params: Params | None, ram_sizes: tuple[int, ...]) -> str:
    """`yem doctor --memory 16`: what a Mac of each size can train with this params.yaml (its rank, targets, T5
    length and attention), for each SD3 model and resolution, and how long 500 steps take on each chip."""
    base = footprint.workload(params, "mps", 2) if params else Workload(
        backend="mps", dtype_bytes=2, resolution=1024, render_resolution=1024, batch_size=1, checkpointing=False,
        rank=4, targets=4, use_t5=True, t5_tokens=77, attention="chunked", render_attention="chunked")
    auto = params is None or params.train.gradient_checkpointing == "auto"
    budgets = ", ".join(f"{gb} GB: {gib(memory_budget(apple.mac_readings(gb)).bytes)}" for gb in ram_sizes)
    return (f"What a Mac can train: every stage within yem's memory budget ({budgets}), batch 1, rank "
            f"{base.rank}, {base.attention} attention, gradient checkpointing as auto decides (ckpt); the "
            f"settings named are the params.yaml changes it needs.\n\n"
            + macs.markdown(macs.table(ram_sizes, base, auto)) + f"\nint8 base: {INT8_ON_MPS}.\n")


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
    if report.buckets:
        lines += ["", "Photos", f"  buckets      {report.buckets}"]
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
        rows.append(("int8 base", INT8_ON_MPS))
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
    reading = sensor.detect(backend).read()
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

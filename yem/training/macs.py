"""What a Mac can train: for a memory size, each SD3 model and resolution, the settings that fit and how long 500
steps take there (an estimate), from the same estimate the stages check themselves against.

A Mac of `ram_gb` is read as yem.hardware.apple describes it (Metal's working set, yem's 90 % budget); the run is
the params.yaml given, with model and resolution varied, attention and checkpointing as their auto settings decide
on MPS, at batch 1. Time is the step's FLOPs (yem.model.flops) at an assumed share of each chip's published fp16
rate (yem.hardware.apple), until Macs measure it (the Apple workflow writes the runner's s/step).
"""

from dataclasses import dataclass, replace

from yem.hardware import apple
from yem.hardware.budget import memory_budget
from yem.model import chunked, flops
from yem.model.architecture import KNOWN_MODELS, Architecture
from yem.model.footprint import Workload
from yem.training import fit

MEMORY_SIZES = (8, 16, 24, 36, 48, 64, 128)  # GB of unified memory Macs are sold with
MODELS = ("stabilityai/stable-diffusion-3-medium-diffusers", "stabilityai/stable-diffusion-3.5-medium",
          "stabilityai/stable-diffusion-3.5-large")
RESOLUTIONS = (512, 768, 1024)
STEPS = 500


@dataclass(frozen=True, slots=True)
class Cell:
    ram_gb: int
    arch: Architecture
    resolution: int
    budget: int
    fit: fit.Fit

    @property
    def verdict(self) -> str:
        """"fits", "fits with <settings>", or "no"."""
        if not self.fit.fits:
            return "no"
        return f"fits with {', '.join(self.fit.settings)}" if self.fit.settings else "fits"


def cell(ram_gb: int, model_id: str, resolution: int, base: Workload, auto_checkpointing: bool) -> Cell:
    """`base` (a params.yaml's workload) on a Mac of `ram_gb` GB, for `model_id` at `resolution`."""
    budget = memory_budget(apple.mac_readings(ram_gb)).bytes
    work = replace(base, backend="mps", dtype_bytes=2, resolution=resolution, render_resolution=resolution,
                   batch_size=1, chunk_budget=chunked.chunk_budget(budget))
    arch = KNOWN_MODELS[model_id]
    return Cell(ram_gb, arch, resolution, budget, fit.smallest_change(arch, work, budget,
                                                                     auto_checkpointing=auto_checkpointing))


def table(ram_sizes: tuple[int, ...], base: Workload, auto_checkpointing: bool) -> list[Cell]:
    return [cell(ram, model, resolution, base, auto_checkpointing)
            for model in MODELS for resolution in RESOLUTIONS for ram in ram_sizes]


def minutes(arch: Architecture, work: Workload, chip: apple.Chip, steps: int = STEPS) -> float:
    """Estimated minutes of `steps` training steps of `work` on `chip` (compute only: no start-up, no render)."""
    rate = chip.fp16_tflops * 1e12 * apple.ASSUMED_STEP_EFFICIENCY
    return steps * flops.step_flops(arch, work) / rate / 60


def seconds_per_step(arch: Architecture, work: Workload, chip: apple.Chip) -> float:
    return minutes(arch, work, chip, steps=1) * 60


SHORT = {"train.quantize_base: int8": "int8 base", "encode.use_t5: false": "no T5",
         "train.attention: auto": "chunked attention", "render.attention: auto": "chunked render attention",
         "train.gradient_checkpointing: auto": "checkpointing", "train.batch_size: auto": "batch 1",
         f"render.resolution: {fit.RENDER_FLOOR}": f"render at {fit.RENDER_FLOOR} px"}


def label(found: Cell) -> str:
    """A table cell: "fits", "int8 base + no T5", "no"; "· ckpt" where auto checkpointing is on."""
    if not found.fit.fits:
        over = [stage for stage, needed in found.fit.needs.items() if needed > fit.limit(stage, found.budget)]
        return f"no ({', '.join(over)})"
    text = " + ".join(SHORT.get(s, s) for s in found.fit.settings) or "fits"
    return text + (" · ckpt" if found.fit.work.checkpointing else "")


def markdown(cells: list[Cell]) -> str:
    """The "what your Mac can train" tables: settings per memory size, then minutes per 500 steps per chip."""
    sizes = sorted({c.ram_gb for c in cells})
    rows = list(dict.fromkeys((c.arch.name, c.resolution) for c in cells))
    by_key = {(c.arch.name, c.resolution, c.ram_gb): c for c in cells}
    lines = ["| model | px | " + " | ".join(f"{gb} GB" for gb in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for name, px in rows:
        lines.append(f"| {name} | {px} | " + " | ".join(label(by_key[name, px, gb]) for gb in sizes) + " |")
    runs = {(c.arch.name, c.resolution, c.fit.work.checkpointing): c for c in cells if c.fit.fits}
    lines += ["", f"Minutes per {STEPS} steps (estimate: FLOPs at {apple.ASSUMED_STEP_EFFICIENCY:.0%} of the GPU's "
                  f"published fp16 rate; ckpt: gradient checkpointing on; an int8 base adds unmeasured time)", "",
              "| model | px | ckpt | " + " | ".join(chip.name for chip in apple.CHIPS) + " |",
              "|---|---|---|" + "---:|" * len(apple.CHIPS)]
    for (name, px, checkpointing), found in sorted(runs.items(), key=lambda item: (rows.index(item[0][:2]),
                                                                                   item[0][2])):
        times = " | ".join(f"{minutes(found.arch, found.fit.work, chip):.0f}" for chip in apple.CHIPS)
        lines.append(f"| {name} | {px} | {'yes' if checkpointing else 'no'} | {times} |")
    return "\n".join(lines) + "\n"

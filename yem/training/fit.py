"""Will it fit: the settings a run needs on a memory budget, decided from the estimate before any weights load.

- `resolve_checkpointing`: train.gradient_checkpointing auto as training decides it (on only when batch 1 does not
  fit without it), so an estimate counts what will really run.
- `smallest_change`: the fewest params.yaml changes (`changes`, cheapest first) under which every stage asked for
  fits: what `yem doctor` advises and its "what your Mac can train" table shows.
- `check_training`: the train stage's check before it loads the transformer: when even the smallest setting
  params allow cannot fit, stop with the change that would.

Train is held to the batch planner's margin of the budget (yem.training.batching.PLAN_MARGIN), the other stages to
the budget itself. The estimate is yem.model.footprint's (within 10 % of measured peaks: benchmarks/RESULTS.md),
so a run is refused only when the estimate passes the whole budget; between the margin and the budget the planner
measures.
"""

from dataclasses import dataclass, replace
from itertools import combinations

from yem.errors import HardwareError
from yem.hardware.memory import gib
from yem.model import chunked
from yem.model.architecture import Architecture
from yem.model.footprint import STAGES, Workload, render_plan, train_stage
from yem.training.batching import PLAN_MARGIN

RENDER_FLOOR = 512  # px: render.resolution is offered down to this (SD3's smallest trained resolution)


@dataclass(frozen=True, slots=True)
class Change:
    setting: str  # as a person writes it in params.yaml: "train.quantize_base: int8"
    stage: str  # the stage it shrinks
    work: Workload  # the workload with this change alone


@dataclass(frozen=True, slots=True)
class Fit:
    settings: tuple[str, ...]  # the changes applied; () when it fits as it is
    work: Workload  # the workload with them, checkpointing resolved as auto would
    needs: dict[str, int]  # stage -> estimated bytes
    fits: bool


def limit(stage: str, budget: int) -> float:
    return budget * PLAN_MARGIN if stage == "train" else budget


def resolve_checkpointing(arch: Architecture, work: Workload, budget: int) -> Workload:
    """Checkpointing as `auto` decides it: on only when the first batch does not fit without it."""
    without = train_stage(arch, replace(work, checkpointing=False)).total
    return replace(work, checkpointing=without > limit("train", budget))


def changes(work: Workload, auto_checkpointing: bool = True) -> list[Change]:
    """The params.yaml changes that shrink a stage without changing what is trained, cheapest in time and quality
    first. With `auto_checkpointing`, checkpointing is left to auto; otherwise turning it on is offered."""
    found = []
    if not work.checkpointing and not auto_checkpointing:
        found.append(Change("train.gradient_checkpointing: auto", "train", replace(work, checkpointing=True)))
    for key, field, stage in (("train.attention", "attention", "train"), ("render.attention", "render_attention",
                                                                          "render")):
        if getattr(work, field) == "sdpa" and work.backend in chunked.KEEPS_SCORES:
            found.append(Change(f"{key}: auto", stage, replace(work, **{field: "chunked"})))
    if work.batch_size > 1:
        found.append(Change("train.batch_size: auto", "train", replace(work, batch_size=1)))
    if not work.quantized_base:
        found.append(Change("train.quantize_base: int8", "train", replace(work, quantized_base=True)))
    if work.use_t5:
        found.append(Change("encode.use_t5: false", "encode", replace(work, use_t5=False)))
    if work.render_resolution > RENDER_FLOOR:  # validation images smaller than training: the last resort
        found.append(Change(f"render.resolution: {RENDER_FLOOR}", "render",
                            replace(work, render_resolution=RENDER_FLOOR)))
    return found


def needs(arch: Architecture, work: Workload, stages: tuple[str, ...], budget: int) -> dict[str, int]:
    """Each stage's estimate; render's in the way it would render on this budget (fewer images, VAE tiles)."""
    render = render_plan(arch, work, budget)
    return {stage: STAGES[stage](arch, render if stage == "render" else work).total for stage in stages}


def smallest_change(arch: Architecture, work: Workload, budget: int, stages: tuple[str, ...] = tuple(STAGES),
                    auto_checkpointing: bool = True) -> Fit:
    """The fewest `changes` (the earliest such set, in their order) under which every stage in `stages` fits; with
    all of them when nothing does (`fits` False)."""
    offered = [change for change in changes(work, auto_checkpointing) if change.stage in stages]
    for size in range(len(offered) + 1):
        for chosen in combinations(offered, size):
            changed = _apply(work, chosen)
            if auto_checkpointing:
                changed = resolve_checkpointing(arch, changed, budget)
            found = needs(arch, changed, stages, budget)
            if all(found[stage] <= limit(stage, budget) for stage in stages):
                return Fit(tuple(c.setting for c in chosen), changed, found, True)
    return Fit(tuple(c.setting for c in offered), changed, found, False)


def _apply(work: Workload, chosen: tuple[Change, ...]) -> Workload:
    """Each change's own fields on top of `work` (changes touch disjoint fields)."""
    changed = work
    for change in chosen:
        changed = replace(changed, **{name: getattr(change.work, name) for name in work.__dataclass_fields__
                                      if getattr(change.work, name) != getattr(work, name)})
    return changed


def half(resolution: int) -> int:
    """Half the resolution, kept a multiple of 16 (latent ×8, patch ×2) and at least 64."""
    return max(64, resolution // 2 // 16 * 16)


def check_training(arch: Architecture, work: Workload, budget: int) -> None:
    """Before the transformer loads: raise HardwareError when the smallest setting params allow (`work`: batch 1
    where auto, checkpointing where auto or on) cannot train within the budget, naming the change that would."""
    needed = train_stage(arch, work).total
    if needed <= budget:
        return
    fit = smallest_change(arch, work, budget, stages=("train",), auto_checkpointing=False)
    if fit.fits:
        advice = f"Set {' and '.join(fit.settings)} (then about {gib(fit.needs['train'])})"
    else:
        smaller = replace(fit.work, resolution=half(work.resolution))
        advice = (f"Even with {' and '.join(fit.settings) or 'every memory setting'} it needs "
                  f"{gib(train_stage(arch, fit.work).total)}: lower data.resolution to {half(work.resolution)} "
                  f"(then about {gib(train_stage(arch, smaller).total)}) or train a smaller base")
    setup = f"batch {work.batch_size}, gradient checkpointing {'on' if work.checkpointing else 'off'}, " \
            f"{work.attention} attention{', int8 base' if work.quantized_base else ''}"
    raise HardwareError(f"train: {arch.name} at {work.resolution} px needs about {gib(needed)}, over the "
                        f"{gib(budget)} memory budget (got {setup}). {advice}; `yem doctor` shows every stage.")

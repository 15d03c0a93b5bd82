"""Batch size, gradient accumulation and gradient checkpointing, decided from measured peak memory.

Pure: the training loop measures, this module decides. The loop provides `measure(batch, checkpointing)`, which
runs one real training step (forward + backward) at that batch size and returns the peak memory it took, in the
units of the budget (peaks.peak_bytes: CUDA allocator peak, MPS sampled driver memory, CPU peak RSS):

    settings = batching.BatchSettings.from_train(params.train)
    budget = hardware.budget_bytes                               # the budget preflight recorded (stable per machine)

    def measure(batch: int, checkpointing: bool) -> int:
        <enable or disable gradient checkpointing on the transformer>
        device.empty_cache(backend); peaks.reset_peak(backend)
        <forward + backward on `batch` samples; zero the grads: no optimizer step, no training RNG consumed>
        device.synchronize(backend)
        return peaks.peak_bytes(backend)

    plan = batching.plan_batch(measure, budget, settings)   # a few steps; raises HardwareError if nothing fits
    ...                                                      # train with plan.batch_size × plan.accumulation
    except Exception as error:                               # around one optimizer step
        if not out_of_memory.is_out_of_memory(error):
            raise
        plan = batching.back_off(plan, settings, budget)     # halves the batch, doubles accumulation
        <log plan.why; free memory; retry the same step>     # step count and effective batch stay the same

`measure` may raise an out-of-memory error (it is caught here and counts as "does not fit"); free what the failed
step held before the next call (empty_cache). `out_of_memory.memory_pressure` (swap growth) is a reason to back off too.
`plan.metrics()` goes into metrics/train.json and the model card.

How the plan is made (`plan_batch`):
1. Checkpointing `auto` is on only when the first batch (1, or a fixed train.batch_size) does not fit without it.
2. A fixed train.batch_size is kept. For `auto`, the peaks at batch 1 and 2 give a line, peak(b) = base + b × slope
   (activations grow linearly with the batch; weights, LoRA state and the cached data do not), and the largest b
   under PLAN_MARGIN × budget is tried for real; if it does not fit, the line is refitted through the new point.
3. With an effective batch E (params always fix one: `BatchSettings.from_train`) the batch is the largest divisor
   of E that fits and accumulation is E / batch, so batch × accumulation is exactly E and the same params train the
   same LoRA on any machine; without one (effective None) accumulation stays as set.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from yem.errors import HardwareError
from yem.hardware.memory import gib
from yem.hardware.out_of_memory import is_out_of_memory
from yem.params import TrainParams

Measure = Callable[[int, bool], int]  # (batch, checkpointing) -> peak bytes of one real training step

# Plan against 90 % of the budget: the line is fitted on two points, and later steps vary (allocator
# fragmentation, the sampled MPS peak missing a spike).
PLAN_MARGIN = 0.9
# Larger batches rarely help a LoRA of 10-30 photos, and MPS fails on some ops with very large tensors
# (SimpleTuner refuses batch > 16 on MPS for "NDArray size" errors).
MAX_AUTO_BATCH = 16
MAX_TRIES = 4  # real steps spent looking beyond batch 2
# A fixed batch whose estimated peak (yem.model.footprint, within 1 % of CUDA's allocator peak on an H100) is under this
# share of the budget needs no measured step to rule out checkpointing: the estimate would have to be off by 2×
# to matter, and a step that runs out of memory still backs off (checkpointing on).
SURE_FIT = 0.5


@dataclass(frozen=True, slots=True)
class BatchSettings:
    batch_size: int | Literal["auto"]
    accumulation: int
    effective: int | None  # keep batch × accumulation at this value (with batch_size auto)
    checkpointing: bool | Literal["auto"]
    max_batch: int = MAX_AUTO_BATCH

    @classmethod
    def from_train(cls, train: TrainParams, processes: int = 1, max_batch: int = MAX_AUTO_BATCH) -> "BatchSettings":
        """What params ask of one of `processes` processes: its share of the effective batch, which params fix
        (train.effective_batch_size, else batch_size × accumulation with auto counting as 1), so memory decides
        only how it is split."""
        return cls(batch_size=train.batch_size, accumulation=train.gradient_accumulation,
                   effective=max(1, train.effective_batch(processes) // processes),
                   checkpointing=train.gradient_checkpointing, max_batch=max_batch)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    batch_size: int
    accumulation: int
    checkpointing: bool
    peak: int | None  # measured peak of one step at this batch (bytes), when it was measured
    why: str  # one line for the log

    @property
    def effective(self) -> int:
        return self.batch_size * self.accumulation

    def metrics(self) -> dict:
        return {"batch_size": self.batch_size, "gradient_accumulation": self.accumulation,
                "gradient_checkpointing": self.checkpointing, "batch_plan": self.why}


class _Probe:
    """`measure` with memory: each (batch, checkpointing) runs once; None means it ran out of memory."""

    def __init__(self, measure: Measure, limit: int):
        self._measure, self.limit, self.peaks = measure, limit, {}

    def __call__(self, batch: int, checkpointing: bool) -> int | None:
        key = (batch, checkpointing)
        if key not in self.peaks:
            try:
                self.peaks[key] = self._measure(batch, checkpointing)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                self.peaks[key] = None
        return self.peaks[key]

    def fits(self, batch: int, checkpointing: bool) -> bool:
        peak = self(batch, checkpointing)
        return peak is not None and peak <= self.limit


def plan_batch(measure: Measure, budget: int, settings: BatchSettings, estimate: Measure | None = None) -> BatchPlan:
    """Decide batch, accumulation and checkpointing; `measure` runs only for what is `auto`, and not for a fixed
    batch that `estimate` (same signature, estimated peak bytes) puts far under the budget."""
    if settings.batch_size != "auto" and settings.checkpointing != "auto":
        return BatchPlan(settings.batch_size, settings.accumulation, settings.checkpointing, None,
                         f"batch {settings.batch_size} × {settings.accumulation} as set in params.yaml")
    probe = _Probe(measure, int(budget * PLAN_MARGIN))
    first = 1 if settings.batch_size == "auto" else settings.batch_size
    checkpointing, words = _checkpointing(settings, first, probe, budget, estimate)
    if settings.batch_size != "auto":
        return BatchPlan(first, settings.accumulation, checkpointing, probe.peaks.get((first, checkpointing)),
                         f"batch {first} × {settings.accumulation} as set in params.yaml; {words}")
    if not probe.fits(1, checkpointing):
        raise too_big(probe(1, checkpointing), budget, checkpointing)
    cap = min(settings.max_batch, settings.effective or settings.max_batch)
    batch, accumulation = _split(_largest_fitting(probe, checkpointing, cap), settings)
    return BatchPlan(batch, accumulation, checkpointing, probe.peaks.get((batch, checkpointing)),
                     f"auto: batch {batch} × {accumulation} accumulation, the largest that fits {PLAN_MARGIN:.0%} "
                     f"of the {gib(budget)} memory budget; {words}")


def _checkpointing(settings: BatchSettings, first: int, probe: _Probe, budget: int,
                   estimate: Measure | None) -> tuple[bool, str]:
    """Checkpointing for the first batch tried, and the words for the plan's log line. `auto` measures that batch
    without it, unless the batch is fixed and the estimate puts it far under the budget."""
    if settings.checkpointing != "auto":
        return settings.checkpointing, f"gradient checkpointing {'on' if settings.checkpointing else 'off'} as set"
    if settings.batch_size != "auto" and estimate is not None and (estimated := estimate(first, False)) <= \
            SURE_FIT * budget:
        return False, (f"gradient checkpointing off (auto: batch {first} needs about {gib(estimated)} by the "
                       f"estimate, under {SURE_FIT:.0%} of the {gib(budget)} budget)")
    if probe.fits(first, False):
        return False, f"gradient checkpointing off (auto: batch {first} fits without it)"
    return True, f"gradient checkpointing on (auto: batch {first} does not fit without it)"


def _largest_fitting(probe: _Probe, checkpointing: bool, cap: int) -> int:
    """The largest batch ≤ cap whose measured peak fits, extrapolating from batch 1 and 2 (batch 1 fits)."""
    if cap == 1 or not probe.fits(2, checkpointing):
        return 1
    base = probe(1, checkpointing)
    good, bad = 2, cap + 1
    candidate = _predict(base, 2, probe(2, checkpointing), probe.limit, cap)
    for _ in range(MAX_TRIES):
        if candidate <= good:
            break
        if probe.fits(candidate, checkpointing):
            good = candidate
            candidate = bad - 1 if bad <= cap else candidate  # the line was pessimistic: stop at the known-good
        else:
            bad, peak = candidate, probe(candidate, checkpointing)
            refit = _predict(base, candidate, peak, probe.limit, cap) if peak is not None else (good + bad) // 2
            candidate = min(refit, bad - 1)
    return good


def _predict(base: int, batch: int, peak: int, limit: int, cap: int) -> int:
    """The largest b with base + (b - 1) × slope ≤ limit, on the line through (1, base) and (batch, peak)."""
    slope = max((peak - base) / (batch - 1), 1.0)  # peaks equal within noise: the cap decides, and is measured
    return max(1, min(cap, 1 + int((limit - base) / slope)))


def _split(batch: int, settings: BatchSettings) -> tuple[int, int]:
    if not settings.effective:
        return batch, settings.accumulation
    fitting = max(d for d in range(1, min(batch, settings.effective) + 1) if settings.effective % d == 0)
    return fitting, settings.effective // fitting


def back_off(plan: BatchPlan, settings: BatchSettings, budget: int) -> BatchPlan:
    """After an out-of-memory error: halve the batch and double accumulation (same effective batch); at batch 1
    turn on checkpointing where it is `auto`; beyond that raise HardwareError with advice."""
    if plan.batch_size > 1:
        total = plan.effective
        batch = max(d for d in range(1, plan.batch_size // 2 + 1) if total % d == 0)
        return BatchPlan(batch, total // batch, plan.checkpointing, None,
                         f"out of memory at batch {plan.batch_size} × {plan.accumulation}: now batch {batch} × "
                         f"{total // batch} (effective batch {total} kept)")
    if not plan.checkpointing and settings.checkpointing == "auto":
        return BatchPlan(1, plan.accumulation, True, None,
                         "out of memory at batch 1: gradient checkpointing on")
    raise too_big(None, budget, plan.checkpointing)


def too_big(peak: int | None, budget: int, checkpointing: bool) -> HardwareError:
    """The error when not even one image per step fits: what it needed, and what to change."""
    needed = "ran out of memory" if peak is None else f"needs {gib(peak)}"
    if not checkpointing:
        return HardwareError(f"train.batch_size: one image per step {needed} without gradient checkpointing, over "
                             f"{PLAN_MARGIN:.0%} of the {gib(budget)} memory budget (got batch 1). Set "
                             f"train.gradient_checkpointing: auto (it keeps far fewer activations), or lower "
                             f"data.resolution.")
    return HardwareError(f"train.batch_size: one image per step {needed} even with gradient checkpointing, over "
                         f"{PLAN_MARGIN:.0%} of the {gib(budget)} memory budget (got batch 1). Lower data.resolution "
                         f"(512 px needs about a quarter of the activations of 1024 px), train a smaller base (SD3.5 "
                         f"medium rather than large), set train.quantize_base: int8 (about half the weights' memory; "
                         f"pip install 'yem[lowmem]'), close other apps or raise device.memory_limit_gib if you "
                         f"lowered it; see `yem doctor`.")

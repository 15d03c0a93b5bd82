"""Batch planning: pure decisions driven by fake `measure` functions with the shapes real peaks have, then the CPU
path for real: planning on a small torch model by peak RSS, and an out-of-memory back-off forced by an artificial
allocation limit, checked to keep the step count and the effective batch (and so the trained weights)."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.test_memory import MAC_16, MAC_64, MPS_OOM_16GB
from yem.errors import HardwareError
from yem.hardware import device, memory, out_of_memory, peaks
from yem.hardware.budget import memory_budget
from yem.hardware.memory import GIB
from yem.model import architecture, footprint
from yem.training import batching
from yem.training.batching import PLAN_MARGIN, BatchPlan, BatchSettings

SD3_MEDIUM = architecture.KNOWN_MODELS["stabilityai/stable-diffusion-3-medium-diffusers"]


def sd3_peaks(resolution: int, backend: str = "mps"):
    """Peaks of SD3-medium training steps in half precision (on MPS unless said), from the calibrated estimate:
    weights + b × activations."""
    def measure(batch: int, checkpointing: bool) -> int:
        work = footprint.Workload(backend=backend, dtype_bytes=2, resolution=resolution, render_resolution=resolution,
                                 batch_size=batch, checkpointing=checkpointing, rank=4, targets=4, use_t5=True,
                                 t5_tokens=77)
        return footprint.train_stage(SD3_MEDIUM, work).total
    return measure


class Recorder:
    """Wraps a measure: counts calls; above `hard_limit` it raises the MPS allocator's error, as a capped Mac does."""

    def __init__(self, measure, hard_limit: int | None = None):
        self.measure, self.hard_limit, self.calls = measure, hard_limit, []

    def __call__(self, batch: int, checkpointing: bool) -> int:
        self.calls.append((batch, checkpointing))
        peak = self.measure(batch, checkpointing)
        if self.hard_limit is not None and peak > self.hard_limit:
            raise RuntimeError(MPS_OOM_16GB)
        return peak


AUTO = BatchSettings(batch_size="auto", accumulation=1, effective=None, checkpointing="auto")


def test_16gb_mac_needs_checkpointing_at_768px_and_cannot_train_1024px():
    budget = memory_budget(MAC_16).bytes
    measure = Recorder(sd3_peaks(768), hard_limit=budget)
    plan = batching.plan_batch(measure, budget, AUTO)
    assert plan.checkpointing and plan.batch_size == 1
    assert measure.calls[0] == (1, False)  # auto checkpointing: batch 1 without it was tried first
    assert "does not fit without it" in plan.why
    with pytest.raises(HardwareError, match="even with gradient checkpointing.*data.resolution"):
        batching.plan_batch(Recorder(sd3_peaks(1024), hard_limit=budget), budget, AUTO)


def test_64gb_mac_fits_more_images_per_step_at_lower_resolution():
    budget = memory_budget(MAC_64).bytes
    at_1024 = batching.plan_batch(sd3_peaks(1024), budget, AUTO)
    at_512 = batching.plan_batch(sd3_peaks(512), budget, AUTO)
    assert at_1024.checkpointing and not at_512.checkpointing  # 1024 px keeps 24 attention matrices without it
    assert at_512.batch_size > at_1024.batch_size
    assert at_512.peak <= PLAN_MARGIN * budget


@pytest.mark.parametrize("base_gib, per_image_gib, budget_gib", [
    (4.2, 3.5, 9.6), (4.2, 3.5, 46.7), (4.2, 0.9, 46.7), (0.2, 0.05, 16.0), (1.0, 2.0, 4.5), (3.0, 0.01, 40.0),
])
def test_the_largest_batch_under_the_margin_is_chosen_for_linear_peaks(base_gib, per_image_gib, budget_gib):
    def peak(batch, checkpointing):
        return int((base_gib + batch * per_image_gib) * GIB)

    measure = Recorder(peak)
    budget = int(budget_gib * GIB)
    plan = batching.plan_batch(measure, budget, BatchSettings("auto", 1, None, False))
    fits = [b for b in range(1, AUTO.max_batch + 1) if peak(b, False) <= PLAN_MARGIN * budget]
    assert plan.batch_size == max(fits)
    assert len(measure.calls) <= 3  # batch 1, 2 and the prediction: the line is exact


def test_superlinear_peaks_are_verified_and_the_chosen_batch_fits():
    def peak(batch, checkpointing):  # fragmentation grows faster than the batch
        return int((4 + 0.8 * batch + 0.15 * batch**2) * GIB)

    budget = 30 * GIB
    measure = Recorder(peak, hard_limit=budget)
    plan = batching.plan_batch(measure, budget, BatchSettings("auto", 1, None, False))
    assert peak(plan.batch_size, False) <= PLAN_MARGIN * budget
    assert (plan.batch_size, False) in measure.calls  # measured, not just predicted
    assert len(measure.calls) <= 2 + batching.MAX_TRIES


def test_noisy_equal_peaks_fall_back_to_measuring_the_cap():
    measure = Recorder(lambda batch, checkpointing: 5 * GIB)  # a sampled peak that did not see the batch grow
    plan = batching.plan_batch(measure, 20 * GIB, BatchSettings("auto", 1, None, False, max_batch=8))
    assert plan.batch_size == 8 and (8, False) in measure.calls


@pytest.mark.parametrize("effective, fitting, expected",
                         [(8, 5, (4, 2)), (7, 5, (1, 7)), (6, 16, (6, 1)), (12, 16, (12, 1))])
def test_effective_batch_is_kept_exactly(effective, fitting, expected):
    def peak(batch, checkpointing):
        return GIB + batch * GIB

    budget = int((1 + fitting) * GIB / PLAN_MARGIN) + 1
    plan = batching.plan_batch(peak, budget, BatchSettings("auto", 1, effective, False))
    assert (plan.batch_size, plan.accumulation) == expected and plan.effective == effective


def test_fixed_settings_are_kept_without_measuring():
    measure = Recorder(lambda batch, checkpointing: pytest.fail("measured"))
    plan = batching.plan_batch(measure, GIB, BatchSettings(batch_size=2, accumulation=3, effective=None,
                                                          checkpointing=True))
    assert (plan.batch_size, plan.accumulation, plan.checkpointing) == (2, 3, True) and plan.peak is None


def test_fixed_batch_with_auto_checkpointing_measures_that_batch_once():
    measure = Recorder(sd3_peaks(512))
    plan = batching.plan_batch(measure, memory_budget(MAC_16).bytes, BatchSettings(2, 2, None, "auto"))
    assert (plan.batch_size, plan.accumulation, plan.checkpointing) == (2, 2, True)
    assert measure.calls == [(2, False)]


def test_a_fixed_batch_far_under_the_budget_by_the_estimate_is_not_measured():
    budget = 80 * GIB  # an H100
    estimated = sd3_peaks(1024, "cuda")  # SD3-medium, ~8 GiB by the estimate
    plan = batching.plan_batch(Recorder(lambda batch, checkpointing: pytest.fail("measured")), budget,
                               BatchSettings(1, 1, None, "auto"), estimated)
    assert (plan.batch_size, plan.checkpointing, plan.peak) == (1, False, None)
    assert "by the estimate" in plan.why
    # near the budget the estimate is not trusted: the step is measured (and here needs checkpointing)
    tight = 8 * GIB
    measure = Recorder(sd3_peaks(1024, "cuda"))
    plan = batching.plan_batch(measure, tight, BatchSettings(1, 1, None, "auto"), estimated)
    assert measure.calls == [(1, False)] and plan.checkpointing
    # batch auto always measures: the estimate only spares the step that decides checkpointing for a fixed batch
    measure = Recorder(sd3_peaks(1024, "cuda"))
    batching.plan_batch(measure, budget, AUTO, estimated)
    assert (1, False) in measure.calls


def test_nothing_fits_explains_what_to_change():
    tiny_budget = 2 * GIB  # below SD3-medium's weights
    with pytest.raises(HardwareError) as found:
        batching.plan_batch(Recorder(sd3_peaks(1024), hard_limit=tiny_budget), tiny_budget, AUTO)
    message = str(found.value)
    assert message.startswith("train.batch_size:") and "data.resolution" in message and "(got batch 1)" in message
    with pytest.raises(HardwareError, match="gradient_checkpointing: auto"):
        batching.plan_batch(sd3_peaks(768), memory_budget(MAC_16).bytes, BatchSettings("auto", 1, None, False))


def test_errors_that_are_not_out_of_memory_are_not_swallowed():
    def broken(batch, checkpointing):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        batching.plan_batch(broken, GIB, AUTO)


def test_back_off_halves_the_batch_keeps_the_effective_batch_then_checkpoints_then_gives_advice():
    plan = BatchPlan(8, 1, False, None, "")
    seen = []
    with pytest.raises(HardwareError, match="data.resolution"):
        for _ in range(10):
            plan = batching.back_off(plan, AUTO, 16 * GIB)
            seen.append((plan.batch_size, plan.accumulation, plan.checkpointing))
    assert seen == [(4, 2, False), (2, 4, False), (1, 8, False), (1, 8, True)]
    odd = batching.back_off(BatchPlan(3, 2, True, None, ""), AUTO, GIB)
    assert (odd.batch_size, odd.accumulation) == (1, 6)
    fixed = BatchSettings(1, 1, None, False)
    with pytest.raises(HardwareError, match="gradient_checkpointing: auto"):
        batching.back_off(BatchPlan(1, 4, False, None, ""), fixed, GIB)


def test_plan_metrics_name_what_the_model_card_shows():
    plan = BatchPlan(2, 4, True, 3 * GIB, "auto: ...")
    assert plan.metrics() == {"batch_size": 2, "gradient_accumulation": 4, "gradient_checkpointing": True,
                              "batch_plan": "auto: ..."}


# ---- the CPU, for real --------------------------------------------------------------------------------------------

WIDTH, HIDDEN, TOKENS, LAYERS = 32, 4096, 128, 4  # activations ~16 MiB per sample, little compute


class Net(torch.nn.Module):
    """Residual MLP blocks; each keeps 2 × HIDDEN floats per token for backward, or only its input when
    checkpointed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(WIDTH, HIDDEN), torch.nn.GELU(),
                                                              torch.nn.Linear(HIDDEN, WIDTH)) for _ in range(LAYERS))
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            step = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
            x = x + step
        return x


def measure_rss(net: Net):
    """The training loop's measure on the CPU: one forward + backward, peak RSS by peaks.peak_bytes."""
    def measure(batch: int, checkpointing: bool) -> int:
        net.checkpointing = checkpointing
        device.empty_cache("cpu")
        peaks.reset_peak("cpu")
        net(torch.randn(batch, TOKENS, WIDTH)).square().mean().backward()
        net.zero_grad(set_to_none=True)
        return peaks.peak_bytes("cpu")
    return measure


def test_planning_on_the_cpu_for_real():
    net = Net()
    device.empty_cache("cpu")
    baseline = memory.used_bytes("cpu")
    per_sample = LAYERS * TOKENS * 2 * HIDDEN * 4  # what autograd keeps; RSS grows by more (allocator arenas)

    def budget(samples: int) -> int:  # the planner keeps 10 % of the whole budget free, baseline included
        return int((baseline + samples * per_sample) / PLAN_MARGIN)

    settings = BatchSettings("auto", 1, None, "auto", max_batch=8)
    roomy = batching.plan_batch(measure_rss(net), budget(100), settings)
    assert roomy.batch_size == 8 and not roomy.checkpointing and roomy.peak <= PLAN_MARGIN * budget(100)
    tight = batching.plan_batch(measure_rss(net), budget(6), settings)
    assert tight.batch_size < roomy.batch_size and tight.peak <= PLAN_MARGIN * budget(6)
    with pytest.raises(HardwareError):
        batching.plan_batch(measure_rss(net), baseline // 2, settings)


class AllocationLimit(TorchDispatchMode):
    """A device allocator with a hard limit, on the CPU: counts the bytes of tensors created inside it and raises
    MemoryError when they pass `limit`, as MPS raises at its high watermark."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.live, self.peak, self.known = limit, 0, 0, set()

    def _freed(self, key: int, size: int) -> None:
        self.known.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable or any(r.alias_info is not None for r in func._schema.returns):
            return out  # in-place ops and views allocate nothing
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.known:
                storage = tensor.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if self.live + size > self.limit:
                    raise MemoryError(f"fake allocator: {size} bytes over the {self.limit} byte limit")
                self.known.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, size)
        return out


def train(net: Net, steps: int, plan: BatchPlan, settings: BatchSettings, limit: int | None) -> tuple[BatchPlan, list]:
    """The loop the integration runs: an optimizer step over plan.accumulation micro-batches, retried with the
    backed-off plan after an out-of-memory error. The data of a step is fixed by the step, not by the plan."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    events = []
    for step in range(steps):
        data = torch.randn(plan.effective, TOKENS, WIDTH, generator=torch.Generator().manual_seed(step))
        while True:
            try:
                with AllocationLimit(limit or 2**62):
                    for chunk in data.split(plan.batch_size):
                        (net(chunk).square().mean() / plan.accumulation).backward()
                break
            except Exception as error:
                if not out_of_memory.is_out_of_memory(error):
                    raise
                optimizer.zero_grad(set_to_none=True)  # the failed attempt's partial gradients
                plan = batching.back_off(plan, settings, limit)
                events.append(plan.why)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return plan, events


def test_out_of_memory_backs_off_for_real_and_trains_the_same_steps():
    settings = BatchSettings("auto", 1, 8, "auto")
    with AllocationLimit(2**62) as probe:  # how much one micro-batch of 2 holds at its peak
        Net()(torch.randn(2, TOKENS, WIDTH)).square().mean().backward()
    limit = int(probe.peak * 1.5)  # room for 2 images per micro-batch, not 4
    reference = Net()
    train(reference, 2, BatchPlan(8, 1, False, None, ""), settings, None)
    backed_off = Net()
    plan, events = train(backed_off, 2, BatchPlan(8, 1, False, None, ""), settings, limit)
    assert (plan.batch_size, plan.accumulation, plan.checkpointing) == (2, 4, False)
    assert len(events) == 2 and all("effective batch 8 kept" in e for e in events)
    for mine, theirs in zip(backed_off.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)  # same steps, same effective batch


def test_out_of_memory_at_batch_one_with_checkpointing_stops_with_advice():
    settings = BatchSettings("auto", 1, 2, "auto")
    with pytest.raises(HardwareError, match="even with gradient checkpointing"):
        train(Net(), 1, BatchPlan(2, 1, False, None, ""), settings, limit=64 * 1024)

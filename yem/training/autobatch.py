"""Fitting training into memory while it runs: real steps decide the batch, and an out-of-memory error backs off.

yem.training.batching decides from measured peaks; this module measures them on the real model and data (one
forward and backward per candidate, no optimizer step, no training randomness consumed) and applies the decisions.
"""

import torch

from yem.data import trainset
from yem.data.trainset import TrainingSet
from yem.hardware import device, peaks
from yem.model import attention, footprint
from yem.model.architecture import Architecture
from yem.params import TrainParams
from yem.training import batching
from yem.training.objective import batch_loss


def plan(transformer: torch.nn.Module, data: TrainingSet, sigma_table: torch.Tensor, settings: TrainParams,
         dtype: torch.dtype, budget: int | None, processes: int, draw_u, arch: Architecture | None = None,
         work: footprint.Workload | None = None) -> batching.BatchPlan:
    """Batch, accumulation and checkpointing for this run; measured only where params say `auto` (and, for a
    fixed batch, only where the estimate of `work` on `arch` does not settle it)."""
    cap = batching.MAX_AUTO_BATCH if work is None else min(batching.MAX_AUTO_BATCH, largest_batch(arch, work))
    wanted = batching.BatchSettings.from_train(settings, processes, max_batch=cap)  # every process takes its share
    if budget is None:  # nothing to plan against: one image per forward pass, checkpointing only if asked
        batch = 1 if settings.batch_size == "auto" else settings.batch_size
        return batching.BatchPlan(batch, max(1, wanted.effective // batch), settings.gradient_checkpointing is True,
                                  None, "no memory budget: batch as set")
    backend = sigma_table.device.type
    generator = torch.Generator(sigma_table.device)

    def measure(batch: int, checkpointing: bool) -> int:
        set_checkpointing(transformer, checkpointing)
        device.empty_cache(backend)
        peaks.reset_peak(backend)
        sample = trainset.largest_batch(data, batch, settings, draw_u, generator)
        try:
            with device.autocast(backend, dtype):
                batch_loss(transformer, sample, sigma_table, settings, dtype, batch).backward()
            device.synchronize(backend)
            return peaks.peak_bytes(backend)
        finally:
            transformer.zero_grad(set_to_none=True)

    estimated = None if arch is None or work is None else footprint.training_peak(arch, work)
    return batching.plan_batch(measure, budget, wanted, estimated)


def largest_batch(arch: Architecture | None, work: footprint.Workload) -> int:
    """The largest batch whose attention scores MPSGraph can hold, where SDPA materialises them in one tensor
    (2³¹ elements: SD3 at 1024 px fails at batch 5); chunked attention sizes its chunks to any batch."""
    if arch is None:
        return batching.MAX_AUTO_BATCH
    tokens = footprint.attention_tokens(arch, work)  # of the largest bucket
    return attention.largest_sdpa_batch(work.attention, work.backend, arch.heads, tokens) or batching.MAX_AUTO_BATCH


def set_checkpointing(transformer: torch.nn.Module, on: bool) -> None:
    if on:
        transformer.enable_gradient_checkpointing()
    elif transformer.is_gradient_checkpointing:
        transformer.disable_gradient_checkpointing()

"""Fitting training into memory while it runs: real steps decide the batch, and an out-of-memory error backs off.

yem.training.batching decides from measured peaks; this module measures them on the real model and data (one
forward and backward per candidate, no optimizer step, no training randomness consumed) and applies the decisions.
"""

import math

import torch

from yem.data import trainset
from yem.data.trainset import TrainingSet
from yem.hardware import device, peaks
from yem.model import footprint
from yem.model.architecture import Architecture
from yem.params import TrainParams
from yem.training import batching
from yem.training.objective import batch_loss


def plan(transformer: torch.nn.Module, data: TrainingSet, sigma_table: torch.Tensor, settings: TrainParams,
         dtype: torch.dtype, budget: int | None, processes: int, draw_u,
         arch: Architecture | None = None) -> batching.BatchPlan:
    """Batch, accumulation and checkpointing for this run; measured only where params say `auto` (and, for a
    fixed batch, only where the estimate from `arch` does not settle it)."""
    wanted = batching.BatchSettings.from_train(settings, processes)  # every process takes its share
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

    estimated = None if arch is None else footprint.training_peak(
        arch, settings, backend, dtype.itemsize, size=max((s.size for s in data.stacks), key=math.prod),
        text_tokens=data.joint.shape[1], images=len(data.ids), prompts=len(data.joint))
    return batching.plan_batch(measure, budget, wanted, estimated)


def set_checkpointing(transformer: torch.nn.Module, on: bool) -> None:
    if on:
        transformer.enable_gradient_checkpointing()
    elif transformer.is_gradient_checkpointing:
        transformer.disable_gradient_checkpointing()

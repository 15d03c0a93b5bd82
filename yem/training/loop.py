"""The training loop: SD3 flow matching on cached latents and prompt embeddings, a peft LoRA, accelerate.

No VAE and no text encoder is ever loaded here. Everything random is a function of (seed, step): the data order
of each epoch, the flips, the noise and the sigmas. So a resumed run replays exactly what an uninterrupted run
would have done, whatever happened in between. Setting the run up is yem.training.setup's; its state, checkpoints
and rollbacks are yem.training.state's.
"""

import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from yem import atomic, progress
from yem.data import cache, trainset
from yem.errors import StopRequested
from yem.hardware import device, fallbacks, memory, out_of_memory, peaks, power
from yem.hardware.record import Hardware
from yem.model import lora, lora_file
from yem.params import ModelParams, ThermalParams, TrainParams
from yem.training import autobatch, batching, checkpoint, effect, scaling, setup
from yem.training.metrics import TrainResult
from yem.training.objective import batch_loss, heldout_loss
from yem.training.state import Run, agreed, respect_heat, resume_or_start, roll_back, save_checkpoint
from yem.training.stop import StopRequest, stop_requests

LOG_EVERY = 10  # steps between reads of the loss from the device (each read waits for the device)


def run_training(model: ModelParams, settings: TrainParams, hardware: Hardware, latents_dir: Path, embeds_dir: Path,
                 out_dir: Path, project_root: Path, heat: ThermalParams | None = None) -> TrainResult | None:
    """Train the adapter (resuming from the newest checkpoint of this exact run) and save it to `out_dir`.

    The loop runs in windows of up to LOG_EVERY steps queued on the device without waiting for it; at the end
    of a window it reads the losses back (the only wait), then rolls back, checkpoints or stops as needed.
    """
    with fallbacks.watching(hardware.backend) as watch:  # from before the model loads: every op MPS lacks
        started, startup = time.perf_counter(), setup.Startup()
        startup.mark("imports")
        run = setup.prepare(model, settings, hardware, latents_dir, embeds_dir, project_root,
                            heat or ThermalParams(policy="pause", max_pause_s=600), startup)
        resume_or_start(run)
        resumed_from = run.log.step
        startup.mark("first_step")
        peaks.reset_peak(hardware.backend)
        for warning in filter(None, [power.battery_warning()]):
            progress.note(warning)
        with stop_requests() as stop, power.keep_awake(), progress.bar(settings.steps, "train", "step") as bar:
            train_to_the_end(run, stop, bar, startup)
        result = finish(run, out_dir, hardware, latents_dir, resumed_from, started, startup, watch.report())
    return result if run.accelerator.is_main_process else None


def train_to_the_end(run: Run, stop: StopRequest, bar, startup: setup.Startup) -> None:
    """Window after window up to the last step, rolling back, cooling down, checkpointing or stopping as needed."""
    settings, first = run.settings, run.log.step
    bar.update(run.log.step)
    while run.log.step < settings.steps:
        # what MPS runs on the CPU, timed in one window: not the first, which warms up (compiles, fills caches)
        with fallbacks.sample("train") if run.log.step > first else nullcontext():
            reading, seconds = train_window(run, stop, bar)
        startup.mark("first_window")  # compiling included
        stop.signal = agreed(run, stop.signal)  # every process stops at the same step
        if run.log.bad_streak >= settings.max_bad_steps:
            roll_back(run)
            bar.reset(settings.steps)
            bar.update(run.log.step)
            continue
        if run.log.step == settings.steps:
            break
        respect_heat(run, reading, seconds)
        if run.log.step % settings.checkpoint_every == 0 or stop:
            save_checkpoint(run)
        if stop:
            raise StopRequested(f"train: stopped on request after step {run.log.step}/{settings.steps}; "
                                f"checkpoint saved in {run.run_dir}. Run the same command again to resume.")


def train_window(run: Run, stop: StopRequest, bar) -> tuple:
    """Queue steps up to the next sync point (or a stop request), then read their losses back once.
    Returns the device's thermal reading and the seconds per step of the window."""
    settings, log, start = run.settings, run.log, run.log.step
    every = settings.checkpoint_every
    end = min((start // LOG_EVERY + 1) * LOG_EVERY, (start // every + 1) * every, settings.steps)
    clock, losses, lrs = time.perf_counter(), [], []
    for step in range(start, end):
        lrs.append(run.scheduler.get_last_lr()[0])
        losses.append(update_within_memory(run, step))
        if stop and run.accelerator.num_processes == 1:  # several processes stop together, at the window's end
            break
    values = run.accelerator.reduce(torch.stack(losses), "mean").tolist()  # the window's only wait
    seconds = (time.perf_counter() - clock) / len(values)
    reading = run.sensor.read()
    log.rows += log_rows(start, values, lrs, seconds, run.accelerator.device.type, reading.state.value)
    log.step = start + len(values)
    log.nonfinite_steps += int(run.bad_in_window)
    log.scaler_skipped_steps += int(run.overflow_in_window)
    log.bad_streak = int(run.bad_streak)
    run.bad_in_window.zero_()
    run.overflow_in_window.zero_()
    bar.update(len(values))
    budget = f"/{memory.gib(run.budget)}" if run.budget else ""
    bar.set_postfix(loss=f"{values[-1]:.4f}", s_step=f"{seconds:.3f}",
                    mem=f"{memory.gib(log.rows[-1]['memory_gib'] * memory.GIB)}{budget}",
                    swap=watch_swap(run), heat=reading.state.label)
    return reading, seconds


def update(run: Run, step: int) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches; returns the step's loss, left on the device.

    A non-finite loss or gradient skips the update (parameters and Adam state untouched) and is counted; in
    fp16 the loss is scaled (yem.training.scaling), and an overflow of the scale is skipped and counted apart.
    """
    settings, accelerator, plan = run.settings, run.accelerator, run.plan
    if run.graphs:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer needed
    total = torch.zeros((), device=accelerator.device)
    world = accelerator.num_processes
    for micro in range(plan.accumulation):
        start = (micro * world + accelerator.process_index) * plan.batch_size  # this share's place in the step
        batch = trainset.micro_batch(run.data, step, start, plan.batch_size, plan.effective * world, settings,
                                     run.draw_u, run.generator)
        syncing = nullcontext() if micro == plan.accumulation - 1 else accelerator.no_sync(run.model)
        with syncing, device.autocast(accelerator.device.type, run.dtype):
            loss = batch_loss(run.model, batch, run.sigma_table, settings, run.dtype, plan.batch_size)
            accelerator.backward(run.scaler.scale(loss / plan.accumulation))
        total += loss.detach() / plan.accumulation
    run.scaler.unscale_(run.optimizer)  # the LoRA's gradients at their true size, before clipping
    norm = accelerator.clip_grad_norm_(run.params, settings.max_grad_norm or math.inf)
    bad, overflow = scaling.verdict(run.scaler, total, norm)  # () bools, left on the device
    skip = bad | overflow
    if run.skips_on_device:
        run.optimizer.found_inf = skip.float()  # read by fused AdamW: skips params, moments and step count
        run.optimizer.step()
    elif not skip.item():
        run.optimizer.step()
    run.scaler.update()  # halves the scale after an overflow, doubles it after a long clean stretch
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.bad_in_window += bad
    run.overflow_in_window += overflow
    run.bad_streak.mul_(skip).add_(bad)  # +1 on a bad step, kept on an overflow, back to 0 on a good one
    return total


def update_within_memory(run: Run, step: int) -> torch.Tensor:
    """`update`, retried with half the batch and twice the accumulation when the device runs out of memory:
    the step covers the same samples with the same noise, so the effective batch and the result stay."""
    while True:
        try:
            return update(run, step)
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
            if not out_of_memory.is_out_of_memory(error):
                raise
        run.optimizer.zero_grad(set_to_none=True)
        back_off(run, step, "out of memory")


def back_off(run: Run, step: int, reason: str) -> None:
    """Half the batch, twice the accumulation (same effective batch); checkpointing at batch 1 if auto."""
    device.empty_cache(run.accelerator.device.type)
    run.plan = batching.back_off(run.plan, batching.BatchSettings.from_train(run.settings), run.budget)
    autobatch.set_checkpointing(run.transformer, run.plan.checkpointing)
    run.heat.rebase()  # less work per micro-batch: the old step time is no reference
    run.log.backoffs.append({"step": step, "reason": reason, "plan": run.plan.why})
    progress.note(f"train: step {step + 1}, {reason}: {run.plan.why}")


def watch_swap(run: Run) -> str:
    """Swap that keeps growing is memory pressure on a unified-memory Mac: back off before it thrashes.
    Returns the swap in use, for the display."""
    readings = memory.read(run.accelerator.device.type)
    run.swap.append(readings.swap_used)
    pressure = agreed(run, out_of_memory.memory_pressure(run.swap, readings.pressure_level))  # all or none
    if pressure and run.plan.batch_size > 1:
        back_off(run, run.log.step, pressure)
        run.swap.clear()
    return memory.gib(readings.swap_used)


def finish(run: Run, out_dir: Path, hardware: Hardware, latents_dir: Path, resumed_from: int, started: float,
           startup: setup.Startup, fell_back: fallbacks.FallbackReport) -> TrainResult:
    """Measure, write the final adapter (with the intermediate ones) to `out_dir`, drop the checkpoints."""
    backend, settings, log = hardware.backend, run.settings, run.log
    # Before training the adapter is the identity (B = 0), so the base model alone gives the "before" value.
    # Measured here, after training, it keeps the launch-to-first-step time short and uses the same dtype as
    # "after" even when a rollback switched to fp32.
    with lora.disabled(run.transformer):
        before = heldout_loss(run.model, run.data, run.dtype)
    after = heldout_loss(run.model, run.data, run.dtype)
    moved = effect.measure(run.transformer, before, after)  # a LoRA that changes nothing is said so, not shipped
    if run.accelerator.is_main_process:
        snapshots = lora_file.snapshots_dir(run.run_dir)
        with atomic.staged_dir(out_dir) as staging:
            lora.save(run.transformer, staging / lora_file.WEIGHT_NAME,
                      {**run.provenance, "yem.steps": str(settings.steps)})
            if snapshots.is_dir():
                shutil.copytree(snapshots, staging / snapshots.name)
        checkpoint.discard(run.run_dir)
    facts = {"backend": backend, "dtype": log.dtype, "device_name": device.device_name(backend),
             "torch": torch.__version__, "resolution": cache.read_index(latents_dir)["resolution"],
             "nonfinite_steps": log.nonfinite_steps, "rollbacks": len(log.rollbacks),
             "loss_scale_skipped_steps": log.scaler_skipped_steps,
             "loss_scale": run.scaler.get_scale() if run.scaler.is_enabled() else None,  # fp16 only
             "learning_rate_scale": log.lr_scale, "os": device.os_name(),
             "launch_to_first_step_s": startup.seconds["first_step"], "startup_s": startup.seconds,
             "memory_total_gib": round(memory.total_bytes(backend) / memory.GIB, 1), **run.heat.metrics(),
             "batch_plan": run.plan.why, "memory_backoffs": len(log.backoffs), "attention": run.attention,
             "buckets": run.data.sizes(), **moved.metrics(),
             # MPS ops that ran on the CPU (should be none), and their share of the sampled window's time
             "cpu_fallback_ops": fell_back.summary(), "cpu_fallback_share": fell_back.share}
    facts = {k: v for k, v in facts.items() if v is not None}  # DVC's metrics leave out nulls: so does the file
    return TrainResult(steps=settings.steps, rows=log.rows, heldout_before=before,
                       heldout_after=after, batch_size=run.plan.batch_size,
                       gradient_accumulation=run.plan.accumulation,
                       gradient_checkpointing=run.transformer.is_gradient_checkpointing,
                       world_size=run.accelerator.num_processes,
                       peak_memory_gib=peaks.peak_bytes(backend) / memory.GIB,
                       wall_s=time.perf_counter() - started, resumed_from=resumed_from, facts=facts,
                       warnings=list(filter(None, [moved.warning()])))


def log_rows(first_step: int, losses: list[float], lrs: list[float], seconds: float, backend: str,
             heat: int) -> list[dict]:
    """One TSV row per step; `heat` is the thermal state's number (-1 unknown, 0 nominal … 3 critical)."""
    memory_gib = memory.used_bytes(backend) / memory.GIB
    return [{"step": first_step + i + 1, "loss": loss, "lr": lr, "s_per_step": seconds, "memory_gib": memory_gib,
             "thermal": heat} for i, (loss, lr) in enumerate(zip(losses, lrs))]

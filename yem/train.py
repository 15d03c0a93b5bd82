"""The training loop: SD3 flow matching on cached latents and prompt embeddings, a peft LoRA, accelerate.

No VAE and no text encoder is ever loaded here. Everything random is a function of (seed, step): the data order
of each epoch, the flips, the noise and the sigmas. So a resumed run replays exactly what an uninterrupted run
would have done, whatever happened in between.
"""

import dataclasses
import math
import shutil
import time
from pathlib import Path

import psutil
import torch

from yem import (atomic, autobatch, batching, cache, checkpoint, device, estimate, flow, lora, lora_file, memory,
                 objective, power, progress, sd3, thermal, trainset)
from yem.errors import ModelError, TrainingStopped
from yem.interrupt import stop_requests
from yem.metrics import TrainResult
from yem.objective import batch_loss, heldout_loss
from yem.params import ModelParams, ThermalParams, TrainParams
from yem.run import SNAPSHOTS, Run, agreed, respect_heat, restore, roll_back, save_checkpoint, snapshot
from yem.trainset import TrainingSet

LOG_EVERY = 10  # steps between reads of the loss from the device (each read waits for the device)
# torch.compile mode of the transformer blocks. On CUDA, CUDA graphs ("reduce-overhead") replay each block's
# thousands of small kernels in one launch: the step is bound by launching them otherwise (benchmarks/RESULTS.md).
COMPILE_MODES = {"cuda": "reduce-overhead"}
# train.compile auto compiles on CUDA only for runs at least this long. H100, SD3-medium, 1024 px: compiling takes
# 25-32 s (8-11 s when inductor's on-disk cache holds the same shapes from an earlier run) and saves 0.055-0.12 s
# a step (eager 0.119-0.188 s, compiled 0.064-0.067 s, depending on the host), so it pays off after 70-580 steps
# (benchmarks/RESULTS.md).
COMPILE_MIN_STEPS = 400


def run_training(model: ModelParams, settings: TrainParams, hardware: dict, latents_dir: Path, embeds_dir: Path,
                 out_dir: Path, project_root: Path, heat: ThermalParams | None = None) -> TrainResult | None:
    """Train the adapter (resuming from the newest checkpoint of this exact run) and save it to `out_dir`.

    The loop runs in windows of up to LOG_EVERY steps queued on the device without waiting for it; at the end
    of a window it reads the losses back (the only wait), then rolls back, checkpoints or stops as needed.
    """
    started, startup = time.perf_counter(), Startup()
    startup.mark("imports")
    run = prepare(model, settings, hardware, latents_dir, embeds_dir, project_root,
                  heat or ThermalParams(policy="pause", max_pause_s=600), startup)
    log = start_or_resume(run)
    resumed_from = log["step"]
    startup.mark("first_step")
    memory.reset_peak(hardware["backend"])
    for warning in filter(None, [power.battery_warning()]):
        progress.note(warning)
    with stop_requests() as stop, device.cpu_fallbacks() as fell_back, power.keep_awake(), \
            progress.bar(settings.steps, "train", "step") as bar:
        bar.update(log["step"])
        while log["step"] < settings.steps:
            reading, seconds = train_window(run, log, stop, bar)
            startup.mark("first_window")  # compiling included
            stop[:] = agreed(run, list(stop))  # every process stops at the same step
            if log["bad_streak"] >= settings.max_bad_steps:
                roll_back(run, log)
                bar.reset(settings.steps)
                bar.update(log["step"])
                continue
            if log["step"] == settings.steps:
                break
            respect_heat(run, log, reading, seconds)
            if log["step"] % settings.checkpoint_every == 0 or stop:
                save_checkpoint(run, log)
            if stop:
                raise TrainingStopped(f"train: stopped by {stop[0]} after step {log['step']}/{settings.steps}; "
                                      f"checkpoint saved in {run.run_dir}. Rerun `dvc repro` (or the same "
                                      f"command) to resume.")
    log["cpu_fallback_ops"] = fell_back  # MPS ops that ran on the CPU during training (should be none)
    result = finish(run, log, out_dir, hardware, latents_dir, resumed_from, started, startup)
    return result if run.accelerator.is_main_process else None


@dataclasses.dataclass
class Startup:
    """Seconds from the launch of the process (imports included) to each point on the way to full speed: imports,
    loaded, assembled, first_step, and first_window (the first LOG_EVERY steps done: on CUDA the blocks compile
    in it). Where a run's start-up time goes (metrics: startup_s)."""
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def mark(self, point: str) -> None:
        """Record the first time the run gets to `point`."""
        if point not in self.seconds:
            self.seconds[point] = round(time.time() - psutil.Process().create_time(), 2)


def prepare(model: ModelParams, settings: TrainParams, hardware: dict, latents_dir: Path, embeds_dir: Path,
            project_root: Path, heat: ThermalParams, startup: Startup) -> Run:
    """Load the cached data and the transformer for `model`, then assemble the run."""
    backend, dtype = hardware["backend"], getattr(torch, hardware["dtype"])
    accelerator = make_accelerator(backend, heat)
    budget = memory.Budget(int(hardware["memory_budget_gib"] * memory.GIB), "build/preflight.json")
    progress.note(memory.apply_budget(budget, memory.read(backend)), prefix="memory")
    transformer = sd3.quantize_frozen_base(sd3.load_transformer(model, dtype, accelerator.device),
                                           settings.quantize_base)
    data = trainset.load_training_set(latents_dir, embeds_dir, accelerator.device)
    startup.mark("loaded")
    run = assemble(accelerator, transformer, data, sd3.load_training_scheduler(model).sigmas, settings, dtype, heat,
                   run_dir=checkpoint.checkpoints_root(project_root) / run_fingerprint(
                       model, settings, hardware, latents_dir, embeds_dir, accelerator.num_processes),
                   provenance=provenance(model, settings, latents_dir, embeds_dir), budget=budget.bytes,
                   arch=architecture(model))
    startup.mark("assembled")
    return run


def architecture(model: ModelParams) -> estimate.Architecture | None:
    """The model's architecture for the memory estimate; None (the planner measures instead) if yem cannot tell."""
    try:
        return estimate.architecture_for(model.id, model.revision)
    except ModelError:
        return None


def make_accelerator(backend: str, heat: ThermalParams):
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    device.fast_math(backend)
    # other ranks wait in a collective while rank 0 pauses for heat: give them longer than the longest pause
    patience = InitProcessGroupKwargs(timeout=timedelta(seconds=heat.max_pause_s + 900))
    return Accelerator(cpu=backend == "cpu", kwargs_handlers=[patience])


def assemble(accelerator, transformer: torch.nn.Module, data: TrainingSet, sigma_table: torch.Tensor,
             settings: TrainParams, dtype: torch.dtype, heat: ThermalParams, run_dir: Path,
             provenance: dict[str, str], budget: int | None = None, arch: estimate.Architecture | None = None) -> Run:
    """Attach the adapter, fit the batch to the memory `budget` (`arch` lets the estimate spare a measured step),
    set up optimizer and schedule, and wrap the model for (distributed) training."""
    from diffusers.optimization import get_scheduler

    backend = accelerator.device.type
    torch.manual_seed(settings.seed)  # peft draws lora_A from the global generator (B starts at zero)
    params = lora.attach(transformer, settings.rank, settings.alpha, settings.targets)
    transformer.train()
    draw_u = objective.timestep_density(settings, accelerator.device)
    sigma_table = sigma_table.to(accelerator.device, torch.float32)
    plan = autobatch.plan(transformer, data, sigma_table, settings, dtype, budget, accelerator.num_processes, draw_u,
                          arch)
    autobatch.set_checkpointing(transformer, plan.checkpointing)
    graphs = compile_blocks(transformer, backend, settings)
    optimizer, fused = adamw(params, settings)
    scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                              num_training_steps=settings.steps)
    zero = torch.zeros((), dtype=torch.int64, device=accelerator.device)
    return Run(accelerator=accelerator, model=accelerator.prepare(transformer), transformer=transformer,
               params=params, optimizer=optimizer, skips_on_device=fused, scheduler=scheduler, data=data,
               sigma_table=sigma_table, dtype=dtype, settings=settings, plan=plan, budget=budget,
               generator=torch.Generator(accelerator.device), draw_u=draw_u,
               run_dir=run_dir, provenance=provenance, bad_streak=zero.clone(), bad_in_window=zero.clone(),
               sensor=thermal.detect(backend),
               # on a CPU other processes swing step time far more than heat does: watch the sensor only
               heat=thermal.Governor(heat.policy, heat.max_pause_s, watch_speed=backend != "cpu"), graphs=graphs)


def compile_blocks(transformer: torch.nn.Module, backend: str, settings: TrainParams) -> bool:
    """Regional torch.compile: each transformer block on its own, so the identical blocks share one
    compilation. Returns whether the blocks replay CUDA graphs."""
    if not compiles(settings, backend):
        return False
    from torch._functorch import config as functorch_config

    # Below 1, the partitioner keeps only this share of the activations for backward and recomputes the rest
    # (cheap pointwise ops first) inside the fused backward: far less time than checkpointing whole blocks.
    functorch_config.activation_memory_budget = settings.saved_activations
    mode = COMPILE_MODES.get(backend, "default")
    for block in transformer.transformer_blocks:
        block.compile(dynamic=False, mode=mode)
    return mode == "reduce-overhead"


def compiles(settings: TrainParams, backend: str) -> bool:
    """train.compile as set; auto: on CUDA, for runs long enough to win the compile time back."""
    if settings.compile == "auto":
        return backend == "cuda" and settings.steps >= COMPILE_MIN_STEPS
    return settings.compile


def adamw(params: list[torch.nn.Parameter], settings: TrainParams) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW, fused where the device has the kernel (faster, and it can skip an update on the device)."""
    kwargs = {"lr": settings.learning_rate, "weight_decay": settings.weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs), True
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.AdamW(params, **kwargs), False


def start_or_resume(run: Run) -> dict:
    """The run log: restored from the newest checkpoint of this run, or fresh."""
    state = checkpoint.load_latest(run.run_dir)
    if state is not None:
        restore(run, state, state.log)
        run.heat.totals = thermal.Totals(**state.log.get("thermal", {}))
        return state.log
    log = {"step": 0, "rows": [], "nonfinite_steps": 0, "bad_streak": 0, "rollbacks": [], "lr_scale": 1.0,
           "dtype": str(run.dtype)[6:]}
    run.initial = snapshot(run, log)
    return log


def train_window(run: Run, log: dict, stop: list[str], bar) -> tuple[thermal.Reading, float]:
    """Queue steps up to the next sync point (or a stop request), then read their losses back once.
    Returns the device's thermal reading and the seconds per step of the window."""
    settings, start = run.settings, log["step"]
    every = settings.checkpoint_every
    end = min((start // LOG_EVERY + 1) * LOG_EVERY, (start // every + 1) * every, settings.steps)
    clock, losses, lrs = time.perf_counter(), [], []
    for step in range(start, end):
        lrs.append(run.scheduler.get_last_lr()[0])
        losses.append(update_within_memory(run, log, step))
        if stop and run.accelerator.num_processes == 1:  # several processes stop together, at the window's end
            break
    values = run.accelerator.reduce(torch.stack(losses), "mean").tolist()  # the window's only wait
    seconds = (time.perf_counter() - clock) / len(values)
    reading = run.sensor.read()
    log["rows"] += log_rows(start, values, lrs, seconds, run.accelerator.device.type, reading.state.value)
    log["step"] = start + len(values)
    log["nonfinite_steps"] += int(run.bad_in_window)
    log["bad_streak"] = int(run.bad_streak)
    run.bad_in_window.zero_()
    bar.update(len(values))
    budget = f"/{memory.gib(run.budget)}" if run.budget else ""
    bar.set_postfix(loss=f"{values[-1]:.4f}", s_step=f"{seconds:.3f}",
                    mem=f"{memory.gib(log['rows'][-1]['memory_gib'] * memory.GIB)}{budget}",
                    swap=watch_swap(run, log), heat=reading.state.label)
    return reading, seconds


def update(run: Run, step: int) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches; returns the step's loss, left on the device.

    A non-finite loss or gradient skips the update (parameters and Adam state untouched) and is counted.
    """
    from contextlib import nullcontext

    settings, accelerator, plan = run.settings, run.accelerator, run.plan
    if run.graphs:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer needed
    total = torch.zeros((), device=accelerator.device)
    for micro in range(plan.accumulation):
        number = step * plan.accumulation + micro  # global micro-batch number: fixes the samples it holds
        batch = trainset.micro_batch(run.data, number, accelerator.process_index, accelerator.num_processes,
                                     plan.batch_size, settings.seed, settings.repeats, settings.prior_loss_weight,
                                     run.draw_u, run.generator)
        syncing = nullcontext() if micro == plan.accumulation - 1 else accelerator.no_sync(run.model)
        with syncing, device.autocast(accelerator.device.type, run.dtype):
            loss = batch_loss(run.model, batch, run.sigma_table, settings, run.dtype, plan.batch_size)
            accelerator.backward(loss / plan.accumulation)
        total += loss.detach() / plan.accumulation
    norm = accelerator.clip_grad_norm_(run.params, settings.max_grad_norm or math.inf)
    bad = ~(torch.isfinite(norm) & torch.isfinite(total))  # () bool, stays on the device
    if run.skips_on_device:
        run.optimizer.found_inf = bad.float()  # read by fused AdamW: skips params, moments and step count
        run.optimizer.step()
    elif not bad.item():
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.bad_in_window += bad
    run.bad_streak.mul_(bad).add_(bad)  # +1 on a bad step, back to 0 on a good one
    return total


def update_within_memory(run: Run, log: dict, step: int) -> torch.Tensor:
    """`update`, retried with half the batch and twice the accumulation when the device runs out of memory:
    the step covers the same samples with the same noise, so the effective batch and the result stay."""
    while True:
        try:
            return update(run, step)
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
            if not memory.is_out_of_memory(error):
                raise
        run.optimizer.zero_grad(set_to_none=True)
        back_off(run, log, step, "out of memory")


def back_off(run: Run, log: dict, step: int, reason: str) -> None:
    """Half the batch, twice the accumulation (same effective batch); checkpointing at batch 1 if auto."""
    device.empty_cache(run.accelerator.device.type)
    run.plan = batching.back_off(run.plan, batching.BatchSettings.from_train(run.settings), run.budget)
    autobatch.set_checkpointing(run.transformer, run.plan.checkpointing)
    run.heat.rebase()  # less work per micro-batch: the old step time is no reference
    log.setdefault("backoffs", []).append({"step": step, "reason": reason, "plan": run.plan.why})
    progress.note(f"train: step {step + 1}, {reason}: {run.plan.why}")


def watch_swap(run: Run, log: dict) -> str:
    """Swap that keeps growing is memory pressure on a unified-memory Mac: back off before it thrashes.
    Returns the swap in use, for the display."""
    readings = memory.read(run.accelerator.device.type)
    run.swap.append(readings.swap_used)
    pressure = agreed(run, memory.memory_pressure(run.swap, readings.pressure_level))  # all processes or none
    if pressure and run.plan.batch_size > 1:
        back_off(run, log, log["step"], pressure)
        run.swap.clear()
    return memory.gib(readings.swap_used)


def finish(run: Run, log: dict, out_dir: Path, hardware: dict, latents_dir: Path, resumed_from: int,
           started: float, startup: Startup) -> TrainResult:
    """Measure, write the final adapter (with the intermediate ones) to `out_dir`, drop the checkpoints."""
    backend, settings = hardware["backend"], run.settings
    # Before training the adapter is the identity (B = 0), so the base model alone gives the "before" value.
    # Measured here, after training, it keeps the launch-to-first-step time short and uses the same dtype as
    # "after" even when a rollback switched to fp32.
    with lora.disabled(run.transformer):
        before = heldout_loss(run.model, run.data, run.dtype)
    after = heldout_loss(run.model, run.data, run.dtype)
    if run.accelerator.is_main_process:
        with atomic.staged_dir(out_dir) as staging:
            lora.save(run.transformer, staging / lora_file.WEIGHT_NAME,
                      {**run.provenance, "yem.steps": str(settings.steps)})
            if (run.run_dir / SNAPSHOTS).is_dir():
                shutil.copytree(run.run_dir / SNAPSHOTS, staging / SNAPSHOTS)
        checkpoint.discard(run.run_dir)
    facts = {"backend": backend, "dtype": log["dtype"], "device_name": device.device_name(backend),
             "torch": torch.__version__, "resolution": cache.read_index(latents_dir)["resolution"],
             "nonfinite_steps": log["nonfinite_steps"], "rollbacks": len(log["rollbacks"]),
             "learning_rate_scale": log["lr_scale"], "os": device.os_name(),
             "launch_to_first_step_s": startup.seconds["first_step"], "startup_s": startup.seconds,
             "memory_total_gib": round(memory.total_bytes(backend) / memory.GIB, 1), **run.heat.metrics(),
             "batch_plan": run.plan.why, "memory_backoffs": len(log.get("backoffs", [])),
             "cpu_fallback_ops": ", ".join(log["cpu_fallback_ops"]) or "none"}
    return TrainResult(steps=settings.steps, rows=log["rows"], heldout_before=before,
                       heldout_after=after, batch_size=run.plan.batch_size,
                       gradient_accumulation=run.plan.accumulation,
                       gradient_checkpointing=run.transformer.is_gradient_checkpointing,
                       world_size=run.accelerator.num_processes,
                       peak_memory_gib=memory.peak_bytes(backend) / memory.GIB,
                       wall_s=time.perf_counter() - started, resumed_from=resumed_from, facts=facts)


def log_rows(first_step: int, losses: list[float], lrs: list[float], seconds: float, backend: str,
             heat: int) -> list[dict]:
    """One TSV row per step; `heat` is the thermal state's number (-1 unknown, 0 nominal … 3 critical)."""
    memory_gib = memory.used_bytes(backend) / memory.GIB
    return [{"step": first_step + i + 1, "loss": loss, "lr": lr, "s_per_step": seconds, "memory_gib": memory_gib,
             "thermal": heat} for i, (loss, lr) in enumerate(zip(losses, lrs))]


def run_fingerprint(model: ModelParams, settings: TrainParams, hardware: dict, latents_dir: Path,
                    embeds_dir: Path, processes: int = 1) -> str:
    """Identity of a run: what it trains on, how, with which code. Checkpoint policy is not part of it, nor how
    the effective batch is split over devices: a run checkpointed on two GPUs resumes on one (or the other way
    round) when the effective batch is the same, since each sample's randomness follows its global position."""
    from yem import __version__

    split = ("checkpoint_every", "checkpoints_keep", "devices", "batch_size", "gradient_accumulation",
             "effective_batch_size")
    how = {k: v for k, v in dataclasses.asdict(settings).items() if k not in split}
    how["effective_batch"] = effective_batch(settings, processes)
    code = [Path(m.__file__) for m in (flow, lora, checkpoint, trainset, objective)] + [Path(__file__)]
    inputs = [p for folder in (latents_dir, embeds_dir) for p in folder.rglob("*") if p.is_file()]
    return checkpoint.fingerprint({"model": dataclasses.asdict(model), "train": how, "hardware": hardware,
                                   "yem": __version__}, inputs + code)


def effective_batch(settings: TrainParams, processes: int) -> int | str:
    """Images per optimizer step as params fix it; with batch_size auto and no effective_batch_size it depends on
    what fits, so only the same settings on the same number of processes count as the same run."""
    if settings.effective_batch_size:
        return settings.effective_batch_size
    if settings.batch_size == "auto":
        return f"auto × {settings.gradient_accumulation} × {processes} processes"
    return settings.batch_size * settings.gradient_accumulation * processes


def provenance(model: ModelParams, settings: TrainParams, latents_dir: Path, embeds_dir: Path) -> dict[str, str]:
    """Header metadata of the adapter files (yem.steps is set per file)."""
    from yem import __version__

    return {"yem.version": __version__, "yem.base_model": model.id, "yem.base_model_revision": model.revision or "",
            "yem.instance_prompt": cache.read_index(embeds_dir).get("instance", ""),
            "yem.resolution": str(cache.read_index(latents_dir)["resolution"]), "yem.rank": str(settings.rank),
            "yem.alpha": str(settings.alpha)}

"""The training loop: SD3 flow matching on cached latents and prompt embeddings, a peft LoRA, accelerate.

No VAE and no text encoder is ever loaded here. Everything random is a function of (seed, step): the data order
of each epoch, the flips, the noise and the sigmas. So a resumed run replays exactly what an uninterrupted run
would have done, whatever happened in between.
"""

import copy
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from yem import (atomic, autobatch, batching, cache, checkpoint, device, flow, lora, lora_file, memory, objective,
                 power, progress, sd3, thermal, trainset)
from yem.errors import TrainingStopped
from yem.interrupt import stop_requests
from yem.metrics import TrainResult
from yem.objective import batch_loss, heldout_loss
from yem.params import ModelParams, ThermalParams, TrainParams
from yem.trainset import TrainingSet

SNAPSHOTS = "steps"  # intermediate adapters (one per checkpoint) kept beside the final one, for render.checkpoints
LOG_EVERY = 10  # steps between reads of the loss from the device (each read waits for the device)
# torch.compile mode of the transformer blocks. On CUDA, CUDA graphs ("reduce-overhead") replay each block's
# thousands of small kernels in one launch: the step is bound by launching them otherwise (benchmarks/RESULTS.md).
COMPILE_MODES = {"cuda": "reduce-overhead"}
MAX_ROLLBACKS = 3  # rollbacks after non-finite steps before giving up with advice


@dataclass
class Run:
    """What one training run holds while it loops."""
    accelerator: object
    model: torch.nn.Module  # wrapped for DDP when several processes train
    transformer: torch.nn.Module  # the unwrapped SD3 transformer carrying the adapter
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    skips_on_device: bool  # fused AdamW can skip a non-finite update without waiting for the device
    scheduler: object
    data: TrainingSet
    sigma_table: torch.Tensor  # (1000,) on the device
    dtype: torch.dtype
    settings: TrainParams
    plan: batching.BatchPlan  # batch size, accumulation, checkpointing: planned, then backed off if memory runs out
    budget: int | None  # bytes the device may use (build/preflight.json)
    generator: torch.Generator  # reseeded per sample (trainset.sample_seed)
    draw_u: object  # draw_u(generator) -> (1,) timestep density sample
    run_dir: Path  # this run's checkpoints
    provenance: dict[str, str]  # header metadata of every adapter file written
    bad_streak: torch.Tensor  # () non-finite steps in a row, on the device
    bad_in_window: torch.Tensor  # () non-finite steps since the last sync, on the device
    sensor: thermal.Sensor  # how hot the training device runs
    heat: thermal.Governor  # decides, once per window, to go on, pause or stop
    graphs: bool = False  # the compiled blocks replay CUDA graphs: each step must be marked as a new one
    initial: checkpoint.TrainingState | None = None  # the state at step 0, for a rollback with no checkpoint yet


def run_training(model: ModelParams, settings: TrainParams, hardware: dict, latents_dir: Path, embeds_dir: Path,
                 out_dir: Path, project_root: Path, heat: ThermalParams | None = None) -> TrainResult | None:
    """Train the adapter (resuming from the newest checkpoint of this exact run) and save it to `out_dir`.

    The loop runs in windows of up to LOG_EVERY steps queued on the device without waiting for it; at the end
    of a window it reads the losses back (the only wait), then rolls back, checkpoints or stops as needed.
    """
    started = time.perf_counter()
    run = prepare(model, settings, hardware, latents_dir, embeds_dir, project_root,
                  heat or ThermalParams(policy="pause", max_pause_s=600))
    log = start_or_resume(run)
    resumed_from = log["step"]
    ready_s = time.time() - psutil.Process().create_time()  # launch (imports included) to the first step
    memory.reset_peak(hardware["backend"])
    for warning in filter(None, [power.battery_warning()]):
        progress.note(warning)
    with stop_requests() as stop, power.keep_awake(), progress.bar(settings.steps, "train", "step") as bar:
        bar.update(log["step"])
        while log["step"] < settings.steps:
            reading, seconds = train_window(run, log, stop, bar)
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
    result = finish(run, log, out_dir, hardware, latents_dir, resumed_from, started, ready_s)
    return result if run.accelerator.is_main_process else None


def prepare(model: ModelParams, settings: TrainParams, hardware: dict, latents_dir: Path, embeds_dir: Path,
            project_root: Path, heat: ThermalParams) -> Run:
    """Load the cached data and the transformer for `model`, then assemble the run."""
    backend, dtype = hardware["backend"], getattr(torch, hardware["dtype"])
    accelerator = make_accelerator(backend, heat)
    budget = memory.Budget(int(hardware["memory_budget_gib"] * memory.GIB), "build/preflight.json")
    progress.note(memory.apply_budget(budget, memory.read(backend)), prefix="memory")
    return assemble(accelerator, sd3.load_transformer(model, dtype, accelerator.device),
                    trainset.load_training_set(latents_dir, embeds_dir, accelerator.device),
                    sd3.load_training_scheduler(model).sigmas, settings, dtype, heat,
                    run_dir=checkpoint.checkpoints_root(project_root) / run_fingerprint(
                        model, settings, hardware, latents_dir, embeds_dir),
                    provenance=provenance(model, settings, latents_dir, embeds_dir), budget=budget.bytes)


def make_accelerator(backend: str, heat: ThermalParams):
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    device.fast_math(backend)
    # other ranks wait in a collective while rank 0 pauses for heat: give them longer than the longest pause
    patience = InitProcessGroupKwargs(timeout=timedelta(seconds=heat.max_pause_s + 900))
    return Accelerator(cpu=backend == "cpu", kwargs_handlers=[patience])


def assemble(accelerator, transformer: torch.nn.Module, data: TrainingSet, sigma_table: torch.Tensor,
             settings: TrainParams, dtype: torch.dtype, heat: ThermalParams, run_dir: Path,
             provenance: dict[str, str], budget: int | None = None) -> Run:
    """Attach the adapter, fit the batch to the memory `budget`, set up optimizer and schedule, and wrap the
    model for (distributed) training."""
    from diffusers.optimization import get_scheduler

    backend = accelerator.device.type
    torch.manual_seed(settings.seed)  # peft draws lora_A from the global generator (B starts at zero)
    params = lora.attach(transformer, settings.rank, settings.alpha, settings.targets)
    transformer.train()
    draw_u = objective.timestep_density(settings, accelerator.device)
    sigma_table = sigma_table.to(accelerator.device, torch.float32)
    plan = autobatch.plan(transformer, data, sigma_table, settings, dtype, budget, accelerator.num_processes, draw_u)
    autobatch.set_checkpointing(transformer, plan.checkpointing)
    graphs = False
    if settings.compile is True or (settings.compile == "auto" and backend == "cuda"):
        mode = COMPILE_MODES.get(backend, "default")
        graphs = mode == "reduce-overhead"
        for block in transformer.transformer_blocks:  # regional: the identical blocks share one compilation
            block.compile(dynamic=False, mode=mode)
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


def adamw(params: list[torch.nn.Parameter], settings: TrainParams) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW, fused where the device has the kernel (faster, and it can skip an update on the device)."""
    kwargs = {"lr": settings.learning_rate, "weight_decay": settings.weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs), True
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.AdamW(params, **kwargs), False


def start_or_resume(run: Run) -> dict:
    """The run log: restored from the newest checkpoint of this run, or fresh (measuring held-out loss first)."""
    state = checkpoint.load_latest(run.run_dir)
    if state is not None:
        restore(run, state, state.log)
        run.heat.totals = thermal.Totals(**state.log.get("thermal", {}))
        return state.log
    log = {"step": 0, "rows": [], "heldout_before": heldout_loss(run.model, run.data, run.dtype),
           "nonfinite_steps": 0, "bad_streak": 0, "rollbacks": [], "lr_scale": 1.0, "dtype": str(run.dtype)[6:]}
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
    bar.set_postfix(loss=f"{values[-1]:.4f}", s_step=f"{seconds:.3f}", mem=f"{log['rows'][-1]['memory_gib']:.1f}G",
                    heat=reading.state.label)
    return reading, seconds


def respect_heat(run: Run, log: dict, reading: thermal.Reading, seconds: float) -> None:
    """Let the thermal governor act on the window that just ended: checkpoint, then pause or stop."""
    action = agreed(run, run.heat.observe(reading, seconds))
    if action is not thermal.Action.CONTINUE:
        log["thermal"] = dataclasses.asdict(run.heat.totals)
        save_checkpoint(run, log)
        if action is thermal.Action.PAUSE:
            progress.note(f"train: pausing to cool down ({reading.detail}), at most {run.heat.max_pause_s:.0f} s")
            action = agreed(run, run.heat.wait_until_cool(run.sensor.read, time.sleep))
    log["thermal"] = dataclasses.asdict(run.heat.totals)
    if action is thermal.Action.STOP:
        raise run.heat.stop_error(log["step"], run.settings.steps)


def agreed(run: Run, decision):
    """Every process follows rank 0's decision, so none is left waiting in a collective."""
    if run.accelerator.num_processes == 1:
        return decision
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([decision])[0]


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
        device.empty_cache(run.accelerator.device.type)
        run.plan = batching.back_off(run.plan, batching.BatchSettings.from_train(run.settings), run.budget)
        autobatch.set_checkpointing(run.transformer, run.plan.checkpointing)
        run.heat.rebase()  # less work per micro-batch: the old step time is no reference
        log.setdefault("backoffs", []).append({"step": step, "plan": run.plan.why})
        progress.note(f"train: step {step + 1}: {run.plan.why}")


def roll_back(run: Run, log: dict) -> None:
    """After max_bad_steps non-finite steps in a row: resume from the last good state with a remedy."""
    settings, remedy = run.settings, run.settings.on_nonfinite
    if remedy == "stop" or len(log["rollbacks"]) >= MAX_ROLLBACKS:
        raise TrainingStopped(f"train: {log['bad_streak']} non-finite steps in a row at step {log['step']} "
                              f"(after {len(log['rollbacks'])} rollbacks); no NaN weights were saved. Lower "
                              f"train.learning_rate or set device.mixed_precision: no, then rerun.")
    state = checkpoint.load_latest(run.run_dir) or run.initial
    target = {**copy.deepcopy(state.log), "nonfinite_steps": log["nonfinite_steps"], "bad_streak": 0,
              "rollbacks": log["rollbacks"] + [{"at_step": log["step"], "to_step": state.step, "remedy": remedy}],
              "lr_scale": log["lr_scale"] * (0.5 if remedy == "lower_lr" else 1.0),
              "dtype": "float32" if remedy == "fp32" else log["dtype"]}
    restore(run, state, target)
    log.clear()
    log.update(target)


def restore(run: Run, state: checkpoint.TrainingState, target: dict) -> None:
    """Load `state`, then apply the learning-rate scale and precision that `target` (a run log) asks for."""
    lora.load_adapter_state(run.transformer, state.adapter)
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    checkpoint.restore_rng(state.rng)
    factor = target["lr_scale"] / state.log["lr_scale"]
    run.scheduler.base_lrs = [lr * factor for lr in run.scheduler.base_lrs]
    run.scheduler._last_lr = [lr * factor for lr in run.scheduler.get_last_lr()]
    for group in run.optimizer.param_groups:
        group["lr"] *= factor
    if target["dtype"] == "float32" and run.dtype != torch.float32:
        run.transformer.to(torch.float32)  # the frozen base; the adapter is fp32 already
        run.dtype = torch.float32
    run.bad_streak.zero_()
    run.bad_in_window.zero_()


def save_checkpoint(run: Run, log: dict) -> None:
    if not run.accelerator.is_main_process:
        return
    # adapter first: a kill between the two replays this step and rewrites the same file
    lora.save(run.transformer, run.run_dir / SNAPSHOTS / f"step-{log['step']:08d}.safetensors",
              {**run.provenance, "yem.steps": str(log["step"])})
    checkpoint.save(run.run_dir, snapshot(run, log), run.settings.checkpoints_keep)


def finish(run: Run, log: dict, out_dir: Path, hardware: dict, latents_dir: Path, resumed_from: int,
           started: float, ready_s: float) -> TrainResult:
    """Measure, write the final adapter (with the intermediate ones) to `out_dir`, drop the checkpoints."""
    backend, settings = hardware["backend"], run.settings
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
             "learning_rate_scale": log["lr_scale"], "os": device.os_name(), "launch_to_first_step_s": ready_s,
             "memory_total_gib": round(memory.total_bytes(backend) / memory.GIB, 1), **run.heat.metrics(),
             "batch_plan": run.plan.why, "memory_backoffs": len(log.get("backoffs", []))}
    return TrainResult(steps=settings.steps, rows=log["rows"], heldout_before=log["heldout_before"],
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


def snapshot(run: Run, log: dict) -> checkpoint.TrainingState:
    return checkpoint.TrainingState(step=log["step"], adapter=lora.adapter_state(run.transformer),
                                    optimizer=copy.deepcopy(run.optimizer.state_dict()),
                                    scheduler=run.scheduler.state_dict(), log=copy.deepcopy(log),
                                    rng=checkpoint.capture_rng())


def run_fingerprint(model: ModelParams, settings: TrainParams, hardware: dict, latents_dir: Path,
                    embeds_dir: Path) -> str:
    """Identity of a run: what it trains on, how, with which code. Checkpoint policy is not part of it."""
    from yem import __version__

    how = {k: v for k, v in dataclasses.asdict(settings).items() if not k.startswith("checkpoint")}
    code = [Path(m.__file__) for m in (flow, lora, checkpoint, trainset, objective)] + [Path(__file__)]
    inputs = [p for folder in (latents_dir, embeds_dir) for p in folder.rglob("*") if p.is_file()]
    return checkpoint.fingerprint({"model": dataclasses.asdict(model), "train": how, "hardware": hardware,
                                   "yem": __version__}, inputs + code)


def provenance(model: ModelParams, settings: TrainParams, latents_dir: Path, embeds_dir: Path) -> dict[str, str]:
    """Header metadata of the adapter files (yem.steps is set per file)."""
    from yem import __version__

    return {"yem.version": __version__, "yem.base_model": model.id, "yem.base_model_revision": model.revision or "",
            "yem.instance_prompt": cache.read_index(embeds_dir).get("instance", ""),
            "yem.resolution": str(cache.read_index(latents_dir)["resolution"]), "yem.rank": str(settings.rank),
            "yem.alpha": str(settings.alpha)}

"""One training run's state, and how it is saved, restored, rolled back and kept in step across processes.

`Run` is what the loop in yem.training.loop holds; its `log` (a RunLog) is how far it has got. A checkpoint
captures both (`snapshot`) and `restore` puts them back, applying a learning-rate scale or precision change a
rollback asked for. Decisions that every process must share (stop, pause for heat) go through `agreed`, which
takes rank 0's.
"""

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from yem import progress
from yem.data.trainset import TrainingSet
from yem.errors import TrainingStopped
from yem.hardware.thermal.governor import Action, Governor
from yem.hardware.thermal.reading import Reading, Sensor
from yem.model import lora, lora_file
from yem.params import TrainParams
from yem.training import batching, checkpoint, scaling
from yem.training.runlog import RunLog

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
    budget: int | None  # bytes the device may use (the hardware record's budget)
    generator: torch.Generator  # reseeded per sample (trainset.sample_seed)
    draw_u: object  # draw_u(generator) -> (1,) timestep density sample
    run_dir: Path  # this run's checkpoints
    provenance: dict[str, str]  # header metadata of every adapter file written
    bad_streak: torch.Tensor  # () non-finite steps in a row, on the device
    bad_in_window: torch.Tensor  # () non-finite steps since the last sync, on the device
    overflow_in_window: torch.Tensor  # () steps the fp16 loss scale overflowed since the last sync, on the device
    scaler: torch.amp.GradScaler  # fp16 loss scaling (yem.training.scaling); disabled in bf16 and fp32
    sensor: Sensor  # how hot the training device runs
    heat: Governor  # decides, once per window, to go on, pause or stop
    log: RunLog = dataclasses.field(default_factory=lambda: RunLog(dtype="float32"))
    swap: list[int] = dataclasses.field(default_factory=list)  # swap in use at each window's end (bytes)
    graphs: bool = False  # the compiled blocks replay CUDA graphs: each step must be marked as a new one
    attention: str = "sdpa"  # what the transformer's attention runs (train.attention, resolved)
    initial: checkpoint.TrainingState | None = None  # the state at step 0, for a rollback with no checkpoint yet


def resume_or_start(run: Run) -> None:
    """Restore the newest checkpoint of this run, or start its log afresh."""
    state = checkpoint.load_latest(run.run_dir)
    if state is not None:
        if run.accelerator.is_main_process:
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.saved))
            progress.note(f"resuming from step {state.step} of {run.settings.steps} (checkpoint saved {saved})",
                          prefix="train")
        restore(run, state, state.log)
        run.log = copy.deepcopy(state.log)
    else:
        run.log = RunLog(dtype=str(run.dtype).removeprefix("torch."), thermal=run.heat.totals)
        run.initial = snapshot(run)
    run.heat.totals = run.log.thermal  # one account of heat, carried over resumes


def respect_heat(run: Run, reading: Reading, seconds: float) -> None:
    """Let the thermal governor act on the window that just ended: checkpoint, then pause or stop."""
    action = agreed(run, run.heat.observe(reading, seconds))
    if action is not Action.CONTINUE:
        save_checkpoint(run)
        if action is Action.PAUSE:
            progress.note(f"train: pausing to cool down ({reading.detail}), at most {run.heat.max_pause_s:.0f} s")
            action = agreed(run, run.heat.wait_until_cool(run.sensor.read, time.sleep))
    if action is Action.STOP:
        raise run.heat.stop_error(run.log.step, run.settings.steps)


def agreed(run: Run, decision):
    """Every process follows rank 0's decision, so none is left waiting in a collective."""
    if run.accelerator.num_processes == 1:
        return decision
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([decision])[0]


def roll_back(run: Run) -> None:
    """After max_bad_steps non-finite steps in a row: resume from the last good state with a remedy."""
    remedy, log = run.settings.on_nonfinite, run.log
    if remedy == "stop" or len(log.rollbacks) >= MAX_ROLLBACKS:
        raise TrainingStopped(f"train: {log.bad_streak} non-finite steps in a row at step {log.step} "
                              f"(after {len(log.rollbacks)} rollbacks); no NaN weights were saved. Lower "
                              f"train.learning_rate or set device.mixed_precision: no, then rerun.")
    state = checkpoint.load_latest(run.run_dir) or run.initial
    target = dataclasses.replace(
        copy.deepcopy(state.log), nonfinite_steps=log.nonfinite_steps, bad_streak=0, thermal=log.thermal,
        scaler_skipped_steps=log.scaler_skipped_steps,
        rollbacks=log.rollbacks + [{"at_step": log.step, "to_step": state.step, "remedy": remedy}],
        lr_scale=log.lr_scale * (0.5 if remedy == "lower_lr" else 1.0),
        dtype="float32" if remedy == "fp32" else log.dtype)
    restore(run, state, target)
    run.log = target


def restore(run: Run, state: checkpoint.TrainingState, target: RunLog) -> None:
    """Load `state`, then apply the learning-rate scale and precision that `target` asks for."""
    lora.load_adapter_state(run.transformer, state.adapter)
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    checkpoint.restore_rng(state.rng)
    factor = target.lr_scale / state.log.lr_scale
    run.scheduler.base_lrs = [lr * factor for lr in run.scheduler.base_lrs]
    run.scheduler._last_lr = [lr * factor for lr in run.scheduler.get_last_lr()]
    for group in run.optimizer.param_groups:
        group["lr"] *= factor
    if target.dtype == "float32" and run.dtype != torch.float32:
        run.transformer.to(torch.float32)  # the frozen base; the adapter is fp32 already
        run.dtype = torch.float32
    run.scaler = scaling.restored(run.accelerator.device.type, run.dtype, state.scaler)
    run.bad_streak.zero_()
    run.bad_in_window.zero_()
    run.overflow_in_window.zero_()


def save_checkpoint(run: Run) -> None:
    if not run.accelerator.is_main_process:
        return
    # adapter first: a kill between the two replays this step and rewrites the same file
    lora.save(run.transformer, lora_file.snapshot_path(run.run_dir, run.log.step),
              {**run.provenance, "yem.steps": str(run.log.step)})
    checkpoint.save(run.run_dir, snapshot(run), run.settings.checkpoints_keep)


def snapshot(run: Run) -> checkpoint.TrainingState:
    return checkpoint.TrainingState(step=run.log.step, adapter=lora.adapter_state(run.transformer),
                                    optimizer=copy.deepcopy(run.optimizer.state_dict()),
                                    scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(),
                                    log=copy.deepcopy(run.log),
                                    rng=checkpoint.capture_rng())

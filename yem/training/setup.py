"""Setting a training run up: the accelerator, the transformer with its adapter, the batch plan, compilation, the
optimizer and schedule, and the run's identity (the fingerprint its checkpoints are kept under).

Everything here happens once, before the first step; yem.training.loop then only steps.
"""

import dataclasses
import math
import time
from pathlib import Path

import psutil
import torch

from yem import progress
from yem.data import cache, trainset
from yem.data.trainset import TrainingSet
from yem.errors import ModelError
from yem.hardware import budget, device, memory
from yem.hardware.record import Hardware
from yem.hardware.thermal import sensor
from yem.hardware.thermal.governor import Governor
from yem.model import architecture, attention, footprint, lora, sd3
from yem.params import ModelParams, ThermalParams, TrainParams
from yem.training import autobatch, checkpoint, fit, flow, objective, scaling
from yem.training.state import Run

# torch.compile mode of the transformer blocks. On CUDA, CUDA graphs ("reduce-overhead") replay each block's
# thousands of small kernels in one launch: the step is bound by launching them otherwise (benchmarks/RESULTS.md).
COMPILE_MODES = {"cuda": "reduce-overhead"}
# train.compile auto compiles on CUDA only for runs at least this long. H100, SD3-medium, 1024 px: compiling takes
# 25-32 s (8-11 s when inductor's on-disk cache holds the same shapes from an earlier run) and saves 0.055-0.12 s
# a step (eager 0.119-0.188 s, compiled 0.064-0.067 s, depending on the host), so it pays off after 70-580 steps
# (benchmarks/RESULTS.md).
COMPILE_MIN_STEPS = 400


@dataclasses.dataclass
class Startup:
    """Seconds from the launch of the process (imports included) to each point on the way to full speed: imports,
    loaded, assembled, first_step, and first_window (the first log window done: on CUDA the blocks compile
    in it). Where a run's start-up time goes (metrics: startup_s)."""
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def mark(self, point: str) -> None:
        """Record the first time the run gets to `point`."""
        if point not in self.seconds:
            self.seconds[point] = round(time.time() - psutil.Process().create_time(), 2)


def prepare(model: ModelParams, settings: TrainParams, hardware: Hardware, latents_dir: Path, embeds_dir: Path,
            project_root: Path, heat: ThermalParams, startup: Startup) -> Run:
    """Load the cached data, check the run can fit the memory budget (before any weights load: yem.training.fit),
    then load the transformer for `model` and assemble the run."""
    accelerator = make_accelerator(hardware.backend, heat)
    limit = budget.Budget(hardware.budget_bytes, "the hardware record's budget")
    progress.note(budget.apply_budget(limit, memory.read(hardware.backend)), prefix="memory")
    data = trainset.load_training_set(latents_dir, embeds_dir, accelerator.device)
    arch = model_architecture(model)
    work = training_workload(settings, data, hardware.backend, hardware.torch_dtype, limit.bytes)
    if arch is not None:
        fit.check_training(arch, work, limit.bytes)
    transformer = sd3.quantize_frozen_base(sd3.load_transformer(model, hardware.torch_dtype, accelerator.device),
                                           settings.quantize_base)
    startup.mark("loaded")
    run = assemble(accelerator, transformer, data, sd3.load_training_scheduler(model).sigmas, settings,
                   hardware.torch_dtype, heat,
                   run_dir=checkpoint.checkpoints_root(project_root) / run_fingerprint(
                       model, settings, hardware, latents_dir, embeds_dir, accelerator.num_processes),
                   provenance=provenance(model, settings, latents_dir, embeds_dir), budget=limit.bytes, arch=arch)
    startup.mark("assembled")
    return run


def training_workload(settings: TrainParams, data: TrainingSet, backend: str, dtype: torch.dtype,
                      memory_budget: int | None) -> footprint.Workload:
    """What the estimate needs to know of this run: its settings, and the shapes of its cached data (the largest
    bucket's)."""
    return footprint.training_workload(settings, backend, dtype.itemsize,
                                       size=max((stack.size for stack in data.stacks), key=math.prod),
                                       text_tokens=data.joint.shape[1], images=len(data.ids),
                                       prompts=len(data.joint), memory_budget=memory_budget)


def model_architecture(model: ModelParams) -> architecture.Architecture | None:
    """The model's architecture for the memory estimate; None (the planner measures instead) if yem cannot tell."""
    try:
        return architecture.architecture_for(model.id, model.revision)
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
             provenance: dict[str, str], budget: int | None = None,
             arch: architecture.Architecture | None = None) -> Run:
    """Attach the adapter, fit the batch to the memory `budget` (`arch` lets the estimate spare a measured step),
    set up optimizer and schedule, and wrap the model for (distributed) training."""
    from diffusers.optimization import get_scheduler

    backend = accelerator.device.type
    torch.manual_seed(settings.seed)  # peft draws lora_A from the global generator (B starts at zero)
    params = lora.attach(transformer, settings.rank, settings.lora_alpha, settings.targets)
    kind = attention.use(transformer, settings.attention, backend, budget)
    transformer.train()
    draw_u = objective.timestep_density(settings, accelerator.device)
    sigma_table = sigma_table.to(accelerator.device, torch.float32)
    work = training_workload(settings, data, backend, dtype, budget)
    plan = autobatch.plan(transformer, data, sigma_table, settings, dtype, budget, accelerator.num_processes, draw_u,
                          arch, work)
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
               overflow_in_window=zero.clone(), scaler=scaling.make_scaler(backend, dtype),
               sensor=sensor.detect(backend),
               # on a CPU other processes swing step time far more than heat does: watch the sensor only
               heat=Governor(heat.policy, heat.max_pause_s, watch_speed=backend != "cpu"), graphs=graphs,
               attention=kind)


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


def run_fingerprint(model: ModelParams, settings: TrainParams, hardware: Hardware, latents_dir: Path,
                    embeds_dir: Path, processes: int = 1) -> str:
    """Identity of a run: what it trains on, how, with which code. Checkpoint policy is not part of it, nor how
    the effective batch is split over devices: a run checkpointed on two GPUs resumes on one (or the other way
    round) when the effective batch is the same, since each sample's randomness follows its global position."""
    from yem import __version__
    from yem.training import loop, state

    split = ("checkpoint_every", "checkpoints_keep", "devices", "batch_size", "gradient_accumulation",
             "effective_batch_size")
    how = {k: v for k, v in dataclasses.asdict(settings).items() if k not in split}
    how["effective_batch"] = settings.effective_batch(processes)
    code = [Path(m.__file__) for m in (flow, lora, checkpoint, trainset, objective, loop, state, scaling)]
    code.append(Path(__file__))
    inputs = [p for folder in (latents_dir, embeds_dir) for p in folder.rglob("*") if p.is_file()]
    return checkpoint.fingerprint({"model": dataclasses.asdict(model), "train": how,
                                   "hardware": dataclasses.asdict(hardware), "yem": __version__}, inputs + code)


def provenance(model: ModelParams, settings: TrainParams, latents_dir: Path, embeds_dir: Path) -> dict[str, str]:
    """Header metadata of the adapter files (yem.steps is set per file)."""
    from yem import __version__

    return {"yem.version": __version__, "yem.base_model": model.id, "yem.base_model_revision": model.revision or "",
            "yem.instance_prompt": cache.read_index(embeds_dir).get("instance", ""),
            "yem.resolution": str(cache.read_index(latents_dir)["resolution"]), "yem.rank": str(settings.rank),
            "yem.alpha": str(settings.lora_alpha)}

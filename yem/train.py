"""The training loop: SD3 flow matching on cached latents and prompt embeddings, a peft LoRA, accelerate.

No VAE and no text encoder is ever loaded here. Everything random is a function of (seed, step): the data order
of each epoch, the flips, the noise and the sigmas. So a resumed run replays exactly what an uninterrupted run
would have done, whatever happened in between.
"""

import dataclasses
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from yem import atomic, cache, checkpoint, device, flow, lora, lora_file, memory, progress, sd3
from yem.errors import CacheError, TrainingStopped
from yem.params import ModelParams, TrainParams

SNAPSHOTS = "steps"  # intermediate adapters (one per checkpoint) kept beside the final one, for render.checkpoints
LOG_EVERY = 10  # steps between reads of the loss from the device (each read waits for the device)
HELDOUT_SIGMAS = (0.2, 0.4, 0.6, 0.8)
HELDOUT_SAMPLES = 8
HELDOUT_SEED = 20240614


@dataclass
class TrainingSet:
    """Every cached tensor the loop needs, resident on the training device. N samples, E distinct prompts."""
    ids: list[str]
    mean: torch.Tensor  # (N, 16, h, w) posterior mean, scaled
    std: torch.Tensor  # (N, 16, h, w)
    flip_mean: torch.Tensor | None  # mirrored images, when data.random_flip
    flip_std: torch.Tensor | None
    prompt: torch.Tensor  # (N,) long: each sample's row in joint / pooled
    joint: torch.Tensor  # (E, 77 + T, D)
    pooled: torch.Tensor  # (E, P)
    prior: torch.Tensor  # (N,) bool: prior-preservation (class) image

    def select(self, prior: bool) -> torch.Tensor:
        return torch.nonzero(self.prior == prior).flatten().cpu()


def load_training_set(latents_dir: Path, embeds_dir: Path, device: torch.device) -> TrainingSet:
    """Join the latent and embedding caches on sample id (never on position)."""
    latent_files = cache.read_index(latents_dir)["samples"]
    embeds = cache.read_index(embeds_dir)
    if set(latent_files) != set(embeds["samples"]):
        raise CacheError(f"{latents_dir} and {embeds_dir} list different images. Rerun: dvc repro.")
    ids = sorted(latent_files)
    keys = sorted(set(embeds["samples"].values()))
    tensors = [cache.read_tensors(latents_dir / latent_files[i]) for i in ids]
    prompts = [cache.read_tensors(embeds_dir / f"{k}.safetensors") for k in keys]

    def stack(name: str) -> torch.Tensor | None:
        return torch.stack([t[name] for t in tensors]).to(device) if name in tensors[0] else None

    return TrainingSet(
        ids=ids, mean=stack("mean"), std=stack("std"), flip_mean=stack("flip_mean"), flip_std=stack("flip_std"),
        prompt=torch.tensor([keys.index(embeds["samples"][i]) for i in ids], device=device),
        joint=torch.stack([p["prompt_embeds"] for p in prompts]).to(device),
        pooled=torch.stack([p["pooled_prompt_embeds"] for p in prompts]).to(device),
        prior=torch.tensor([i.startswith("prior/") for i in ids], device=device))


def epoch_order(population: torch.Tensor, seed: int, epoch: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A permutation of the samples (each `repeats` times) and a flip coin per entry, fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    entries = population.repeat(repeats)
    order = entries[torch.randperm(len(entries), generator=generator)]
    return order, torch.rand(len(entries), generator=generator) < 0.5


def positions(population: torch.Tensor, seed: int, repeats: int, start: int, count: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries [start, start + count) of the endless stream of epochs: (sample indices, flips)."""
    size = len(population) * repeats
    epochs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    picked, flips = [], []
    for position in range(start, start + count):
        epoch, offset = divmod(position, size)
        if epoch not in epochs:
            epochs[epoch] = epoch_order(population, seed, epoch, repeats)
        picked.append(epochs[epoch][0][offset])
        flips.append(epochs[epoch][1][offset])
    return torch.stack(picked), torch.stack(flips)


@dataclass
class Batch:
    x0: torch.Tensor  # (B, 16, h, w) a fresh draw from each image's VAE posterior
    joint: torch.Tensor  # (B, 77 + T, D)
    pooled: torch.Tensor  # (B, P)
    weight: torch.Tensor  # (B,) 1 for instance images, train.prior_loss_weight for class images


def make_batch(data: TrainingSet, index: torch.Tensor, flip: torch.Tensor, weight: float,
               generator: torch.Generator) -> Batch:
    index = index.to(data.mean.device)
    mean, std = data.mean[index], data.std[index]
    if data.flip_mean is not None:
        use_flip = flip.to(data.mean.device).view(-1, 1, 1, 1)
        mean = torch.where(use_flip, data.flip_mean[index], mean)
        std = torch.where(use_flip, data.flip_std[index], std)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    rows = data.prompt[index]
    return Batch(x0=mean + std * noise, joint=data.joint[rows], pooled=data.pooled[rows],
                 weight=torch.full((len(index),), weight, device=mean.device))


def batch_loss(model, batch: Batch, sigma_table: torch.Tensor, settings: TrainParams, dtype: torch.dtype,
               generator: torch.Generator, per_instance: int) -> torch.Tensor:
    """Weighted flow-matching loss of one micro-batch: mean over instance images + w × mean over class images."""
    sigma = flow.sample_sigmas(sigma_table, len(batch.x0), settings.weighting_scheme, generator,
                               settings.logit_mean, settings.logit_std, settings.mode_scale)
    noise = torch.randn(batch.x0.shape, generator=generator, device=batch.x0.device, dtype=batch.x0.dtype)
    noisy = flow.add_noise(batch.x0, noise, sigma)
    prediction = model(hidden_states=noisy.to(dtype), timestep=flow.timesteps(sigma).to(dtype),
                       encoder_hidden_states=batch.joint.to(dtype), pooled_projections=batch.pooled.to(dtype),
                       return_dict=False)[0]
    losses = flow.per_sample_loss(prediction, batch.x0, noise, noisy, sigma, settings.weighting_scheme,
                                  settings.precondition_outputs)
    return (losses * batch.weight).sum() / per_instance


@torch.no_grad()
def heldout_loss(model, data: TrainingSet, dtype: torch.dtype) -> float:
    """Velocity MSE of up to 8 instance images at fixed sigmas with fixed noise that training never draws."""
    index = data.select(prior=False)[:HELDOUT_SAMPLES].to(data.mean.device)
    x0 = data.mean[index]
    generator = torch.Generator().manual_seed(HELDOUT_SEED)
    total = 0.0
    for sigma_value in HELDOUT_SIGMAS:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        sigma = torch.full((len(index),), sigma_value, device=x0.device)
        noisy = flow.add_noise(x0, noise, sigma)
        rows = data.prompt[index]
        prediction = model(hidden_states=noisy.to(dtype), timestep=flow.timesteps(sigma).to(dtype),
                           encoder_hidden_states=data.joint[rows].to(dtype),
                           pooled_projections=data.pooled[rows].to(dtype), return_dict=False)[0]
        total += flow.per_sample_loss(prediction, x0, noise, noisy, sigma, "none", False).mean().item()
    return total / len(HELDOUT_SIGMAS)


@contextmanager
def stop_requests():
    """SIGINT/SIGTERM set a flag the loop checks after each step (a second SIGINT interrupts at once)."""
    requested: list[str] = []

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class TrainResult:
    steps: int
    rows: list[dict]  # per step: step, loss, lr, s_per_step, memory_gib
    heldout_before: float
    heldout_after: float
    batch_size: int
    gradient_accumulation: int
    gradient_checkpointing: bool
    world_size: int
    peak_memory_gib: float
    wall_s: float
    resumed_from: int
    facts: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        losses = [r["loss"] for r in self.rows]
        tail = losses[-max(1, len(losses) // 10):]
        timed = [r["s_per_step"] for r in self.rows if r["s_per_step"] is not None]
        return {"steps": self.steps, "loss_final": sum(tail) / len(tail), "loss_best": min(losses),
                "heldout_loss_before": self.heldout_before, "heldout_loss_after": self.heldout_after,
                "s_per_step": sorted(timed)[len(timed) // 2] if timed else None,
                "peak_memory_gib": self.peak_memory_gib, "wall_s": self.wall_s, "batch_size": self.batch_size,
                "gradient_accumulation": self.gradient_accumulation, "world_size": self.world_size,
                "effective_batch_size": self.batch_size * self.gradient_accumulation * self.world_size,
                "gradient_checkpointing": self.gradient_checkpointing, "resumed_from_step": self.resumed_from,
                **self.facts}


@dataclass
class Run:
    """What one training run holds while it loops."""
    accelerator: object
    model: torch.nn.Module  # wrapped for DDP when several processes train
    transformer: torch.nn.Module  # the unwrapped SD3 transformer carrying the adapter
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: TrainingSet
    sigma_table: torch.Tensor  # (1000,) on the device
    dtype: torch.dtype
    settings: TrainParams
    batch_size: int
    accumulation: int
    generator: torch.Generator


def run_training(model: ModelParams, settings: TrainParams, hardware: dict, latents_dir: Path, embeds_dir: Path,
                 out_dir: Path, project_root: Path) -> TrainResult:
    """Train the adapter (resuming from the newest checkpoint of this exact run) and save it to `out_dir`."""
    started = time.perf_counter()
    run = prepare(model, settings, hardware, latents_dir, embeds_dir)
    backend, main = hardware["backend"], run.accelerator.is_main_process
    run_dir = checkpoint.checkpoints_root(project_root) / run_fingerprint(model, settings, hardware, latents_dir,
                                                                          embeds_dir)
    state = checkpoint.load_latest(run_dir)
    if state:
        restore(run, state)
    log = state.log if state else {"rows": [], "heldout_before": heldout_loss(run.model, run.data, run.dtype)}
    start = state.step if state else 0
    memory.reset_peak(backend)
    with stop_requests() as stop, progress.bar(settings.steps, "train", "step") as bar:
        bar.update(start)
        losses, lrs, window_start, clock = [], [], start, time.perf_counter()
        for step in range(start, settings.steps):
            lrs.append(run.scheduler.get_last_lr()[0])
            losses.append(update(run, step))
            done = step + 1
            save_now = done % settings.checkpoint_every == 0 or bool(stop)
            if done % LOG_EVERY == 0 or done == settings.steps or save_now:
                seconds = (time.perf_counter() - clock) / (done - window_start)  # .tolist() below waits for the device
                log["rows"] += log_rows(window_start, torch.stack(losses).tolist(), lrs, seconds, backend)
                bar.update(done - window_start)
                bar.set_postfix(loss=f"{log['rows'][-1]['loss']:.4f}", s_step=f"{seconds:.3f}",
                                mem=f"{log['rows'][-1]['memory_gib']:.1f}G")
                losses, lrs, window_start, clock = [], [], done, time.perf_counter()
            if save_now and done < settings.steps and main:
                # adapter first: a kill between the two replays this step and rewrites the same file
                lora.save(run.transformer, run_dir / SNAPSHOTS / f"step-{done:08d}.safetensors",
                          provenance(model, settings, latents_dir, embeds_dir, done))
                checkpoint.save(run_dir, snapshot(run, done, log), settings.checkpoints_keep)
            if stop:
                raise TrainingStopped(f"train: stopped by {stop[0]} after step {done}/{settings.steps}; checkpoint "
                                      f"saved in {run_dir}. Rerun `dvc repro` (or the same command) to resume.")
    after = heldout_loss(run.model, run.data, run.dtype)
    facts = {"backend": backend, "dtype": hardware["dtype"], "device_name": device.device_name(backend),
             "torch": torch.__version__, "resolution": cache.read_index(latents_dir)["resolution"]}
    if main:
        with atomic.staged_dir(out_dir) as staging:
            lora.save(run.transformer, staging / lora_file.WEIGHT_NAME,
                      provenance(model, settings, latents_dir, embeds_dir, settings.steps))
            if (run_dir / SNAPSHOTS).is_dir():
                shutil.copytree(run_dir / SNAPSHOTS, staging / SNAPSHOTS)
        checkpoint.discard(run_dir)
    return TrainResult(steps=settings.steps, rows=log["rows"], heldout_before=log["heldout_before"],
                       heldout_after=after, batch_size=run.batch_size, gradient_accumulation=run.accumulation,
                       gradient_checkpointing=run.transformer.is_gradient_checkpointing,
                       world_size=run.accelerator.num_processes, peak_memory_gib=memory.peak_bytes(backend) / memory.GIB,
                       wall_s=time.perf_counter() - started, resumed_from=start, facts=facts)


def prepare(model: ModelParams, settings: TrainParams, hardware: dict, latents_dir: Path, embeds_dir: Path) -> Run:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    backend, dtype = hardware["backend"], getattr(torch, hardware["dtype"])
    accelerator = Accelerator(cpu=backend == "cpu")
    data = load_training_set(latents_dir, embeds_dir, accelerator.device)
    transformer = sd3.load_transformer(model, dtype, accelerator.device)
    if settings.gradient_checkpointing is True:
        transformer.enable_gradient_checkpointing()
    params = lora.attach(transformer, settings.rank, settings.alpha, settings.targets)
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  fused=backend == "cuda")
    scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                              num_training_steps=settings.steps)
    sigma_table = sd3.load_training_scheduler(model).sigmas.to(accelerator.device, torch.float32)
    batch_size = 1 if settings.batch_size == "auto" else settings.batch_size
    accumulation = settings.gradient_accumulation
    if settings.batch_size == "auto" and settings.effective_batch_size:
        accumulation = max(1, settings.effective_batch_size // batch_size)
    return Run(accelerator=accelerator, model=accelerator.prepare(transformer), transformer=transformer,
               params=params, optimizer=optimizer, scheduler=scheduler, data=data, sigma_table=sigma_table,
               dtype=dtype, settings=settings, batch_size=batch_size, accumulation=accumulation,
               generator=torch.Generator(accelerator.device))


def update(run: Run, step: int) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches; returns the step's loss, left on the device."""
    from contextlib import nullcontext

    settings, accelerator = run.settings, run.accelerator
    total = torch.zeros((), device=accelerator.device)
    for micro in range(run.accumulation):
        number = step * run.accumulation + micro  # global micro-batch number: fixes data, noise and sigmas
        run.generator.manual_seed((settings.seed * 1_000_003 + number) * 4099 + accelerator.process_index)
        batch = draw_batch(run, number)
        last = micro == run.accumulation - 1
        with nullcontext() if last else accelerator.no_sync(run.model):
            loss = batch_loss(run.model, batch, run.sigma_table, settings, run.dtype, run.generator,
                              run.batch_size) / run.accumulation
            accelerator.backward(loss)
        total += loss.detach()
    if settings.max_grad_norm is not None:
        accelerator.clip_grad_norm_(run.params, settings.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total


def draw_batch(run: Run, number: int) -> Batch:
    """This process's share of micro-batch `number`: B instance images (+ B class images with prior)."""
    accelerator, settings, size = run.accelerator, run.settings, run.batch_size
    start = (number * accelerator.num_processes + accelerator.process_index) * size
    parts = []
    for prior, seed, weight in ((False, settings.seed, 1.0), (True, settings.seed + 1, settings.prior_loss_weight)):
        population = run.data.select(prior)
        if len(population):
            index, flip = positions(population, seed, settings.repeats, start, size)
            parts.append(make_batch(run.data, index, flip, weight, run.generator))
    return Batch(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Batch)})


def log_rows(first_step: int, losses: list[float], lrs: list[float], seconds: float, backend: str) -> list[dict]:
    memory_gib = memory.used_bytes(backend) / memory.GIB
    return [{"step": first_step + i + 1, "loss": loss, "lr": lr, "s_per_step": seconds, "memory_gib": memory_gib}
            for i, (loss, lr) in enumerate(zip(losses, lrs))]


def snapshot(run: Run, step: int, log: dict) -> checkpoint.TrainingState:
    return checkpoint.TrainingState(step=step, adapter=lora.adapter_state(run.transformer),
                                    optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                                    log=log, rng=checkpoint.capture_rng())


def restore(run: Run, state: checkpoint.TrainingState) -> None:
    lora.load_adapter_state(run.transformer, state.adapter)
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    checkpoint.restore_rng(state.rng)


def run_fingerprint(model: ModelParams, settings: TrainParams, hardware: dict, latents_dir: Path,
                    embeds_dir: Path) -> str:
    """Identity of a run: what it trains on, how, with which code. Checkpoint policy is not part of it."""
    from yem import __version__

    how = {k: v for k, v in dataclasses.asdict(settings).items() if not k.startswith("checkpoint")}
    code = [Path(module.__file__) for module in (flow, lora, checkpoint)] + [Path(__file__)]
    inputs = [p for folder in (latents_dir, embeds_dir) for p in folder.rglob("*") if p.is_file()]
    return checkpoint.fingerprint({"model": dataclasses.asdict(model), "train": how, "hardware": hardware,
                                   "yem": __version__}, inputs + code)


def provenance(model: ModelParams, settings: TrainParams, latents_dir: Path, embeds_dir: Path,
               step: int) -> dict[str, str]:
    from yem import __version__

    embeds = cache.read_index(embeds_dir)
    return {"yem.version": __version__, "yem.base_model": model.id, "yem.base_model_revision": model.revision or "",
            "yem.instance_prompt": embeds.get("instance", ""), "yem.steps": str(step),
            "yem.resolution": str(cache.read_index(latents_dir)["resolution"]), "yem.rank": str(settings.rank),
            "yem.alpha": str(settings.alpha)}

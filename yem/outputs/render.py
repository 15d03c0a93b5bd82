"""Validation images: every prompt × seed without the LoRA, then with it, and a grid to compare at a glance.

Rendering uses the cached prompt embeddings, so no text encoder is loaded; the pipeline holds only the
transformer and the VAE. Seeds drive a CPU generator each, so the same seed gives the same starting noise on every
device and in any group of images, and the base and LoRA rows differ only by the adapter. The transformer runs
render.attention (chunked on MPS); the VAE decodes one image at a time, in tiles where memory asks for it.
"""

from collections import deque
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from yem import progress
from yem.data import cache
from yem.errors import HardwareError, YemError
from yem.hardware import device, fallbacks, out_of_memory
from yem.hardware.record import Hardware
from yem.model import architecture, attention, chunked, footprint, lora_file, sd3
from yem.params import ModelParams, RenderParams

GRID_CELL = 256  # px per image in the grid; full-size PNGs sit beside it
# Base and LoRA renders (same prompt, seed and starting noise) that differ by less than this many 8-bit levels on
# average look the same: the LoRA does nothing visible.
VISIBLE_CHANGE = 0.5
LABEL_HEIGHT = 28  # px above the images: the prompt and seed of each column
ROW_LABEL_WIDTH = 64  # px left of the images: the row's name (base, lora)


def render_validation(model: ModelParams, settings: RenderParams, hardware: Hardware, embeds_dir: Path,
                      lora_dir: Path, out_dir: Path | None) -> dict | None:
    """Write base/, step-N/ (render.checkpoints), lora/ PNGs and grid.png into `out_dir`; return the index.

    Images are rendered a few at a time, as many as the memory budget allows (`first_plan`), and fewer, then with
    the VAE decoding in tiles, after an out-of-memory error (`back_off`). Under `accelerate launch`
    (render.devices > 1) each process renders its share of those groups on its own device and hands the images to
    the main process, which alone writes (other processes pass out_dir None and get None). The index names the ops
    MPS ran on the CPU ("cpu_fallback_ops").
    """
    with fallbacks.watching(hardware.backend) as watch:
        index = _render_all(model, settings, hardware, embeds_dir, lora_dir, out_dir)
    return None if index is None else {**index, "cpu_fallback_ops": list(watch.report().ops)}


def _render_all(model: ModelParams, settings: RenderParams, hardware: Hardware, embeds_dir: Path, lora_dir: Path,
                out_dir: Path | None) -> dict | None:
    from accelerate import PartialState

    state = PartialState(cpu=hardware.backend == "cpu")
    weights = lora_dir / lora_file.WEIGHT_NAME
    header = lora_file.read_metadata(weights)
    resolution = settings.resolution or int(header["yem.resolution"])
    embeds = cache.read_index(embeds_dir)
    prompts = [embeds["texts"][key] for key in embeds["validation"]]
    conditions = [_condition(embeds_dir, key, embeds["negative"]) for key in embeds["validation"]]
    adapters = {"base": None, **{f"step {n}": lora_file.snapshot_path(lora_dir, n)
                                 for n in settings.checkpoints}, "lora": weights}
    cells = [{"prompt": prompt, "seed": seed, "file": f"p{p}-s{seed}.png", "condition": condition}
             for p, (prompt, condition) in enumerate(zip(prompts, conditions)) for seed in settings.seeds]
    plan = first_plan(model, settings, hardware, resolution, int(header.get("yem.rank", 16)))
    groups = [(row, list(range(start, min(start + plan.render_images, len(cells)))))
              for row in adapters for start in range(0, len(cells), plan.render_images)]
    mine = groups[state.process_index::state.num_processes]  # whole groups: the same batches on any device count
    rendered = _render_groups(model, settings, hardware, state, adapters, cells, mine, plan)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        rendered = gather_object(rendered)  # every process's (row, cell, image), in process order
    if not state.is_main_process:
        return None
    found = {(row, c): image for row, c, image in rendered}
    images = {row: [found[row, c] for c in range(len(cells))] for row in adapters}
    for row, row_images in images.items():
        folder = row.replace(" ", "-")  # "step 50" -> step-50/
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        for cell, image in zip(cells, row_images):
            image.save(out_dir / folder / cell["file"])
    grid(images, [f"{c['prompt']} · seed {c['seed']}" for c in cells]).save(out_dir / "grid.png")
    return {"rows": list(images), "cells": [{k: c[k] for k in ("prompt", "seed", "file")} for c in cells],
            "grid": "grid.png", "resolution": resolution, "steps": settings.steps,
            "guidance_scale": settings.guidance_scale, **lora_change(images["base"], images["lora"])}


def lora_change(base: list[Image.Image], tuned: list[Image.Image]) -> dict:
    """How much the LoRA changes the renders (the mean absolute pixel difference, in 8-bit levels), and whether
    that is visible."""
    import numpy as np

    change = float(np.mean([np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean()
                            for a, b in zip(base, tuned)]))
    return {"lora_change": change, "lora_visible": change >= VISIBLE_CHANGE}


def no_change_warning(index: dict) -> str | None:
    """One line when the LoRA renders look like the base model's; None when they differ visibly."""
    if index["lora_visible"]:
        return None
    return (f"render: the LoRA renders are the same as the base model's (got a mean difference of "
            f"{index['lora_change']:.2f} of 255 levels), so this LoRA does nothing visible. Raise train.learning_rate "
            f"or train.steps, then rerun.")


def first_plan(model: ModelParams, settings: RenderParams, hardware: Hardware, resolution: int,
               rank: int) -> footprint.Workload:
    """Images per pipeline call and VAE tiles: the fastest way the estimate fits in the budget (yem.model.footprint
    .render_plan); one image at a time with the least memory where the model's size is unknown."""
    work = footprint.Workload(backend=hardware.backend, dtype_bytes=hardware.torch_dtype.itemsize,
                              resolution=resolution, render_resolution=resolution, batch_size=1, checkpointing=False,
                              rank=rank, targets=4, use_t5=True, t5_tokens=0,
                              render_attention=chunked.resolve(settings.attention, hardware.backend),
                              chunk_budget=chunked.chunk_budget(hardware.budget_bytes))
    try:
        arch = architecture.architecture_for(model.id, model.revision)
    except YemError:
        return footprint.render_plans(work)[-1]
    return footprint.render_plan(arch, work, hardware.budget_bytes)


def back_off(plan: footprint.Workload) -> footprint.Workload:
    """After an out-of-memory error: the next of footprint.render_plans (fewer images per call, then smaller VAE
    tiles); HardwareError with advice when there is none left."""
    plans = footprint.render_plans(plan)
    position = next(i for i, p in enumerate(plans) if (p.render_images, p.vae_tile) == (plan.render_images,
                                                                                         plan.vae_tile))
    if position + 1 < len(plans):
        return plans[position + 1]
    chunk = ", set render.attention: chunked" if plan.render_attention == "sdpa" else ""
    raise HardwareError(f"render.resolution: one image at {plan.render_resolution} px ran out of memory even with "
                        f"the VAE decoding {plan.vae_tile} px tiles (got {plan.render_resolution}). Lower "
                        f"render.resolution (validation images may be smaller than training){chunk} or close "
                        f"other apps.")


def _render_groups(model: ModelParams, settings: RenderParams, hardware: Hardware, state, adapters: dict,
                   cells: list[dict], groups: list[tuple[str, list[int]]], plan: footprint.Workload) -> list[tuple]:
    """Render `groups` ((row, cell indices), grouped by row) on this process's device: [(row, cell, image)]."""
    dtype = hardware.torch_dtype
    device.empty_cache(hardware.backend)
    pipeline = sd3.load_render_pipeline(model, dtype, state.device)  # cuda:<local rank> under a launch
    attention.use(pipeline.transformer, settings.attention, hardware.backend, hardware.budget_bytes)
    pipeline.vae.enable_slicing()  # one image's decode at a time, however many are denoised together
    rendered, loaded, pending = [], None, deque(groups)
    with progress.bar(sum(len(c) for _, c in groups), "render", "img") as bar:
        while pending:
            row, group = pending.popleft()
            if row != loaded:
                pipeline.unload_lora_weights()
                if adapters[row] is not None:
                    pipeline.load_lora_weights(str(adapters[row].parent), weight_name=adapters[row].name)
                loaded = row
            batch = group[:plan.render_images]
            if len(group) > len(batch):
                pending.appendleft((row, group[len(batch):]))
            try:
                with fallbacks.sample("render"):  # the first group: what MPS ran on the CPU, and its time
                    images = render_batch(pipeline, [cells[c] for c in batch], settings, plan, dtype)
            except Exception as error:
                if not out_of_memory.is_out_of_memory(error):
                    raise
                pending.appendleft((row, batch))
                plan = _backed_off(plan, hardware.backend)
                continue
            rendered += [(row, c, image) for c, image in zip(batch, images)]
            bar.update(len(batch))
    return rendered


def _backed_off(plan: footprint.Workload, backend: str) -> footprint.Workload:
    smaller = back_off(plan)
    device.empty_cache(backend)
    tiles = f"VAE tiles of {smaller.vae_tile} px" if smaller.vae_tile else "whole-image VAE decode"
    progress.note(f"render: out of memory at {plan.render_images} image(s) per call; now {smaller.render_images} "
                  f"per call, {tiles}")
    return smaller


def _condition(embeds_dir: Path, key: str, negative: str) -> dict[str, torch.Tensor]:
    positive = cache.read_tensors(embeds_dir / f"{key}.safetensors")
    unconditional = cache.read_tensors(embeds_dir / f"{negative}.safetensors")
    return {"prompt_embeds": positive["prompt_embeds"][None],  # (1, 77 + T, D)
            "pooled_prompt_embeds": positive["pooled_prompt_embeds"][None],  # (1, P)
            "negative_prompt_embeds": unconditional["prompt_embeds"][None],
            "negative_pooled_prompt_embeds": unconditional["pooled_prompt_embeds"][None]}


@torch.inference_mode()
def render_batch(pipeline, batch: list[dict], settings: RenderParams, plan: footprint.Workload,
                 dtype) -> list[Image.Image]:
    """One pipeline call for the cells of `batch` ({"condition": embeddings, "seed": int}: their prompts stacked,
    one generator per seed), decoding as `plan` says (VAE tiles)."""
    _tile_vae(pipeline.vae, plan.vae_tile)
    on_device = {name: torch.cat([cell["condition"][name] for cell in batch]).to(pipeline.device, dtype)
                 for name in batch[0]["condition"]}
    generators = [torch.Generator("cpu").manual_seed(cell["seed"]) for cell in batch]
    return pipeline(**on_device, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                    height=plan.render_resolution, width=plan.render_resolution, generator=generators).images


def _tile_vae(vae, tile: int | None) -> None:
    """Decode in `tile` px tiles (blended over a quarter of their width), or whole images. diffusers' own tiles
    are the VAE's sample_size, 1024 px for SD3: they would never tile a 1024 px image."""
    if tile is None:
        vae.disable_tiling()
        return
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // footprint.VAE_SCALE


def grid(rows: dict[str, list[Image.Image]], labels: list[str]) -> Image.Image:
    """Rows (e.g. base, lora) of equally many images; a label above each column and at the left of each row."""
    columns, left = len(labels), ROW_LABEL_WIDTH
    canvas = Image.new("RGB", (left + columns * GRID_CELL, LABEL_HEIGHT + len(rows) * GRID_CELL), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    for c, label in enumerate(labels):
        draw.text((left + c * GRID_CELL + 4, 8), _fit(draw, label, font, GRID_CELL - 8), fill="black", font=font)
    for r, (name, images) in enumerate(rows.items()):
        top = LABEL_HEIGHT + r * GRID_CELL
        draw.text((6, top + GRID_CELL // 2 - 6), name, fill="black", font=font)
        for c, image in enumerate(images):
            canvas.paste(image.resize((GRID_CELL, GRID_CELL), Image.Resampling.LANCZOS), (left + c * GRID_CELL, top))
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text

"""Validation images: every prompt × seed without the LoRA, then with it, and a grid to compare at a glance.

Rendering uses the cached prompt embeddings, so no text encoder is loaded; the pipeline holds only the
transformer and the VAE. Seeds drive a CPU generator, so the same seed gives the same starting noise on every
device, and the base and LoRA rows differ only by the adapter.
"""

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from yem import progress
from yem.data import cache
from yem.hardware import device
from yem.hardware.record import Hardware
from yem.model import lora_file, sd3
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

    Under `accelerate launch` (render.devices > 1) each process renders its share of rows × prompts × seeds on
    its own device and hands the images to the main process, which alone writes (other processes pass
    out_dir None and get None).
    """
    from accelerate import PartialState

    state = PartialState(cpu=hardware.backend == "cpu")
    weights = lora_dir / lora_file.WEIGHT_NAME
    resolution = settings.resolution or int(lora_file.read_metadata(weights)["yem.resolution"])
    embeds = cache.read_index(embeds_dir)
    prompts = [embeds["texts"][key] for key in embeds["validation"]]
    conditions = [_condition(embeds_dir, key, embeds["negative"]) for key in embeds["validation"]]
    adapters = {"base": None, **{f"step {n}": lora_file.snapshot_path(lora_dir, n)
                                 for n in settings.checkpoints}, "lora": weights}
    cells = [{"prompt": prompt, "seed": seed, "file": f"p{p}-s{seed}.png", "condition": condition}
             for p, (prompt, condition) in enumerate(zip(prompts, conditions)) for seed in settings.seeds]
    jobs = [(row, c) for row in adapters for c in range(len(cells))]
    mine = jobs[state.process_index::state.num_processes]
    rendered = _render_jobs(model, settings, hardware, state, adapters, cells, mine, resolution)
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


def _render_jobs(model: ModelParams, settings: RenderParams, hardware: Hardware, state, adapters: dict,
                 cells: list[dict], jobs: list[tuple[str, int]], resolution: int) -> list[tuple]:
    """Render `jobs` ((row, cell index) pairs, grouped by row) on this process's device: [(row, cell, image)]."""
    dtype = hardware.torch_dtype
    device.empty_cache(hardware.backend)
    pipeline = sd3.load_render_pipeline(model, dtype, state.device)  # cuda:<local rank> under a launch
    rendered, loaded = [], None
    with progress.bar(len(jobs), "render", "img") as bar:
        for row, c in jobs:
            if row != loaded:
                pipeline.unload_lora_weights()
                if adapters[row] is not None:
                    pipeline.load_lora_weights(str(adapters[row].parent), weight_name=adapters[row].name)
                loaded = row
            image = _render(pipeline, cells[c]["condition"], cells[c]["seed"], settings, resolution, dtype, bar)
            rendered.append((row, c, image))
    return rendered


def _condition(embeds_dir: Path, key: str, negative: str) -> dict[str, torch.Tensor]:
    positive = cache.read_tensors(embeds_dir / f"{key}.safetensors")
    unconditional = cache.read_tensors(embeds_dir / f"{negative}.safetensors")
    return {"prompt_embeds": positive["prompt_embeds"][None],  # (1, 77 + T, D)
            "pooled_prompt_embeds": positive["pooled_prompt_embeds"][None],  # (1, P)
            "negative_prompt_embeds": unconditional["prompt_embeds"][None],
            "negative_pooled_prompt_embeds": unconditional["pooled_prompt_embeds"][None]}


@torch.inference_mode()
def _render(pipeline, condition: dict, seed: int, settings: RenderParams, resolution: int, dtype, bar) -> Image.Image:
    on_device = {name: t.to(pipeline.device, dtype) for name, t in condition.items()}
    image = pipeline(**on_device, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                     height=resolution, width=resolution, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    bar.update()
    return image


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

"""The Mac's code path measured on an NVIDIA GPU (issue 14): training and render peaks of full-size random SD3.

    python benchmarks/mac_path.py --json benchmarks/results/<date>-mac-path.json
    python benchmarks/mac_path.py --device cpu --dtype float32 --quick     # the same rows on the smoke model

A Mac trains eagerly in half precision with no autocast, and its SDPA is torch's math composite; yem runs chunked
attention there (train.attention: auto). Every row runs that path on this GPU: chunked attention sized for the
Mac named, or SDPA forced to math ("math"), fp16, eager, no autocast. The figure is torch's allocator peak
(max_memory_allocated, weights included), the one a Mac's budget is held against, beside yem's estimate of the
same run (yem.model.footprint), which `yem doctor` shows. Render rows build the SD3 pipeline from the random
transformer and VAE and run one call of two denoising steps as the render stage does (yem.outputs.render): images
per call and VAE tiles as the stage plans them for that Mac. The last rows redo an H100 comparison that the --sdpa
defect spoilt: yem's default CUDA step (bf16 autocast) under torch's attention priority, flash first, cuDNN first.
"""

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from yem.hardware.environment import configure_environment  # noqa: E402

configure_environment()  # before torch loads

import torch  # noqa: E402
import train_step  # noqa: E402

TRAIN = {  # part -> rows of (target, model, px, attention, variant, int8 base, Mac GB whose budget sizes chunks)
    "train": [("16 GB: train <= 7.0 GiB", "sd3-medium", 1024, "chunked", "checkpointed", False, 16),
              ("math path, for the time", "sd3-medium", 1024, "sdpa", "checkpointed", False, 16),
              ("estimate check", "sd3-medium", 1024, "chunked", "eager", False, 16),
              ("estimate check", "sd3-medium", 512, "chunked", "eager", False, 16),
              ("math path, for the time", "sd3-medium", 512, "sdpa", "eager", False, 16),
              ("8 GB: train <= 4.3 GiB", "sd3-medium", 512, "chunked", "eager", True, 8),
              ("8 GB: train <= 4.3 GiB", "sd3-medium", 512, "chunked", "checkpointed", True, 8),
              ("36 GB: train <= 20 GiB", "sd3.5-large", 1024, "chunked", "checkpointed", False, 36)],
    # the int8 constant was fitted on the 512 px eager row above: checked on runs it was not fitted on
    "int8-check": [("int8 estimate check", "sd3-medium", 1024, "chunked", "eager", True, 16),
                   ("int8 estimate check", "sd3.5-medium", 768, "chunked", "eager", True, 16)],
}
RENDER = [  # (target, model, px, attention, images per call and VAE tile: None = as planned for the Mac, Mac GB)
    ("16 GB: render <= 7.0 GiB", "sd3-medium", 1024, "chunked", None, 16),
    ("estimate check", "sd3-medium", 1024, "chunked", (1, 512), 16),
    ("math path", "sd3-medium", 1024, "sdpa", (1, None), 16),
]
CUDA_DEFAULT = [None, ["flash"], ["cudnn"]]  # SDPA priorities for yem's default CUDA step, eager


def train_args(cli, model: str, attention: str, int8: bool, mac_gb: int | None, mps_path: bool, rank: int,
               sdpa: list[str] | None = None) -> argparse.Namespace:
    """The arguments train_step.measure reads, for one row."""
    return argparse.Namespace(model=model, device=cli.device, dtype=cli.dtype if mps_path else "bfloat16",
                              quantize_base="int8" if int8 else "none", targets=train_step.YEM_TARGETS,
                              rank=rank, batch=1, warmup=cli.warmup, steps=cli.steps, saved_activations=1.0,
                              sdpa=sdpa, mps_path=mps_path, mac_gb=mac_gb, attention=attention)


def train_rows(cli) -> list[dict]:
    rows = []
    for target, model, px, attention, variant, int8, mac_gb in [r for part in cli.parts for r in TRAIN.get(part, [])]:
        model, px = (("smoke", 128) if cli.quick else (model, px))
        args = train_args(cli, model, attention, int8, mac_gb, mps_path=True, rank=16)
        with train_step.forced_attention(None, mps_path=True), train_step.without_autocast():
            rows.append({"target": target, **train_step.measure(args, variant, px, None)})
        print_row(rows[-1])
    for sdpa in CUDA_DEFAULT if cli.device == "cuda" and "cuda" in cli.parts else []:
        args = train_args(cli, "sd3-medium", "auto", False, None, mps_path=False, rank=4, sdpa=sdpa)
        with train_step.forced_attention(sdpa):
            rows.append({"target": "CUDA default step, eager", **train_step.measure(args, "eager", 1024, None)})
        print_row(rows[-1])
    return rows


def render_rows(cli) -> list[dict]:
    """The RENDER rows of one model, on one pipeline (the attention and plan change between rows)."""
    from yem.hardware import peaks
    from yem.model import attention

    rows, pipeline = [], None
    for target, model, px, kind, fixed, mac_gb in RENDER:
        model, px = (("smoke", 128) if cli.quick else (model, px))
        pipeline = pipeline or build_pipeline(model, cli)
        budget = train_step.mac_budget(mac_gb)
        attention.use(pipeline.transformer, kind, "mps", budget)
        plan = render_plan(model, px, kind, budget, fixed)
        cells = [{"condition": random_condition(seed), "seed": seed} for seed in range(plan.render_images)]
        if cli.device == "cuda":
            torch.cuda.empty_cache()
        peaks.reset_peak(cli.device)
        started = time.perf_counter()
        with train_step.forced_attention(None, mps_path=True):  # the VAE's attention as MPS runs it
            images = render_call(pipeline, cells, plan, cli)
        seconds = time.perf_counter() - started
        rows.append({"target": target, "model": model, "resolution": px, "attention": kind, "mac_gb": mac_gb,
                     "images": plan.render_images, "vae_tile": plan.vae_tile, "s_per_call": seconds,
                     "peak_gib": peaks.peak_bytes(cli.device) / 2**30, "rendered": len(images),
                     "estimate_gib": render_estimate(model, plan) / 2**30 if model in train_step.KNOWN else None,
                     "proof": {"processors": sorted({type(p).__name__ for p in
                                                     pipeline.transformer.attn_processors.values()}),
                               "vae_tiling": pipeline.vae.use_tiling, "vae_slicing": pipeline.vae.use_slicing}})
        print_row(rows[-1])
    return rows


def build_pipeline(model: str, cli):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    dtype = getattr(torch, cli.dtype)
    transformer = train_step.build_transformer(model, dtype, cli.device)
    with torch.device(cli.device):
        vae = AutoencoderKL(**train_step.VAE).to(dtype).requires_grad_(False)
    pipeline = StableDiffusion3Pipeline(transformer=transformer, vae=vae,
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=None,
                                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                        tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.vae.enable_slicing()  # as the render stage does
    return pipeline


def render_plan(model: str, px: int, kind: str, budget: int, fixed: tuple | None):
    from yem.model import chunked, footprint

    work = footprint.Workload(backend="mps", dtype_bytes=2, resolution=px, render_resolution=px, batch_size=1,
                              checkpointing=False, rank=4, targets=4, use_t5=True, t5_tokens=77,
                              render_attention=kind, chunk_budget=chunked.chunk_budget(budget))
    if fixed is not None:
        return dataclasses.replace(work, render_images=fixed[0], vae_tile=fixed[1])
    if model not in train_step.KNOWN:
        return footprint.render_plans(work)[0]
    return footprint.render_plan(known(model), work, budget)


def render_estimate(model: str, plan) -> int:
    from yem.model import footprint

    return footprint.render_stage(known(model), plan).total


def known(model: str):
    from yem.model.architecture import KNOWN_MODELS

    return KNOWN_MODELS[train_step.KNOWN[model]]


def random_condition(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(1, train_step.TEXT_TOKENS, 4096, generator=g),
            "pooled_prompt_embeds": torch.randn(1, 2048, generator=g),
            "negative_prompt_embeds": torch.randn(1, train_step.TEXT_TOKENS, 4096, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(1, 2048, generator=g)}


def render_call(pipeline, cells: list[dict], plan, cli) -> list:
    from yem.outputs.render import render_batch

    settings = argparse.Namespace(steps=2, guidance_scale=7.0)
    with contextlib.suppress(RuntimeWarning):  # random weights: the decoded pixels may not be finite
        images = render_batch(pipeline, cells, settings, plan, getattr(torch, cli.dtype))
    if cli.device == "cuda":
        torch.cuda.synchronize()
    return images


def print_row(row: dict) -> None:
    estimate = row.get("estimate_gib")
    error = f"{100 * (estimate - row['peak_gib']) / row['peak_gib']:+.0f} %" if estimate else "-"
    what = (f"{row['variant']}{'+int8' if row['quantize_base'] == 'int8' else ''} {row['proof']['attention']}"
            f" ({row['proof']['sdpa_backward']}) {row['s_per_step']:.3f} s/step" if "variant" in row else
            f"render {row['images']} img, tile {row['vae_tile']}, {row['attention']} {row['s_per_call']:.1f} s")
    print(f"| {row['target']} | {row['model']} | {row['resolution']} | {what} | {row['peak_gib']:.2f} | "
          f"{estimate or 0:.2f} | {error} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the smoke model at 128 px: a check of the script")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--parts", nargs="+", default=["train", "int8-check", "render", "cuda"],
                        choices=["train", "int8-check", "render", "cuda"])
    cli = parser.parse_args()
    print("| target | model | px | what ran | peak GiB | estimate GiB | estimate vs peak |")
    print("|---|---|---|---|---|---|---|")
    rows = train_rows(cli) + (render_rows(cli) if "render" in cli.parts else [])
    if cli.json:
        cli.json.write_text(json.dumps({"torch": torch.__version__, "device": train_step.device_label(cli.device),
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

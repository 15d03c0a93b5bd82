"""Benchmark yem's real training step on a full-size random-weight SD3 transformer (no download).

    python benchmarks/train_step.py --model sd3-medium --resolution 1024 512 --variants eager compiled
    python benchmarks/train_step.py --device mps --model sd3-medium --resolution 512 --variants eager
    python benchmarks/train_step.py --device cpu --dtype float32 --resolution 256 --quantize-base int8
    python benchmarks/train_step.py --mps-path --attention chunked --variants checkpointed --mac-gb 16 --rank 16

`--mps-path` runs the step as a Mac would on any GPU: eager, no autocast (yem autocasts on CUDA only), and SDPA
forced to torch's math backend (MPS has no other); `--attention chunked` is train.attention's chunked attention,
its chunks sized for a Mac of `--mac-gb` GB. Each row records proof of its settings: the autograd node of an SDPA
call under the row's attention settings (the math composite's is UnsafeViewBackward0, CPU flash attention's
ScaledDotProductFlashAttentionForCpuBackward0), the transformer's attention processor and checkpointing state,
and whether autocast was on; and yem's estimate of the same run (yem.model.footprint) beside the measured peak.

Builds the transformer at the real config directly on the device (random weights in the training dtype),
synthetic cached latents and prompt embeddings of the real shapes, then runs `yem.training.loop.update` — the exact
step the train stage runs (LoRA via peft, fused AdamW, on-device sigma sampling, no host sync inside the
step). Prints a table: s/step (median of timed steps after warm-up), peak memory, FLOPs per step (counted by
torch's FlopCounterMode on the real step), achieved TFLOP/s and its share of a large bf16 matmul measured on
the same device, and the compile time (time of the warm-up steps beyond the eager ones). `--quantize-base int8`
stores the frozen base in int8 first, as train.quantize_base does; the weights column is the transformer's exact
size (parameters and buffers, int8 data and scales) before the adapter. On a CPU the peak is the process's peak
RSS, which memory freed by an earlier row can inflate: compare quantized and not in separate runs there.
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from yem.hardware.environment import configure_environment  # noqa: E402

configure_environment()

import torch  # noqa: E402

ARCHITECTURES = {  # diffusers SD3Transformer2DModel configs (see notes/diffusers.md §4)
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "smoke": dict(num_layers=2, num_attention_heads=2, caption_projection_dim=128, pos_embed_max_size=192),  # CPU check
}
COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
              joint_attention_dim=4096, pooled_projection_dim=2048)
KNOWN = {"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
         "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
         "sd3.5-large": "stabilityai/stable-diffusion-3.5-large"}
BACKENDS = ("cudnn", "flash", "efficient", "math")
YEM_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]  # params.yaml's train.targets
TEXT_TOKENS = 154  # 77 CLIP + 77 T5, as the reference trains
VARIANTS = {"eager": dict(compile=False, gradient_checkpointing=False),
            "compiled": dict(compile=True, gradient_checkpointing=False),
            "checkpointed": dict(compile=False, gradient_checkpointing=True),
            "compiled+checkpointed": dict(compile=True, gradient_checkpointing=True),
            "compiled+graphs": dict(compile=True, gradient_checkpointing=False),  # mode reduce-overhead
            # the diffusers example's step (benchmarks/reference_step.py), for the side-by-side ratio
            "reference": {}, "reference+checkpointed": {}, "reference+vae": {}}
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
           use_quant_conv=False, use_post_quant_conv=False)


def build_transformer(name: str, dtype: torch.dtype, device: str):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the training dtype: no fp32 copy, as loading would do
    try:
        with torch.device(device):
            model = SD3Transformer2DModel(**COMMON, **ARCHITECTURES[name])
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False)


def synthetic_set(count: int, resolution: int, device: str):
    """`count` random square latents in one bucket, each with its own random prompt."""
    from yem.data.trainset import Stack, TrainingSet

    side = resolution // 8
    g = torch.Generator().manual_seed(0)
    stack = Stack(mean=torch.randn(count, 16, side, side, generator=g).to(device),
                  std=torch.full((count, 16, side, side), 0.05).to(device), flip_mean=None, flip_std=None)
    return TrainingSet(ids=[f"instance/{i}" for i in range(count)], stacks=[stack],
                       bucket=torch.zeros(count, dtype=torch.long), slot=torch.arange(count),
                       prompt=torch.arange(count).to(device),
                       joint=torch.randn(count, TEXT_TOKENS, 4096, generator=g).to(device),
                       pooled=torch.randn(count, 2048, generator=g).to(device), empty=None,
                       prior=torch.zeros(count, dtype=torch.bool))


def settings_for(args, variant: str):
    from yem.params import load_params

    base = load_params(Path(__file__).resolve().parents[1] / "params.yaml").train
    return dataclasses.replace(base, steps=args.warmup + args.steps, batch_size=args.batch, rank=args.rank,
                               alpha=float(args.rank), learning_rate=1e-4, lr_scheduler="constant",
                               lr_warmup_steps=0, targets=args.targets, saved_activations=args.saved_activations,
                               quantize_base=args.quantize_base, attention=args.attention,
                               **VARIANTS[variant])


def make_step(args, variant: str, resolution: int, accelerator, dtype: torch.dtype):
    """A function step(number) running one training step of `variant` on fresh random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from yem.model import sd3
    from yem.params import ThermalParams
    from yem.training import loop, setup

    transformer = sd3.quantize_frozen_base(build_transformer(args.model, dtype, accelerator.device),
                                           args.quantize_base)
    args.weight_bytes = weight_bytes(transformer)
    data = synthetic_set(8, resolution, args.device)
    if variant.startswith("reference"):
        import reference_step

        vae, pixels = None, None
        if variant == "reference+vae":
            from diffusers import AutoencoderKL

            with torch.device(args.device):
                vae = AutoencoderKL(**VAE).requires_grad_(False)  # fp32, as the example keeps it
            pixels = torch.rand(8, 3, resolution, resolution) * 2 - 1
        run = reference_step.build(accelerator, transformer, args.targets, args.rank, data.stacks[0].mean,
                                   data.stacks[0].std,
                                   data.joint.to(dtype), data.pooled.to(dtype), args.batch,
                                   variant == "reference+checkpointed", vae, pixels)
        return lambda number: reference_step.step(run, number)
    heat = ThermalParams(policy="ignore", max_pause_s=0)
    setup.COMPILE_MODES["cuda"] = "reduce-overhead" if variant == "compiled+graphs" else "default"
    run = setup.assemble(accelerator, transformer, data, FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas,
                         settings_for(args, variant), dtype, heat, run_dir=Path("/nonexistent"), provenance={},
                         budget=mac_budget(args.mac_gb))
    args.proof = proof(run.transformer, run.attention, dtype)
    return lambda number: loop.update(run, number)


def mac_budget(mac_gb: int | None) -> int | None:
    """yem's memory budget on a Mac of `mac_gb` GB (chunked attention sizes its chunks from it)."""
    if mac_gb is None:
        return None
    from yem.hardware import apple
    from yem.hardware.budget import memory_budget

    return memory_budget(apple.mac_readings(mac_gb)).bytes


def proof(transformer, kind: str, dtype: torch.dtype) -> dict:
    """What ran: the transformer's attention processor(s) and checkpointing, autocast, and the autograd node an SDPA
    call in the run's dtype gets under the attention backends in force (the processor replaces only the
    transformer's calls)."""
    import torch.nn.functional as F

    from yem.hardware import device

    probe = torch.randn(1, 2, 64, 64, dtype=dtype, requires_grad=True, device=next(transformer.parameters()).device)
    with device.autocast(probe.device.type, torch.float16) as autocast:
        enabled = autocast is not None and torch.is_autocast_enabled(probe.device.type)
    try:
        node = F.scaled_dot_product_attention(probe, probe, probe).grad_fn.name()
    except RuntimeError as error:  # the forced backends have no kernel for the probe's dtype and shape
        node = f"no kernel for the probe: {error}"
    return {"attention": kind, "processors": sorted({type(p).__name__ for p in transformer.attn_processors.values()}),
            "checkpointing": transformer.is_gradient_checkpointing, "autocast": enabled, "sdpa_backward": node}


def forced_attention(names: list[str] | None, mps_path: bool = False):
    """The SDPA backends to use, kept in force for as long as the returned context is open (a context entered
    on a temporary is collected at once and restores the old backends: the --sdpa bug of issue 14)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if mps_path:
        names = ["math"]  # MPS has no other backend
    if not names:
        return contextlib.nullcontext()
    backends = {name: getattr(SDPBackend, {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                                           "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[name])
                for name in BACKENDS}
    return sdpa_kernel([backends[n] for n in names], set_priority=True)


@contextlib.contextmanager
def without_autocast():
    """yem's step without its CUDA autocast, as on a Mac (peft's LoRA path then computes in fp32)."""
    from yem.hardware import device

    original = device.autocast
    device.autocast = lambda backend, dtype: contextlib.nullcontext()
    try:
        yield
    finally:
        device.autocast = original


def weight_bytes(module: torch.nn.Module) -> int:
    """Exact bytes of a module's parameters and buffers; quantized tensors (tensor subclasses) count their
    inner tensors (int8 data, scales)."""
    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    return sum(size(t) for t in [*module.parameters(), *module.buffers()])


def measure(args, variant: str, resolution: int, peak_tflops: float | None) -> dict:
    from yem.hardware import memory, peaks
    from yem.params import ThermalParams
    from yem.training import setup

    device, dtype = args.device, getattr(torch, args.dtype)
    accelerator = setup.make_accelerator(device, ThermalParams(policy="ignore", max_pause_s=0))
    torch._dynamo.reset()  # each row compiles afresh: no cache (or cache limit) carried from the previous row
    step = make_step(args, variant, resolution, accelerator, dtype)
    peaks.reset_peak(device)  # weights stay counted (allocated now); the peak is the training step's
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device, lambda: None)
    started = time.perf_counter()
    for number in range(args.warmup):
        step(number)
    sync()
    warmup_s = time.perf_counter() - started
    seconds = median_seconds(args, step, device, sync)
    peak = peaks.peak_bytes(device)  # before counting FLOPs: under FlopCounterMode the step runs unfused
    loss = step(args.warmup)
    flops = count_flops(step, args.warmup + 1)
    row = {"model": args.model, "device": device_label(device), "variant": variant, "resolution": resolution,
           "batch": args.batch, "rank": args.rank, "s_per_step": seconds, "quantize_base": args.quantize_base,
           "weights_gib": getattr(args, "weight_bytes", 0) / memory.GIB,
           "peak_gib": peak / memory.GIB, "tflop_per_step": flops / 1e12,
           "tflops": flops / seconds / 1e12, "warmup_s": warmup_s,
           "loss_finite": bool(torch.isfinite(torch.as_tensor(loss))),
           "saved_activations": args.saved_activations, "sdpa": args.sdpa, "mps_path": args.mps_path,
           "mac_gb": args.mac_gb, "proof": getattr(args, "proof", None),
           "estimate_gib": estimate(args, variant, resolution) / memory.GIB if args.model in KNOWN else None,
           "estimated_s_per_step": estimated_seconds(args, variant, resolution)}
    row["pct_of_matmul"] = 100 * row["tflops"] / peak_tflops if peak_tflops else None
    del step
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return row


def median_seconds(args, step, device: str, sync) -> float:
    """Median step time over `args.steps` steps, each bracketed by device events (CUDA: the host never waits,
    so the queue stays full as in training) or by a host clock after a sync."""
    samples = []
    for number in range(10_000, 10_000 + args.steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(number)
            end.record()
            samples.append((start, end))
        else:
            begin = time.perf_counter()
            step(number)
            sync()
            samples.append(time.perf_counter() - begin)
    sync()
    if device == "cuda":
        samples = [s.elapsed_time(e) / 1000 for s, e in samples]
    return statistics.median(samples)


def estimate(args, variant: str, resolution: int) -> int:
    """yem's estimate of this row's peak (yem.model.footprint), for the attention it ran, on the MPS path where the
    row runs it."""
    from yem.model import footprint
    from yem.model.architecture import KNOWN_MODELS

    work = footprint_workload(settings_for(args, variant), args, resolution)
    return footprint.train_stage(KNOWN_MODELS[KNOWN[args.model]], work).total


def footprint_workload(settings, args, resolution: int):
    """The row as yem.model.footprint describes a run, on the MPS path where the row runs it."""
    from yem.model import chunked, footprint

    backend = "mps" if args.mps_path else args.device
    work = footprint.training_workload(settings, backend, getattr(torch, args.dtype).itemsize, (resolution, resolution),
                                       TEXT_TOKENS, images=8, prompts=8, memory_budget=mac_budget(args.mac_gb))
    return dataclasses.replace(work, batch_size=args.batch, attention=args.attention if args.attention != "auto"
                               else chunked.resolve("auto", args.device))


def estimated_seconds(args, variant: str, resolution: int) -> float | None:
    """On a Mac yem knows the chip of, the s/step `yem doctor --memory` estimates for this row (yem.training.macs),
    for the measured s/step to be set beside."""
    from yem.hardware import apple
    from yem.model.architecture import KNOWN_MODELS
    from yem.training import macs

    chip = apple.chip(device_label(args.device)) if args.device == "mps" else None
    if chip is None or args.model not in KNOWN:
        return None
    settings = settings_for(args, variant)
    work = footprint_workload(settings, args, resolution)
    return macs.seconds_per_step(KNOWN_MODELS[KNOWN[args.model]], work, chip)


def count_flops(step, number: int) -> float:
    """FLOPs torch counts in one step, the in-place batched matmuls of chunked attention's backward (dK, dV),
    which FlopCounterMode leaves out, included."""
    from torch.utils.flop_counter import FlopCounterMode

    def inplace_baddbmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: inplace_baddbmm}) as counter:
        step(number)
    return counter.get_total_flops()


def matmul_tflops(device: str, dtype: torch.dtype) -> float | None:
    """bf16/fp16 rate of a large matmul on this device: the ceiling the step is compared with."""
    if device == "cpu":
        return None
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}[device]
    for _ in range(3):
        a @ b
    sync()
    begin = time.perf_counter()
    for _ in range(20):
        a @ b
    sync()
    return 2 * n**3 * 20 / (time.perf_counter() - begin) / 1e12


def device_label(device: str) -> str:
    from yem.hardware.device import device_name

    return device_name(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else
                        "mps" if torch.backends.mps.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model", default="sd3-medium", choices=sorted(ARCHITECTURES))
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024])
    parser.add_argument("--variants", nargs="+", default=["eager", "compiled"], choices=sorted(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", nargs="+", default=YEM_TARGETS)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--saved-activations", type=float, default=1.0, help="train.saved_activations for the "
                        "compiled variants: the share of activations kept for backward (the rest is recomputed)")
    parser.add_argument("--sdpa", nargs="+", choices=BACKENDS, help="attention backends to try first, in this "
                        "order (default: torch's own priority)")
    parser.add_argument("--attention", choices=["auto", "sdpa", "chunked"], default="auto", help="train.attention")
    parser.add_argument("--mps-path", action="store_true", help="as on a Mac: no autocast, SDPA forced to math")
    parser.add_argument("--mac-gb", type=int, help="size chunked attention's chunks for a Mac of this many GB")
    parser.add_argument("--quantize-base", choices=["none", "int8"], default="none", help="train.quantize_base: "
                        "int8 stores the frozen base in int8 (optimum-quanto) before the adapter is attached")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    peak = matmul_tflops(args.device, getattr(torch, args.dtype))
    with forced_attention(args.sdpa, args.mps_path), \
            without_autocast() if args.mps_path else contextlib.nullcontext():  # kept open for every row
        rows = [measure(args, variant, resolution, peak) for resolution in args.resolution
                for variant in args.variants]
    if args.json:
        args.json.write_text(json.dumps({"matmul_tflops": peak, "torch": torch.__version__, "rows": rows}, indent=1))
    print_table(rows, peak)


def print_table(rows: list[dict], peak: float | None) -> None:
    print(f"\nmatmul ceiling: {peak:.0f} TFLOP/s" if peak else "\nmatmul ceiling: n/a (cpu)")
    header = f"{'model':<13}{'variant':<23}{'res':>5}{'bs':>3}{'s/step':>9}{'weights':>8}{'peak GiB':>9}" \
             f"{'est GiB':>8}{'TFLOP':>7}{'TFLOP/s':>9}{'% mm':>6}{'warm-up s':>10}  attention"
    print(header)
    for r in rows:
        pct = f"{r['pct_of_matmul']:.0f}" if r["pct_of_matmul"] is not None else "-"
        variant = r["variant"] + ("+int8" if r["quantize_base"] == "int8" else "")
        est = f"{r['estimate_gib']:.2f}" if r.get("estimate_gib") else "-"
        ran = r["proof"]["attention"] + f" ({r['proof']['sdpa_backward']})" if r.get("proof") else "-"
        print(f"{r['model']:<13}{variant:<23}{r['resolution']:>5}{r['batch']:>3}{r['s_per_step']:>9.4f}"
              f"{r['weights_gib']:>8.2f}{r['peak_gib']:>9.2f}{est:>8}{r['tflop_per_step']:>7.1f}{r['tflops']:>9.1f}"
              f"{pct:>6}{r['warmup_s']:>10.1f}  {ran}")


if __name__ == "__main__":
    main()

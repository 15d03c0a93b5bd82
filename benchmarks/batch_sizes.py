"""Benchmark, not a test: the batch yem's planner chooses for a few memory budgets, and the peak it measured.

Real training steps (forward + backward) of the offline tiny SD3 with yem's LoRA, on whatever device is present
(cuda, then mps, then cpu), planned by yem.training.batching exactly as training plans them: each budget is the
memory the
process holds once the model is loaded plus some room for activations. On CUDA and MPS the budget is also applied
as the allocator's hard limit (budget.apply_budget), so a step that overshoots raises out-of-memory as it would in
training. The last column is what yem.model.footprint predicted for the same room, for comparison.

    python benchmarks/batch_sizes.py                      # 1024 px, rooms of 64 MiB to 2 GiB
    python benchmarks/batch_sizes.py --resolution 512 --rooms 16,64,256
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yem.hardware.environment import configure_environment  # noqa: E402  (before torch)

configure_environment()

import torch  # noqa: E402

from yem import doctor  # noqa: E402
from yem.hardware import budget, device, memory, peaks  # noqa: E402
from yem.hardware.memory import MIB  # noqa: E402
from yem.model import architecture, footprint, lora  # noqa: E402
from yem.model.tiny import ensure_tiny_model  # noqa: E402
from yem.training import batching  # noqa: E402

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
TEXT_TOKENS = 77 + 77  # CLIP + T5 at encode.max_sequence_length 77


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rooms", default="64,128,256,512,1024,2048", help="MiB of room above the loaded model")
    parser.add_argument("--max-batch", type=int, default=batching.MAX_AUTO_BATCH)
    args = parser.parse_args()
    backend = device.pick_backend("auto")
    transformer, arch = load(backend)
    measure = measurer(transformer, backend, args.resolution)
    device.empty_cache(backend)
    baseline = memory.used_bytes(backend)
    readings = memory.read(backend)
    print(f"{device.device_name(backend)} ({backend}), tiny SD3 at {args.resolution} px, fp32; "
          f"held after loading: {memory.gib(baseline)}")
    print(f"{'room':>9} {'budget':>10} {'batch':>6} {'accum':>6} {'ckpt':>5} {'peak':>10} {'steps':>6} "
          f"{'seconds':>8} {'estimate':>9}")
    for room in (int(r) * MIB for r in args.rooms.split(",")):
        row(measure, backend, baseline, room, readings, arch, args)


def load(backend: str):
    from diffusers import SD3Transformer2DModel

    folder = ensure_tiny_model()
    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").to(backend)
    transformer.requires_grad_(False)
    lora.attach(transformer, 4, 4, TARGETS)
    transformer.train()
    return transformer, architecture.architecture_from_folder(folder, "tiny SD3")


def measurer(transformer, backend: str, resolution: int) -> batching.Measure:
    """The measure the training loop provides: one real forward + backward, its peak by peaks.peak_bytes."""
    side = resolution // 8
    joint, pooled = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim

    def measure(batch: int, checkpointing: bool) -> int:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        else:
            transformer.disable_gradient_checkpointing()
        device.empty_cache(backend)
        peaks.reset_peak(backend)
        try:
            inputs = dict(hidden_states=torch.randn(batch, 16, side, side, device=backend),
                          timestep=torch.full((batch,), 500.0, device=backend),
                          encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, joint, device=backend),
                          pooled_projections=torch.randn(batch, pooled, device=backend))
            transformer(**inputs, return_dict=False)[0].square().mean().backward()
            device.synchronize(backend)
            return peaks.peak_bytes(backend)
        finally:
            transformer.zero_grad(set_to_none=True)

    return measure


def row(measure, backend: str, baseline: int, room: int, readings, arch, args) -> None:
    limit = baseline + room
    if backend != "cpu":
        budget.apply_budget(budget.Budget(limit, "benchmark"), readings, env={})
    calls = []

    def counted(batch: int, checkpointing: bool) -> int:
        calls.append(batch)
        return measure(batch, checkpointing)

    settings = batching.BatchSettings("auto", 1, None, "auto", max_batch=args.max_batch)
    start = time.perf_counter()
    try:
        plan = batching.plan_batch(counted, limit, settings)
        chosen = (f"{plan.batch_size:>6} {plan.accumulation:>6} {'on' if plan.checkpointing else 'off':>5} "
                  f"{memory.gib(plan.peak) if plan.peak else '-':>10}")
    except Exception as error:  # HardwareError: not even batch 1 fits this room
        chosen = f"{'none: ' + type(error).__name__:>39}"
    work = footprint.Workload(backend=backend, dtype_bytes=4, resolution=args.resolution,
                             render_resolution=args.resolution, batch_size=1, checkpointing=False, rank=4,
                             targets=len(TARGETS), use_t5=True, t5_tokens=77, images=0, prompts=0)
    fixed = footprint.train_stage(arch, work).total - footprint.train_stage(arch, work).parts["activations"]
    predicted = doctor.largest_batch(arch, work, fixed + room)
    print(f"{memory.gib(room):>9} {memory.gib(limit):>10} {chosen} {len(calls):>6} "
          f"{time.perf_counter() - start:>8.1f} {predicted:>9}")


if __name__ == "__main__":
    main()

"""Benchmark the whole yem pipeline on a full-size random-weight SD3-medium (no download).

    python benchmarks/pipeline.py --workdir /tmp/yem-bench --resolution 1024 --steps 100

Builds SD3-medium at its real size with random weights (CLIP-L, CLIP-G, T5-XXL, the MMDiT and the VAE; the
tokenizers are yem's offline ones, whose ids fit the real vocabularies) and saves it as a diffusers folder. Then
runs the six stages exactly as dvc.yaml lists them (the same commands, in order, in a copy of the project), and
prints each stage's wall time and peak GPU memory, twice: torch's allocator peak (benchmarks/stage_peak.py) and
nvidia-smi's (sampled every 0.2 s: whole process, CUDA context included), the train stage's launch-to-first-step
time, and the total. `--repeat-train` then reruns
the train stage alone with another rank, as `dvc exp run -S train.rank=8` would with warm caches.
"""

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, relative_attention_max_distance=128, vocab_size=32128)


def build_random_sd3(folder: Path) -> None:
    """Save a full-size random SD3-medium pipeline (bf16 weights, fp32 VAE) to `folder`."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from benchmarks.train_step import VAE, build_transformer
    from yem.model.tiny import _write_clip_tokenizer, _write_t5_tokenizer

    scratch = Path(tempfile.mkdtemp())
    clip_tokenizer, t5_tokenizer = _write_clip_tokenizer(scratch / "c"), _write_t5_tokenizer(scratch / "t")
    special = dict(bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                   pad_token_id=clip_tokenizer.pad_token_id, vocab_size=49408, max_position_embeddings=77)
    with torch.device("cuda"):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **special)).to(torch.bfloat16)
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **special)).to(torch.bfloat16)
        t5 = T5EncoderModel(T5Config(**T5_XXL, dropout_rate=0.0)).to(torch.bfloat16)
        vae = AutoencoderKL(**VAE)
    pipeline = StableDiffusion3Pipeline(
        transformer=build_transformer("sd3-medium", torch.bfloat16, "cuda"), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=clip_l, tokenizer=clip_tokenizer,
        text_encoder_2=clip_g, tokenizer_2=clip_tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipeline.save_pretrained(folder)


def build_in_child(folder: Path) -> None:
    """Build in another process, so that nvidia-smi's readings of the stages don't include the model built."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=build_random_sd3, args=(folder,))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"building the random model failed (exit {child.exitcode})")


class GpuMemory:
    """Peak GPU memory of everything running, sampled with nvidia-smi while a stage runs."""

    def __init__(self):
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        if not shutil.which("nvidia-smi"):
            return  # no NVIDIA GPU: the allocator column (0 on a CPU) is all there is
        while not self._stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.peak_mib = max(self.peak_mib, max(int(v) for v in out.stdout.split()))


def make_project(workdir: Path, model: Path, args) -> Path:
    from yem.params import set_values

    project = workdir / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    for name in ["dvc.yaml", "params.yaml", "stages", "yem", "data"]:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, project / name)
    set_values(project / "params.yaml", {
        "model.id": str(model), "data.resolution": args.resolution, "train.steps": args.steps,
        "train.learning_rate": 1e-4, "train.checkpoint_every": max(args.steps // 2, 1), "render.steps": 28,
        "render.seeds": [0], "render.guidance_scale": 7.0, "export.formats": ["diffusers", "comfyui", "kohya"]})
    return project


def run_stages(project: Path, timeout_s: float, only: set[str] | None = None) -> list[dict]:
    from ruamel.yaml import YAML

    stages = YAML(typ="safe").load((project / "dvc.yaml").read_text())["stages"]
    rows = []
    for name, spec in stages.items():
        if only and name not in only:
            continue
        print(f"{name}: running", flush=True)
        started = time.perf_counter()
        with GpuMemory() as gpu:
            peak_file = project / f"{name}.peak.json"
            command = spec["cmd"].replace("python -m ", f"{sys.executable} {REPO / 'benchmarks/stage_peak.py'} "
                                          f"{peak_file} -m ", 1)
            process = subprocess.Popen(command, shell=True, cwd=project)  # its output is shown live
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                dump_stacks(process.pid)
                process.kill()
                raise SystemExit(f"stage {name} ran past {timeout_s:.0f} s: its stacks are above") from None
        if process.returncode != 0:
            raise SystemExit(f"stage {name} failed (exit {process.returncode}); its output is above")
        allocated = json.loads(peak_file.read_text())["peak_allocated_gib"]
        rows.append({"stage": name, "seconds": time.perf_counter() - started, "peak_gpu_gib": gpu.peak_mib / 1024,
                     "peak_allocated_gib": allocated})
        print(f"{name}: {rows[-1]['seconds']:.1f} s, peak {rows[-1]['peak_gpu_gib']:.1f} GiB (nvidia-smi), "
              f"{allocated:.2f} GiB (torch allocator)", flush=True)
    return rows


def dump_stacks(pid: int) -> None:
    """Print the Python stacks of a stage that overran (py-spy, when installed), to see where it waits."""
    import psutil

    spy = shutil.which("py-spy")
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        if spy:
            subprocess.run([spy, "dump", "--pid", str(process.pid)], timeout=60)
        else:
            print(f"pid {process.pid}: {' '.join(process.cmdline())} (install py-spy to see its stack)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/yem-bench"))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeat-train", action="store_true", help="then rerun train (rank 8) on warm caches")
    parser.add_argument("--stage-timeout", type=float, default=900, help="seconds before a stage's stacks are "
                        "printed and it is stopped")
    parser.add_argument("--model", help="an existing model instead (a diffusers folder, or tiny for a quick check "
                        "of this script on a CPU); default: build a random SD3-medium in the workdir")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = args.model or args.workdir / "sd3-medium-random"
    begin = time.perf_counter()
    if not args.model and not (model / "model_index.json").exists():
        build_in_child(model)
    build_s = time.perf_counter() - begin
    project = make_project(args.workdir, model, args)
    rows = run_stages(project, args.stage_timeout)
    first = json.loads((project / "metrics/train.json").read_text())
    report = {"build_model_s": build_s, "stages": rows, "train": first}
    if args.repeat_train:
        from yem.params import set_values

        set_values(project / "params.yaml", {"train.rank": 8, "train.alpha": 8})
        report["repeat"] = run_stages(project, args.stage_timeout, {"train"})
        report["repeat_train"] = json.loads((project / "metrics/train.json").read_text())
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\nmodel built in {build_s:.0f} s (not part of the pipeline)")
    print(f"{'stage':<10}{'wall s':>8}{'nvidia-smi GiB':>16}{'allocated GiB':>15}")
    for row in rows + [dict(r, stage="train r8") for r in report.get("repeat", [])]:
        print(f"{row['stage']:<10}{row['seconds']:>8.1f}{row['peak_gpu_gib']:>16.1f}{row['peak_allocated_gib']:>15.2f}")
    print(f"{'total':<10}{sum(r['seconds'] for r in rows):>8.1f}")
    for label, metrics in (("train", first), ("train r8", report.get("repeat_train"))):
        if metrics:
            print(f"{label}: launch→first step {metrics['launch_to_first_step_s']:.1f} s, "
                  f"{metrics['s_per_step']:.3f} s/step, peak {metrics['peak_memory_gib']:.1f} GiB (torch)")


if __name__ == "__main__":
    main()

"""Several processes through accelerate (gloo on the CPU here, NCCL on GPUs) train the same LoRA as one process
with the same effective batch: each sample draws its randomness from its own seed wherever it lands."""

import dataclasses
import json
import os
import subprocess
import sys

import psutil
import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, split_bound
from tests.test_resume import wait_for_checkpoint
from yem.hardware.record import Hardware
from yem.model import lora_file
from yem.params import set_values

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def processes_hardware(root, hardware: Hardware) -> Hardware:
    """Write (and return) the hardware record the multi-process stages run with: CUDA's as it is (NCCL),
    elsewhere the CPU in fp32 over gloo (a Mac's one GPU can't be split)."""
    if hardware.backend != "cuda":
        hardware = dataclasses.replace(hardware, backend="cpu", dtype="float32")
    hardware.save(root / "hardware.json")
    return hardware


def params_file(root, name: str, values: dict):
    """The project's params.yaml with `values` set, as root/params-<name>.yaml."""
    params = root / f"params-{name}.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    set_values(params, values)
    return params


def stage_command(root, name: str, devices: int, batch: int, steps: int = 8) -> list[str]:
    params = params_file(root, name, {"train.steps": steps, "train.checkpoint_every": 4, "train.devices": devices,
                                      "train.batch_size": batch, "data.instance_dir": "instance",
                                      "data.resolution": 64, "data.random_flip": True})
    return [sys.executable, "-m", "stages.train", "--params", str(params), "--hardware", str(root / "hardware.json"),
            "--latents", str(root / "latents"), "--embeds", str(root / "embeds"), "--out", str(root / name),
            "--metrics", str(root / f"{name}.json"), "--steps-log", str(root / f"{name}.tsv")]


def train_stage(root, name: str, devices: int, batch: int, steps: int = 8) -> dict:
    result = subprocess.run(stage_command(root, name, devices, batch, steps), cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / f"{name}.json").read_text())


def largest_difference(root, a: str, b: str) -> float:
    first, second = (load_file(str(root / name / lora_file.WEIGHT_NAME)) for name in (a, b))
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


def test_two_processes_match_one_process_with_the_same_effective_batch(cached_project):
    root, _, hardware = cached_project
    hardware = processes_hardware(root, hardware)
    single = train_stage(root, "one-process", devices=1, batch=2)
    double = train_stage(root, "two-processes", devices=2, batch=1)
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert single["effective_batch_size"] == double["effective_batch_size"] == 2
    # Same samples, same noise, same averaged gradient: only the order of floating-point sums differs.
    worst = largest_difference(root, "one-process", "two-processes")
    assert worst < split_bound(hardware.dtype, 1e-5), worst
    assert max(abs(x - y) for x, y in zip(*[[float(r.split("\t")[1]) for r in (root / f"{n}.tsv").read_text()
                                             .splitlines()[1:]] for n in ("one-process", "two-processes")])) \
        < split_bound(hardware.dtype, 1e-4)


def test_a_run_killed_on_two_processes_resumes_on_one_with_the_same_effective_batch(cached_project):
    """kill -9 of a two-process run after a checkpoint; the rerun on one process (batch 2 instead of 2 × 1)
    resumes from that checkpoint and ends where an uninterrupted one-process run ends."""
    root, _, hardware = cached_project
    hardware = processes_hardware(root, hardware)
    train_stage(root, "whole", devices=1, batch=2, steps=40)
    two = subprocess.Popen(stage_command(root, "split", devices=2, batch=1, steps=40), cwd=REPO, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(root, 4, two)
    launcher = psutil.Process(two.pid)
    everyone = [launcher, *launcher.children(recursive=True)]  # the ranks run in sessions of their own
    for process in everyone:
        process.kill()
    psutil.wait_procs(everyone, timeout=30)
    resumed = train_stage(root, "split", devices=1, batch=2, steps=40)
    assert 4 <= resumed["resumed_from_step"] < 40 and resumed["world_size"] == 1
    worst = largest_difference(root, "whole", "split")
    assert worst < split_bound(hardware.dtype, 1e-4), worst


def render_stage(root, name: str, devices: int, lora: str) -> dict:
    params = params_file(root, name, {"render.devices": devices, "render.steps": 2, "render.seeds": [0, 1]})
    command = [sys.executable, "-m", "stages.render", "--params", str(params), "--hardware",
               str(root / "hardware.json"), "--embeds", str(root / "embeds"), "--lora", str(root / lora),
               "--out", str(root / name), "--log", str(root / f"{name}-log.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / name / "index.json").read_text())


def test_a_mac_gpu_is_one_device():
    from yem.errors import HardwareError
    from yem.hardware.launch import process_count

    assert process_count("auto", "mps") == process_count(1, "mps") == 1
    with pytest.raises(HardwareError, match="train.devices: a Mac has one GPU.*got 2"):
        process_count(2, "mps")
    assert process_count(2, "cpu") == 2  # gloo processes on the CPU, on request


def test_two_processes_render_the_same_images_as_one(cached_project):
    """render.devices: 2 shares rows × prompts × seeds out over two processes; the main one writes them all."""
    import numpy as np
    from PIL import Image

    root, _, hardware = cached_project
    processes_hardware(root, hardware)
    train_stage(root, "render-lora", devices=1, batch=1, steps=2)
    one, two = (render_stage(root, name, devices, "render-lora") for name, devices in [("one", 1), ("two", 2)])
    assert one == two and one["rows"] == ["base", "lora"] and len(one["cells"]) == 2 * 2  # 2 prompts × 2 seeds
    files = sorted(p.relative_to(root / "one") for p in (root / "one").rglob("*.png"))
    assert files == sorted(p.relative_to(root / "two") for p in (root / "two").rglob("*.png"))
    for file in files:
        assert np.array_equal(np.asarray(Image.open(root / "one" / file)), np.asarray(Image.open(root / "two" / file)))
    assert not list(root.glob("*.tmp")), "a process left a staging folder behind"

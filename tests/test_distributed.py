"""Several processes through accelerate (gloo on the CPU here, NCCL on GPUs) train the same LoRA as one process
with the same effective batch: each sample draws its randomness from its own seed wherever it lands."""

import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from tests.conftest import REPO
from yem import lora_file
from yem.params import set_values


def train_stage(root, name: str, devices: int, batch: int) -> dict:
    params = root / f"params-{name}.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    set_values(params, {"train.steps": 8, "train.checkpoint_every": 4, "train.devices": devices,
                        "train.batch_size": batch, "data.instance_dir": "instance", "data.resolution": 64,
                        "data.random_flip": True})
    command = [sys.executable, "-m", "stages.train", "--params", str(params), "--hardware", str(root / "hardware.json"),
               "--latents", str(root / "latents"), "--embeds", str(root / "embeds"), "--out", str(root / name),
               "--metrics", str(root / f"{name}.json"), "--steps-log", str(root / f"{name}.tsv")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / f"{name}.json").read_text())


def test_two_processes_match_one_process_with_the_same_effective_batch(cached_project):
    root, _, hardware = cached_project
    (root / "hardware.json").write_text(json.dumps(hardware))
    single = train_stage(root, "one-process", devices=1, batch=2)
    double = train_stage(root, "two-processes", devices=2, batch=1)
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert single["effective_batch_size"] == double["effective_batch_size"] == 2
    a = load_file(str(root / "one-process" / lora_file.WEIGHT_NAME))
    b = load_file(str(root / "two-processes" / lora_file.WEIGHT_NAME))
    assert a.keys() == b.keys()
    # Same samples, same noise, same averaged gradient: only the order of floating-point sums differs.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert max(abs(x - y) for x, y in zip(*[[float(r.split("\t")[1]) for r in (root / f"{n}.tsv").read_text()
                                             .splitlines()[1:]] for n in ("one-process", "two-processes")])) < 1e-4

"""Several devices: the train stage (DDP) and the render stage relaunch themselves under `accelerate launch`.

`train.devices: auto` uses every visible GPU; a number asks for that many processes (on a CPU they talk over
gloo, which is how CI checks the distributed path). `dvc repro` and the one-liner need nothing more: the stage
command is the same, and the relaunched processes run it with WORLD_SIZE set, so they don't relaunch again.
"""

import os
import subprocess
import sys

from yem.errors import HardwareError


def process_count(devices: int | str, backend: str, key: str = "train.devices") -> int:
    """How many processes `devices` (the params value at `key`) asks for on this backend."""
    if backend == "mps" and devices not in ("auto", 1):
        raise HardwareError(f"{key}: a Mac has one GPU, so yem runs one process on it (got {devices}). Set "
                            f"{key}: auto.")
    if backend != "cuda":
        return devices if isinstance(devices, int) else 1  # several CPU processes (gloo) only on request
    import torch

    visible = torch.cuda.device_count()
    wanted = visible if devices == "auto" else devices
    if wanted > visible:
        raise HardwareError(f"{key}: {wanted} GPUs asked for, {visible} visible (got {devices}). Set "
                            f"{key}: auto, or check CUDA_VISIBLE_DEVICES.")
    return wanted


def inside_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a launch, or a process that was not launched: the one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def relaunch(module: str, args: list[str], processes: int) -> int:
    """Run `python -m module args` in `processes` DDP processes; return the exit status of the group."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
               "--main_process_port", str(_free_port()), "-m", module, *args]
    return subprocess.call(command)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

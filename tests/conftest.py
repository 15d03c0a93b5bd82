"""Shared fixtures: everything offline, the tiny SD3 built once per session, projects in temporary git repos."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "stages", "yem", "data"]

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["GIT_AUTHOR_NAME"] = os.environ["GIT_COMMITTER_NAME"] = "yem tests"
os.environ["GIT_AUTHOR_EMAIL"] = os.environ["GIT_COMMITTER_EMAIL"] = "tests@yem.invalid"
# The tiny model is built once per machine into YEM_HOME (tests use their own, shared across test runs).
os.environ.setdefault("YEM_HOME", str(Path.home() / ".cache" / "yem-tests"))

from yem.hardware.environment import configure_environment  # noqa: E402  (before torch is imported anywhere)

configure_environment()


# How far two computations meant to agree may drift, by compute dtype: in fp32 only the order of sums differs; half
# precision rounds every op's result (bf16 keeps 8 significant bits, fp16 11), and another kernel rounds otherwise.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
# Runs that split one effective batch differently (4 × 1 or 2 × 2, one process or two) run other kernels: in half
# precision they round otherwise (2.1-2.2e-3 apart after 8 and 40 steps, measured on two H100s in bf16).
HALF_PRECISION_SPLIT_BOUND = 1e-2


def split_bound(dtype: str, fp32: float) -> float:
    """How far the weights of two runs that split the same effective batch differently may end apart: `fp32` where
    only the order of floating-point sums differs."""
    return fp32 if dtype == "float32" else HALF_PRECISION_SPLIT_BOUND


def cpu_hardware():
    """A hardware record for the CPU in fp32, as preflight writes it on a machine without a GPU."""
    from importlib import metadata

    from yem.hardware.record import Hardware

    return Hardware(backend="cpu", dtype="float32", chip="test CPU", memory_budget_gib=8.0,
                    torch=metadata.version("torch"), diffusers=metadata.version("diffusers"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from yem.model.tiny import ensure_tiny_model

    return ensure_tiny_model()


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's environment first on PATH (DVC stages run `python -m ...`)."""
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PATH": path,
                                                                               **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(folder: Path) -> Path:
    """A copy of the yem pipeline as a fresh git + DVC repository with one commit."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, folder / name)
    run(["git", "init", "-q", "-b", "main"], folder)
    run([sys.executable, "-m", "dvc", "init", "-q"], folder)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], folder)
    run(["git", "add", "-A"], folder)
    run(["git", "commit", "-q", "-m", "yem project"], folder)
    return folder


@pytest.fixture(scope="session")
def cached_project(tmp_path_factory, tiny_model_dir):
    """(root, params, hardware): caches for four toy images at 64 px in root/embeds and root/latents, built by
    the functions the stages call. Train on them with yem.training.loop.run_training(..., root / "latents", ...)."""
    import dataclasses

    from tests.images import write_toy_dataset
    from yem.data.latents import write_latents
    from yem.data.preflight import run_preflight
    from yem.data.text import write_embeddings
    from yem.params import load_params

    root = tmp_path_factory.mktemp("cached")
    write_toy_dataset(root / "instance", 4, size=(80, 64))
    params = load_params(REPO / "params.yaml")
    data = dataclasses.replace(params.data, instance_dir="instance", resolution=64, random_flip=True)
    checked = run_preflight(params.device, data, root)
    write_embeddings(params.model, params.prompts, params.encode, checked.hardware,
                     checked.captions["captions"], root / "embeds")
    write_latents(params.model, data, checked.hardware, checked.images["samples"], root, root / "latents")
    return root, dataclasses.replace(params, data=data), checked.hardware


def interrupt_after_step(monkeypatch, step: int):
    """Make in-process training send itself SIGINT right after its optimizer step `step` (0-based), as if Ctrl-C
    came in during the next one; returns the unpatched step, to put back for the rerun."""
    import yem.training.loop

    original = yem.training.loop.update

    def update_then_signal(run, at: int):
        loss = original(run, at)
        if at == step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(yem.training.loop, "update", update_then_signal)
    return original

"""Resumable training checkpoints: complete or absent, never half-written, never from an incompatible run.

A checkpoint is a folder `step-00000050/` holding the adapter, the optimizer, LR-scheduler and loss-scaler
state, the RNG states, the per-step log so far, and a manifest of every file's size and sha256. It is written
under a temporary name and renamed into place; on load the manifest is checked and a damaged checkpoint is skipped
with a warning in favour of the previous one. Checkpoints live outside DVC's outputs, in a folder keyed by a
fingerprint of everything that determines the training result, so `dvc repro` after an interruption resumes,
while a changed param starts fresh.
"""

import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from yem import atomic
from yem.data.hashing import file_sha256
from yem.paths import CHECKPOINTS
from yem.training.runlog import RunLog

MANIFEST = "manifest.json"
PREFIX = "step-"


def checkpoints_root(project_root: Path) -> Path:
    """$YEM_CHECKPOINTS, or `.yem/checkpoints` in the project (git- and DVC-ignored)."""
    return Path(os.environ.get("YEM_CHECKPOINTS", project_root / CHECKPOINTS))


def fingerprint(settings: dict, input_files: list[Path]) -> str:
    """sha256 over the settings (JSON) and the bytes of every input file: the identity of a training run."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in sorted(input_files):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:20]


@dataclass
class TrainingState:
    step: int  # optimizer updates completed
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict  # the fp16 loss scaler's state ({} when it does not scale)
    log: RunLog  # per-step rows so far, skipped steps, rollbacks, pauses
    rng: dict  # torch / numpy / python generator states
    saved: float = 0.0  # when the checkpoint was written (seconds since the epoch), known once it is loaded


def capture_rng() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])


def save(run_dir: Path, state: TrainingState, keep: int) -> Path:
    """Write `run_dir/step-N` atomically, then delete all but the newest `keep` checkpoints."""
    target = run_dir / f"{PREFIX}{state.step:08d}"
    with atomic.staged_dir(target) as staging:
        save_file(state.adapter, str(staging / "adapter.safetensors"))
        torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler},
                   staging / "optimizer.pt")
        torch.save(state.rng, staging / "rng.pt")
        (staging / "log.json").write_text(json.dumps(state.log.to_json()), encoding="utf-8")
        files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in staging.iterdir()}
        (staging / MANIFEST).write_text(json.dumps({"step": state.step, "files": files}, indent=1))
    for old in _checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_latest(run_dir: Path) -> TrainingState | None:
    """The newest checkpoint that passes its manifest check, or None."""
    for folder in _checkpoints(run_dir):
        problem = _verify(folder)
        if problem:
            warnings.warn(f"{folder}: skipped, {problem}; trying the previous checkpoint.", stacklevel=2)
            continue
        optim = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        log = RunLog.from_json(json.loads((folder / "log.json").read_text()))
        rng = torch.load(folder / "rng.pt", weights_only=False)
        return TrainingState(step=json.loads((folder / MANIFEST).read_text())["step"],
                             adapter=load_file(str(folder / "adapter.safetensors")), optimizer=optim["optimizer"],
                             scheduler=optim["scheduler"], scaler=optim["scaler"], log=log, rng=rng,
                             saved=(folder / MANIFEST).stat().st_mtime)
    return None


def discard(run_dir: Path) -> None:
    """Forget a finished run's checkpoints: its result now lives in DVC's cache."""
    shutil.rmtree(run_dir, ignore_errors=True)


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, newest first (temporaries start with '.' and are ignored)."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if p.name.startswith(PREFIX) and p.is_dir()), reverse=True)


def _verify(folder: Path) -> str | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return "its manifest is missing or unreadable"
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            return f"{name} is missing or has the wrong size"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None



"""LoRA files on disk: safetensors header metadata, read and written without importing torch.

diffusers keeps the adapter config (rank, alpha, targets) as JSON under `lora_adapter_metadata`; yem adds its
provenance under `yem.*` keys (base model, trigger, resolution, steps, version).
"""

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from yem import atomic

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA = "lora_adapter_metadata"


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {})


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with more header metadata; the tensors are unchanged."""
    write(path, read_tensors(path), {**read_metadata(path), **{k: str(v) for k, v in extra.items()}})


def adapter_config(path: Path) -> dict:
    """The peft LoraConfig diffusers stored, with the `transformer.` prefix of its keys removed."""
    config = json.loads(read_metadata(path)[ADAPTER_METADATA])
    return {key.removeprefix("transformer."): value for key, value in config.items()}

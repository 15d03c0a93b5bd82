"""The on-disk tensor format: one safetensors file per key, a schema version in its metadata, atomic writes.

Used for text embeddings (build/embeds) and VAE latents (build/latents). Non-finite values are refused at
write time: a NaN cached once poisons every later step that reads it (diffusers #7563).
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from yem import atomic
from yem.errors import CacheError

SCHEMA = "1"
INDEX = "index.json"


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CacheError(f"{path}: '{name}' has NaN or Inf values; nothing was cached. This usually means a "
                             f"half-precision overflow: set device.mixed_precision: no and rerun.")
    metadata = {"yem_schema": SCHEMA, **(meta or {})}
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic.write_with(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            schema = (f.metadata() or {}).get("yem_schema")
        if schema != SCHEMA:
            raise CacheError(f"{path}: cache schema {schema}, this yem reads schema {SCHEMA}. "
                             f"Rebuild it: dvc repro -f <stage>.")
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise CacheError(f"{path}: missing from the cache. Rerun: dvc repro.") from None
    except (SafetensorError, OSError) as e:
        raise CacheError(f"{path}: unreadable cache file ({e}). Rebuild it: dvc repro -f <stage>.") from None


def write_index(folder: Path, index: dict) -> None:
    atomic.write_json(folder / INDEX, index)


def read_index(folder: Path) -> dict:
    path = folder / INDEX
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{path}: missing. Run the stage that writes {folder} first: dvc repro.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: corrupt ({e}). Rebuild it: dvc repro -f.") from None

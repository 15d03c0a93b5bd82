"""LoRA files on disk: safetensors header metadata, read and written without importing torch.

diffusers keeps the adapter config (rank, alpha, targets) as JSON under `lora_adapter_metadata`; yem adds its
provenance under `yem.*` keys (base model, trigger, resolution, steps, version).
"""

import json
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from yem import atomic
from yem.errors import YemError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA = "lora_adapter_metadata"
SNAPSHOTS = "steps"  # the intermediate adapters kept beside the final one, one per checkpoint (render.checkpoints)


def snapshots_dir(lora_dir: Path) -> Path:
    return lora_dir / SNAPSHOTS


def snapshot_path(lora_dir: Path, step: int) -> Path:
    """Where the adapter as it was after `step` optimizer updates lives in a LoRA folder."""
    return snapshots_dir(lora_dir) / f"step-{step:08d}.safetensors"


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise YemError(f"{path}: not a readable safetensors file ({e}). Point to a .safetensors LoRA.") from None


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor as a numpy array; bfloat16 ones (common in files from other trainers) widened to float32."""
    try:
        return load_file(str(path))
    except TypeError:  # numpy has no bfloat16: safetensors.numpy refuses the whole file
        return _read_widening_bfloat16(path)
    except (SafetensorError, OSError) as e:
        raise YemError(f"{path}: not a readable safetensors file ({e}). Point to a .safetensors LoRA.") from None


def write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with more header metadata; the tensors are unchanged."""
    write(path, read_tensors(path), {**read_metadata(path), **{k: str(v) for k, v in extra.items()}})


def adapter_config(path: Path) -> dict:
    """The peft LoraConfig diffusers stored, with the `transformer.` prefix of its keys removed."""
    return config_in(read_metadata(path))


def config_in(metadata: dict[str, str]) -> dict:
    """`adapter_config` from a header already read; {} when it holds none (a file from another trainer)."""
    if ADAPTER_METADATA not in metadata:
        return {}
    config = json.loads(metadata[ADAPTER_METADATA])
    return {key.removeprefix("transformer."): value for key, value in config.items()}


def resolve(path: Path) -> Path:
    """A LoRA given as a file, or as a folder holding `pytorch_lora_weights.safetensors` or one .safetensors."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise YemError(f"{path}: no such file or folder. Give a .safetensors LoRA or the folder holding it.")
    if (path / WEIGHT_NAME).is_file():
        return path / WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise YemError(f"{path}: expected {WEIGHT_NAME} or exactly one .safetensors file (got {names}). "
                       f"Give the file itself.")
    return found[0]


# safetensors dtype names -> numpy; BF16 is read as uint16 and widened by hand.
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U8": "u1", "BOOL": "?"}


def _read_widening_bfloat16(path: Path) -> dict[str, np.ndarray]:
    """Parse the safetensors layout (u64 header size, JSON header, raw little-endian data) directly."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    data = memoryview(raw)[8 + size:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            bits = np.frombuffer(data[start:end], dtype="<u2").astype("<u4") << 16
            array = bits.view("<f4")
        elif info["dtype"] in _NUMPY_DTYPES:
            array = np.frombuffer(data[start:end], dtype=_NUMPY_DTYPES[info["dtype"]]).copy()
        else:
            raise YemError(f"{path}: tensor {name} has dtype {info['dtype']}, which yem cannot read. "
                           f"Convert it to float16 or float32 first.")
        tensors[name] = array.reshape(info["shape"])
    return tensors

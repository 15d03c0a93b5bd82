"""The hardware record: what preflight decided about this machine, which every torch stage runs on.

It is the stable half of preflight's findings (backend, precision, chip, memory budget, library versions), saved
as build/preflight.json. Downstream stages depend on that file, so they rerun when the machine's answer changes and
never because of a volatile reading (free memory, temperature: those go to a log). Nobody reads the file by key:
`Hardware.load` checks it the way params.yaml is checked, every problem at once.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from yem import atomic
from yem.errors import CacheError
from yem.hardware.memory import GIB
from yem.schema import build, rule

Backend = Literal["cuda", "mps", "cpu"]
DtypeName = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True, slots=True)
class Hardware:
    backend: Backend  # the training device's torch backend
    dtype: DtypeName  # of the frozen base weights and activations (LoRA weights always train in fp32)
    chip: str  # "Apple M2 Pro", "NVIDIA H100 80GB HBM3", the CPU's name
    memory_budget_gib: float = rule(above=0)  # what the device may use, rounded down to 0.5 GiB
    torch: str  # versions whose change may change results
    diffusers: str

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_budget_gib * GIB)

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    @classmethod
    def load(cls, path: Path) -> "Hardware":
        """Read and check a hardware record; CacheError listing every problem if it is damaged or stale."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CacheError(f"{path}: missing. Run the preflight stage first: dvc repro.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{path}: corrupt ({e}). Rerun the preflight stage: dvc repro.") from None
        record, problems = build(cls, raw, "")
        if problems:
            listed = "; ".join(problems)
            raise CacheError(f"{path}: not a hardware record this yem reads ({listed}). Rerun the preflight "
                             f"stage: dvc repro.")
        return record

    def save(self, path: Path) -> None:
        atomic.write_json(path, asdict(self))

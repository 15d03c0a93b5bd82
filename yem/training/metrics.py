"""What a training run reports, in the formats DVC reads: a JSON summary (`dvc metrics`) and a per-step TSV
(`dvc plots`)."""

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from yem import atomic


@dataclass
class TrainResult:
    steps: int
    rows: list[dict]  # per step: step, loss, lr, s_per_step, memory_gib
    heldout_before: float
    heldout_after: float
    batch_size: int
    gradient_accumulation: int
    gradient_checkpointing: bool
    world_size: int
    peak_memory_gib: float
    wall_s: float
    resumed_from: int
    facts: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # one line each for the user (a LoRA that does nothing)

    def metrics(self) -> dict:
        losses = [r["loss"] for r in self.rows if math.isfinite(r["loss"])]
        tail = losses[-max(1, len(losses) // 10):]
        timed = sorted(r["s_per_step"] for r in self.rows if r["s_per_step"] is not None)
        return {"steps": self.steps, "loss_final": sum(tail) / len(tail), "loss_best": min(losses),
                "heldout_loss_before": self.heldout_before, "heldout_loss_after": self.heldout_after,
                "s_per_step": timed[len(timed) // 2] if timed else None,
                "peak_memory_gib": self.peak_memory_gib, "wall_s": self.wall_s, "batch_size": self.batch_size,
                "gradient_accumulation": self.gradient_accumulation, "world_size": self.world_size,
                "effective_batch_size": self.batch_size * self.gradient_accumulation * self.world_size,
                "gradient_checkpointing": self.gradient_checkpointing, "resumed_from_step": self.resumed_from,
                **self.facts}


def write_json(path: Path, values: dict) -> None:
    atomic.write_json(path, values)


def write_tsv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _fmt(v) for k, v in row.items()} for row in rows)
    atomic.write_text(path, buffer.getvalue())


def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)

"""Metrics files in the formats DVC reads: a JSON summary (`dvc metrics`) and a per-step TSV (`dvc plots`)."""

import csv
import io
from pathlib import Path

from yem import atomic


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

"""`yem runs`: the pipeline's runs side by side, one readable row each.

A run is a commit with results, one of its DVC experiments (`dvc exp run`, or `yem train` followed by a commit),
or the workspace when its results are not yet in either. The table shows the params that differ between the
runs, then what each run measured: held-out loss before → after training, the final training loss, seconds per
step, peak memory, wall time and device. It reads `dvc exp show --json`, whose shape is a list of baselines
(commits), each holding its experiments' revisions with their params and metrics per file.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yem.errors import YemError

COLUMNS = ("held-out loss", "final loss", "s/step", "peak GiB", "wall", "device")


@dataclass(frozen=True)
class Run:
    name: str  # the experiment's name, the commit's branch or short sha, or "workspace"
    params: dict[str, Any]  # dotted params.yaml keys -> values
    metrics: dict[str, Any]  # metrics/train.json, flattened the same way


def read_runs(project: Path, commits: int) -> list[Run]:
    """The runs of the last `commits` commits (0: all of them), from `dvc exp show --json`."""
    scope = ["-A"] if commits == 0 else ["-n", str(commits)]
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", *scope], cwd=project,
                          capture_output=True, text=True)
    if done.returncode != 0:
        detail = " ".join(done.stderr.split())[-300:]
        raise YemError(f"{project}: dvc cannot list the experiments (got {detail}). Run yem runs in the project "
                       f"folder, after a first `git commit`.")
    return runs_in(json.loads(done.stdout))


def runs_in(shown: list[dict]) -> list[Run]:
    """Rows from `dvc exp show --json`: each commit with results, its experiments, then the workspace if it holds
    results that are not any of those."""
    runs, workspace = [], None
    for baseline in shown:
        if baseline["rev"] == "workspace":
            workspace = _run("workspace", baseline)
            continue
        own = _run(baseline.get("name") or baseline["rev"][:7], baseline)
        runs += [own] if own.metrics else []
        for experiment in baseline.get("experiments") or []:
            runs += [_run(rev.get("name") or rev["rev"][:7], rev) for rev in experiment["revs"]]
    if workspace and workspace.metrics and all((r.params, r.metrics) != (workspace.params, workspace.metrics)
                                               for r in runs):
        runs.append(workspace)
    return runs


def table(runs: list[Run]) -> str:
    """The runs as aligned text: a column per param that differs between them, then the measurements."""
    varying = [key for key in sorted({k for run in runs for k in run.params})
               if len({json.dumps(run.params.get(key)) for run in runs}) > 1]
    header = ["run", *varying, *COLUMNS]
    rows = [[run.name, *(_value(run.params.get(key)) for key in varying), *_measured(run.metrics)] for run in runs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def _run(name: str, entry: dict) -> Run:
    data = entry.get("data") or {}
    return Run(name, _merged(data.get("params")), _merged(data.get("metrics")))


def _merged(per_file: dict | None) -> dict[str, Any]:
    """{file: {"data": {...}}} -> dotted keys; a file dvc could not read (an "error" entry) adds nothing."""
    merged: dict[str, Any] = {}
    for content in (per_file or {}).values():
        merged.update(_flat(content.get("data") or {}))
    return merged


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _measured(m: dict[str, Any]) -> list[str]:
    before, after = m.get("heldout_loss_before"), m.get("heldout_loss_after")
    heldout = f"{_number(before)} → {_number(after)}" if before is not None else "–"
    device = m.get("device_name") or m.get("backend")
    return [heldout, _number(m.get("loss_final")), _number(m.get("s_per_step")), _number(m.get("peak_memory_gib"), 2),
            _duration(m.get("wall_s")), str(device)[:32] if device else "–"]


def _value(value: Any, width: int = 40) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else "–" if value is None else str(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, int | float) else "–"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"

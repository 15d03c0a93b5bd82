"""After the tiny pipeline ran on a Mac (.github/workflows/apple-silicon.yml): check what matters there from what
the stages wrote, in the current folder. Prints a Markdown table for the job summary; exits 1 naming every check
that failed.

  backend        build/preflight.json and metrics/train.json say mps
  precision      half precision was chosen (bf16 or fp16; fp32 would mean the probe failed on the GPU)
  CPU fallbacks  no op ran on the CPU in place of MPS in encode, latents, train or render (or the list)
  heat           the thermal source is macOS (thermalState and the pressure level were read)
  non-finite     no NaN or Inf step, no rollback
  memory         the training peak stayed within preflight's memory budget
"""

import json
import sys
from pathlib import Path


def load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {"_missing": f"{path}: {e}"}


def checks() -> list[tuple[str, bool, str]]:
    """(what, passed, what was found) for each check."""
    hardware, train = load("build/preflight.json"), load("metrics/train.json")
    stage_logs = {stage: load(f"logs/{stage}.json") for stage in ("encode", "latents", "render")}
    fell_back = {stage: log.get("cpu_fallback_ops", log.get("_missing")) for stage, log in stage_logs.items()}
    fell_back["train"] = train.get("cpu_fallback_ops")
    budget, peak = hardware.get("memory_budget_gib"), train.get("peak_memory_gib")
    return [
        ("backend", hardware.get("backend") == train.get("backend") == "mps",
         f"preflight {hardware.get('backend')}, train {train.get('backend')}"),
        ("precision", hardware.get("dtype") in ("bfloat16", "float16"), str(hardware.get("dtype"))),
        ("CPU fallbacks", all(ops in ([], "none") for ops in fell_back.values()),
         "; ".join(f"{stage}: {ops or 'none'}" for stage, ops in fell_back.items())),
        ("heat", train.get("thermal_source") == "macos",
         f"source {train.get('thermal_source')}, worst {train.get('thermal_worst')}"),
        ("non-finite", train.get("nonfinite_steps") == 0 and train.get("rollbacks") == 0,
         f"{train.get('nonfinite_steps')} non-finite steps, {train.get('rollbacks')} rollbacks, "
         f"{train.get('loss_scale_skipped_steps', 0)} loss-scale overflows"),
        ("memory", isinstance(peak, (int, float)) and isinstance(budget, (int, float)) and peak <= budget,
         f"peak {peak} GiB of a {budget} GiB budget"),
    ]


def main() -> int:
    results = checks()
    print("| check | | found |\n|---|---|---|")
    for what, passed, found in results:
        print(f"| {what} | {'ok' if passed else 'FAILED'} | {found} |")
    failed = [f"{what}: {found}" for what, passed, found in results if not passed]
    for line in failed:
        print(f"::error::MPS run: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

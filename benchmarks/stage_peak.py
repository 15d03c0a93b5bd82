"""Run one stage module (or a script) and record the torch allocator's peak GPU memory when it exits.

    python benchmarks/stage_peak.py OUT.json -m stages.encode --params params.yaml ...
    python benchmarks/stage_peak.py OUT.json train_dreambooth_lora_sd3.py --resolution 1024 ...

benchmarks/pipeline.py runs each dvc.yaml command through this, so the table can show the allocator's peak
(tensors only, what the diffusers example's 14.7 / 9.1 GiB figures count) beside nvidia-smi's (the whole
process, CUDA context and cached blocks included). A stage that resets the peak counter (train resets it after
loading) reports the peak since then.
"""

import json
import os
import runpy
import sys
from pathlib import Path


def main() -> None:
    out, target, *arguments = sys.argv[1:]
    module = arguments.pop(0) if target == "-m" else None
    sys.argv = [module or target, *arguments]
    try:
        if module:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: the project's stages/ and yem/
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
    finally:
        torch = sys.modules.get("torch")  # preflight and card never import it: don't make them pay for it here
        peak = torch.cuda.max_memory_allocated() if torch and torch.cuda.is_available() else 0
        Path(out).write_text(json.dumps({"run": module or target, "peak_allocated_gib": peak / 1024**3}))


if __name__ == "__main__":
    main()

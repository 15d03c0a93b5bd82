"""Where the pipeline keeps what it makes, relative to the project folder (the one holding params.yaml).

The one definition of each artefact's path: dvc.yaml passes these to the stages on their command lines
(tests/test_dvc_contract.py checks that the two agree), and yem's own commands find results through them.
"""

import os
from pathlib import Path

PREFLIGHT = Path("build/preflight.json")  # the stable hardware record (yem.hardware.record.Hardware)
IMAGES = Path("build/images.json")  # image manifest: sample id -> path, sha256
CAPTIONS = Path("build/captions.json")  # caption per sample id, and the file it came from
EMBEDS = Path("build/embeds")  # one safetensors per distinct prompt text + index.json
LATENTS = Path("build/latents")  # one safetensors per image + index.json
LORA = Path("build/lora")  # the trained adapter and its intermediate snapshots
VALIDATION = Path("build/validation")  # renders per row, grid.png, index.json
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_STEPS = Path("metrics/train_steps.tsv")
DIST = Path("dist")  # what people share: LoRA files, images, model card
PREFLIGHT_LOG = Path("logs/preflight.json")  # volatile readings; no stage depends on it
# What each torch stage ran on the CPU in place of MPS, with the time it took (volatile too)
ENCODE_LOG, LATENTS_LOG, RENDER_LOG = Path("logs/encode.json"), Path("logs/latents.json"), Path("logs/render.json")
CHECKPOINTS = Path(".yem/checkpoints")  # resumable training state, outside DVC's outputs on purpose

ARTEFACTS = (PREFLIGHT, IMAGES, CAPTIONS, EMBEDS, LATENTS, LORA, VALIDATION, TRAIN_METRICS, TRAIN_STEPS, DIST,
             PREFLIGHT_LOG, ENCODE_LOG, LATENTS_LOG, RENDER_LOG)


def yem_home() -> Path:
    """Per-user files every project on this machine shares (the tiny model, per-machine measurements):
    $YEM_HOME, by default ~/.cache/yem."""
    return Path(os.environ.get("YEM_HOME", Path.home() / ".cache" / "yem"))

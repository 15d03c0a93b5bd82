"""The shareable result in dist/: the LoRA file, the images it shows, and a Hugging Face model card.

Built with huggingface_hub's ModelCard/ModelCardData, offline. This module imports neither torch nor diffusers,
so the card stage starts in a fraction of a second.
"""

import json
import re
import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from yem import __version__, lora_file, metrics, plot
from yem.lora_file import WEIGHT_NAME
from yem.params import ExportParams, ModelParams, TrainParams
TAGS = ["text-to-image", "diffusers", "diffusers-training", "lora", "template:sd-lora", "sd3", "sd3-diffusers",
        "yem"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def write_card(model: ModelParams, train: TrainParams, export: ExportParams, train_metrics: dict,
               steps_log: Path, lora_dir: Path, validation_dir: Path, out_dir: Path) -> ModelCard:
    """Fill `out_dir` with the LoRA, images/, loss.png and README.md; return the card."""
    lora_meta = lora_file.read_metadata(lora_dir / WEIGHT_NAME)
    validation = json.loads((validation_dir / "index.json").read_text(encoding="utf-8"))
    shutil.copy2(lora_dir / WEIGHT_NAME, out_dir / WEIGHT_NAME)
    shutil.copytree(validation_dir, out_dir / "images", ignore=shutil.ignore_patterns("index.json"))
    rows = metrics.read_tsv(steps_log)
    plot.loss_curve([r["step"] for r in rows], [r["loss"] for r in rows]).save(out_dir / "images" / "loss.png")
    trigger = lora_meta.get("yem.instance_prompt", "")
    widget = [{"text": cell["prompt"], "output": {"url": f"images/lora/{cell['file']}"}}
              for cell in validation["cells"]]
    data = ModelCardData(license=export.license, tags=TAGS, instance_prompt=trigger, widget=widget,
                         library_name="diffusers", pipeline_tag="text-to-image",
                         base_model=model.id if HUB_ID.match(model.id) else None)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(model, train, export, trigger, train_metrics)}")
    card.save(out_dir / "README.md")
    return card


def _body(model: ModelParams, train: TrainParams, export: ExportParams, trigger: str, m: dict) -> str:
    base = model.id + (f" @ `{model.revision}`" if model.revision else "")
    load_id = model.id if HUB_ID.match(model.id) else "<path to the base model>"
    rows = [("base model", base), ("steps", train.steps), ("resolution", m.get("resolution")),
            ("rank / alpha", f"{train.rank} / {train.alpha:g}"), ("target modules", ", ".join(train.targets)),
            ("learning rate", f"{train.learning_rate:g} ({train.lr_scheduler})"),
            ("batch × accumulation × devices",
             f"{m['batch_size']} × {m['gradient_accumulation']} × {m['world_size']}"),
            ("gradient checkpointing", m["gradient_checkpointing"]), ("seed", train.seed)]
    hardware = [("device", f"{m.get('device_name')} ({m.get('backend')}, {m.get('dtype')})"),
                ("torch", m.get("torch")), ("seconds per step (median)", _num(m.get("s_per_step"))),
                ("peak memory", f"{_num(m.get('peak_memory_gib'))} GiB"), ("wall time", f"{_num(m['wall_s'])} s")]
    return f"""# {export.name}

A DreamBooth LoRA for Stable Diffusion 3, trained with [yem](https://github.com/yem-project/yem) {__version__}.

**Trigger:** `{trigger}`

![validation grid: top row without the LoRA, bottom row with it](images/grid.png)

## Use it

With 🧨 diffusers:

```python
import torch
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained("{load_id}", torch_dtype=torch.float16).to("cuda")  # or "mps"
pipe.load_lora_weights("<this repo or folder>", weight_name="{WEIGHT_NAME}")
image = pipe("{trigger}", num_inference_steps=28, guidance_scale=7.0).images[0]
```

In ComfyUI: copy `{WEIGHT_NAME}` into `ComfyUI/models/loras/` and apply it with *LoraLoaderModelOnly* on an
SD3 checkpoint. Start at strength 1.0.

## Training

{_table(rows)}

Held-out flow-matching loss (fixed noise and sigmas): {_num(m['heldout_loss_before'])} before,
{_num(m['heldout_loss_after'])} after training.

![training loss](images/loss.png)

## Hardware

{_table(hardware)}
"""


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"

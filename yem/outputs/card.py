"""The shareable result in dist/: the LoRA in each export format, the images it shows, and a Hugging Face model
card; and `push`, which uploads that folder to the Hub.

Built with huggingface_hub's ModelCard/ModelCardData, offline. This module imports neither torch nor diffusers,
so the card stage starts in a fraction of a second.
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from yem import __version__
from yem.errors import YemError
from yem.model import export, lora_file
from yem.outputs import plot
from yem.params import ExportParams, ModelParams, TrainParams
from yem.training import metrics

TAGS = ["text-to-image", "diffusers", "diffusers-training", "lora", "template:sd-lora", "sd3", "sd3-diffusers",
        "yem"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
LAYOUTS = {"diffusers": "diffusers / peft (`load_lora_weights`)",
           "comfyui": "ComfyUI (diffusers names + `.alpha` per module)",
           "kohya": "kohya sd-scripts (`lora_unet_` + SAI MMDiT names, fused qkv)"}
# metrics/train.json keys the hardware table shows when the training run recorded them (label, unit):
# machine facts, and the thermal governor's count of pauses and minutes spent throttled.
OPTIONAL_HARDWARE = {"memory_total_gib": ("memory", " GiB"), "os": ("operating system", ""),
                     "thermal_pauses": ("thermal pauses", ""), "thermal_paused_min": ("paused for heat", " min"),
                     "thermal_throttled_min": ("throttled", " min")}


@dataclass(frozen=True)
class Results:
    """What the earlier stages produced, as the card reads it."""
    lora: Path  # build/lora/pytorch_lora_weights.safetensors
    validation: Path  # build/validation: index.json, base/, step-N/, lora/, grid.png
    metrics: dict  # metrics/train.json
    steps: list[dict]  # metrics/train_steps.tsv, one row per step
    samples: dict  # build/images.json: sample id ("instance/<stem>" or "prior/<stem>") -> path, sha256

    @classmethod
    def load(cls, lora_dir: Path, validation: Path, metrics_path: Path, steps_log: Path, images: Path) -> "Results":
        return cls(lora=lora_dir / lora_file.WEIGHT_NAME, validation=validation,
                   metrics=json.loads(metrics_path.read_text(encoding="utf-8")), steps=metrics.read_tsv(steps_log),
                   samples=json.loads(images.read_text(encoding="utf-8"))["samples"])


def write_card(model: ModelParams, train: TrainParams, settings: ExportParams, results: Results,
               out_dir: Path) -> ModelCard:
    """Fill `out_dir` with the LoRA files, images/ (validation renders, grid, loss.png) and README.md."""
    files = write_loras(results.lora, settings, out_dir)
    validation = json.loads((results.validation / "index.json").read_text(encoding="utf-8"))
    shutil.copytree(results.validation, out_dir / "images", ignore=shutil.ignore_patterns("index.json"))
    steps = results.steps
    plot.loss_curve([r["step"] for r in steps], [r["loss"] for r in steps]).save(out_dir / "images" / "loss.png")
    trigger = lora_file.read_metadata(results.lora).get("yem.instance_prompt", "")
    config = lora_file.adapter_config(results.lora)  # the shipped adapter's own rank, alpha and targets
    widget = [{"text": cell["prompt"], "output": {"url": f"images/lora/{cell['file']}"}}
              for cell in validation["cells"]]
    hub_base = model.id if HUB_ID.match(model.id) else None
    data = ModelCardData(license=settings.license, tags=TAGS, instance_prompt=trigger, widget=widget,
                         library_name="diffusers", pipeline_tag="text-to-image", base_model=hub_base,
                         base_model_relation="adapter" if hub_base else None)
    body = "\n".join([_intro(settings, trigger, validation), *_no_effect(results.metrics, validation), _files(files),
                      _usage(model, files, trigger), _training(model, train, config, results),
                      _hardware(results.metrics, validation)])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    card.save(out_dir / "README.md")
    return card


def write_loras(source: Path, settings: ExportParams, out_dir: Path) -> dict[str, str]:
    """The trained LoRA in each of `export.formats`; returns format -> file name in `out_dir`."""
    modules, metadata = export.read(source)
    metadata = {**metadata, "yem.name": settings.name, "yem.license": settings.license}
    files = {fmt: export.file_name(fmt, settings.name) for fmt in settings.formats}
    for fmt, name in files.items():
        export.write(modules, metadata, fmt, out_dir / name)
    return files


def _intro(settings: ExportParams, trigger: str, validation: dict) -> str:
    rows = " / ".join(validation["rows"])
    return f"""# {settings.name}

A DreamBooth LoRA for Stable Diffusion 3, trained with [yem](https://github.com/yem-project/yem) {__version__}.

**Trigger words:** `{trigger}` (the instance prompt it was trained on: use it, or its rare word, in your prompts)

![validation grid, rows {rows}: the same prompt and seed in each column](images/grid.png)

Rows of the grid: {rows} ("base" is the model without the LoRA, "step N" an intermediate adapter); each column
is one validation prompt and seed, rendered with the same starting noise in every row.
"""


def _no_effect(m: dict, validation: dict) -> list[str]:
    """A warning block when training or rendering found that this LoRA changes nothing measurable."""
    found = []
    if m.get("lora_effect") == "none":
        found.append(f"its held-out loss changed by {m['heldout_change']:+.3%} and no layer's weights by more than "
                     f"{m['lora_delta']:.1e} of their size")
    if not validation.get("lora_visible", True):
        found.append(f"its renders differ from the base model's by {validation['lora_change']:.2f} of 255 levels on "
                     f"average")
    if not found:
        return []
    return [f"> **Warning: this LoRA does nothing measurable**: {'; '.join(found)}. Train again with a higher "
            f"learning rate or more steps before sharing it.\n"]


def _files(files: dict[str, str]) -> str:
    rows = [(f"`{name}`", LAYOUTS[fmt]) for fmt, name in files.items()]
    return f"## Files\n\n{_table(rows, ('file', 'layout'))}\n"


def _usage(model: ModelParams, files: dict[str, str], trigger: str) -> str:
    load_id = model.id if HUB_ID.match(model.id) else "<path to the base model>"
    parts = ["## Use it\n"]
    if "diffusers" in files:
        parts.append(f"""With 🧨 diffusers:

```python
import torch
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained("{load_id}", torch_dtype=torch.float16).to("cuda")  # or "mps"
pipe.load_lora_weights("<this repo or folder>", weight_name="{files['diffusers']}")
image = pipe({trigger!r}, num_inference_steps=28, guidance_scale=7.0).images[0]
```
""")
    # yem's diffusers file carries its scale in B (alpha = rank), so ComfyUI's default scale of 1.0 reads it right
    comfy = files.get("comfyui") or files.get("kohya") or files.get("diffusers")
    if comfy:
        parts.append(f"In ComfyUI: copy `{comfy}` into `ComfyUI/models/loras/`, then add a *LoraLoaderModelOnly* "
                     f"node (\"LoraLoaderModelOnly\" in the node search) between the SD3 checkpoint loader and the "
                     f"sampler, pick the file, and start at `strength_model` 1.0. The LoRA changes the transformer "
                     f"only, so the CLIP input of *LoraLoader* is not needed.\n")
    if "kohya" in files:
        parts.append(f"`{files['kohya']}` uses kohya sd-scripts' SD3 layout, for tools built on it.\n")
    return "\n".join(parts)


def _training(model: ModelParams, train: TrainParams, config: dict, results: Results) -> str:
    m = results.metrics
    kinds = [sample_id.split("/", 1)[0] for sample_id in results.samples]
    base = model.id + (f" @ `{model.revision}`" if model.revision else "")
    rows = [("base model", base), ("instance images", kinds.count("instance")),
            ("class (prior) images", kinds.count("prior")), ("steps", m.get("steps")),
            ("resolution", m.get("resolution")), ("aspect-ratio buckets (images)", _buckets(m.get("buckets"))),
            ("rank / alpha", _rank_alpha(config, results)),
            ("target modules", ", ".join(sorted(config["target_modules"]))),
            ("learning rate", f"{train.learning_rate:g} ({train.lr_scheduler}, {train.lr_warmup_steps} warmup)"),
            ("batch × accumulation × devices", f"{m['batch_size']} × {m['gradient_accumulation']} × "
                                               f"{m['world_size']}"),
            ("gradient checkpointing", m["gradient_checkpointing"]), ("loss weighting", train.weighting_scheme),
            ("seed", train.seed), ("final / best loss", f"{_num(m.get('loss_final'))} / {_num(m.get('loss_best'))}")]
    return f"""## Training

{_table(rows)}

Held-out flow-matching loss (fixed noise and sigmas): {_num(m.get('heldout_loss_before'))} before,
{_num(m.get('heldout_loss_after'))} after training.

![training loss per step (grey) and its moving average (blue)](images/loss.png)
"""


def _buckets(sizes: dict | None) -> str:
    """ "832×1216 (5), 1024×1024 (3)": each bucket with its number of images, the fullest first."""
    ordered = sorted((sizes or {}).items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{label} ({count})" for label, count in ordered) or "n/a"


def _rank_alpha(config: dict, results: Results) -> str:
    """Rank and the alpha it was trained with; the file itself records alpha = rank, its scale folded into B."""
    trained = float(lora_file.read_metadata(results.lora).get("yem.alpha", config["lora_alpha"]))
    folded = " (scale folded into the weights: the file records alpha = rank)" if trained != config["r"] else ""
    return f"{config['r']} / {trained:g}{folded}"


def _hardware(m: dict, validation: dict) -> str:
    rows = [("device", f"{m.get('device_name')} ({m.get('backend')}, {m.get('dtype')})"), ("torch", m.get("torch")),
            ("seconds per step (median)", _num(m.get("s_per_step"))),
            ("peak memory", f"{_num(m.get('peak_memory_gib'))} GiB"), ("wall time", _duration(m.get("wall_s")))]
    rows += [(label, f"{_num(m[key])}{unit}") for key, (label, unit) in OPTIONAL_HARDWARE.items()
             if m.get(key) is not None]
    if m.get("loss_scale") is not None:  # fp16: the scaler's final scale and the overflows it skipped
        rows.append(("fp16 loss scale", f"{m['loss_scale']:g} ({m.get('loss_scale_skipped_steps')} overflowing "
                                        f"steps skipped)"))
    # operators MPS lacks ran on the CPU (should be none): in training, with their share of a sampled window
    rows.append(("CPU fallbacks in training", m.get("cpu_fallback_ops", "not recorded")))
    rows.append(("CPU fallbacks in rendering", ", ".join(validation.get("cpu_fallback_ops", [])) or "none"))
    return f"## Hardware\n\n{_table(rows)}\n"


def _table(rows: list[tuple[str, object]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])


def _num(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def push(dist: Path, repo_id: str, private: bool) -> str:
    """Upload `dist` to the Hub model repo `repo_id` (created if missing); return the repo's URL."""
    from huggingface_hub import HfApi, constants, errors, get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except errors.HFValidationError:
        raise YemError(f"--repo-id: not a Hub repo id (got {repo_id!r}). Use <user or org>/<name>.") from None
    if not (dist / "README.md").is_file():
        raise YemError(f"{dist}: no model card here. Build it first: dvc repro (or yem train).")
    ModelCard.load(dist / "README.md")  # a card the Hub cannot parse is not worth uploading
    if constants.HF_HUB_OFFLINE:
        raise YemError("HF_HUB_OFFLINE: set, so nothing can be uploaded (got HF_HUB_OFFLINE=1). Unset it and "
                       "rerun yem push.")
    token = get_token()
    if token is None:
        raise YemError("Hugging Face token: none found (no HF_TOKEN, no saved login). Run `hf auth login` with a "
                       "token that can write, or set HF_TOKEN, then rerun yem push.")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=dist, repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload LoRA trained with yem {__version__}")
    except errors.HfHubHTTPError as e:
        raise YemError(f"{repo_id}: the Hub refused the upload ({str(e).splitlines()[0]}). Check the repo id and "
                       f"that your token can write to it.") from None
    except (errors.HTTPError, OSError) as e:  # the HTTP client's transport errors: no network, DNS, proxy, TLS
        raise YemError(f"huggingface.co: cannot be reached ({type(e).__name__}: {e}). Check the network, then "
                       f"rerun yem push.") from None
    return str(url)

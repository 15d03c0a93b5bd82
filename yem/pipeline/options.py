"""What the one-liner (`yem train --model … --data …`) writes into params.yaml, checked before anything is written.

Each option sets one params.yaml key. A folder must exist when it is given (data, a local model), and is written
relative to the project when it lies inside it, so the project can move. Switching between the offline demo model
and a real one also brings the settings that suit it (a real model's own resolution, read from its config without
loading weights), unless they are given too. A new rank without an alpha leaves alpha null (it follows the rank); a
new prompt without validation prompts leaves them null (they follow the prompt). DEMO is the demo as params.yaml
ships it, which `yem reset` writes back (tests/test_one_program.py holds the two equal).
"""

from pathlib import Path
from typing import Any

from yem.errors import YemError
from yem.model import architecture, sd3

# The one-liner's options and the keys they set, to name both in a message.
OPTIONS = {"model.id": "--model", "data.instance_dir": "--data", "prompts.instance": "--prompt",
           "data.resolution": "--resolution", "train.batch_size": "--batch-size", "train.steps": "--steps",
           "train.rank": "--rank", "train.alpha": "--alpha", "train.learning_rate": "--lr",
           "prompts.validation": "--validation-prompt"}
REAL_MODEL = {"train.learning_rate": 1e-4, "train.steps": 500, "render.steps": 28, "render.guidance_scale": 7.0}
TINY_MODEL = {"train.learning_rate": 0.001, "train.steps": 120, "render.steps": 8, "render.guidance_scale": 5.0,
              "data.resolution": 128}
NATIVE_RESOLUTION = 1024  # every SD3 and SD3.5 model: what a model yem cannot read the config of trains at
DEMO = {"model.id": "tiny", "model.revision": None, "data.instance_dir": "data/instance",
        "prompts.instance": "a photo of sks dog", "train.batch_size": 1, "train.rank": 4, "train.alpha": None,
        "prompts.validation": None, **TINY_MODEL}


def updates(given: dict[str, Any], current_model: str, project: Path) -> dict[str, Any]:
    """The params.yaml values for the options `given` (dotted key -> value, None when not given), checked; the
    model's settings added when model.id switches between the demo model and a real one."""
    chosen = {key: value for key, value in given.items() if value is not None}
    if "train.rank" in chosen and "train.alpha" not in chosen:
        chosen["train.alpha"] = None  # null: alpha follows the rank, the same LoRA scale
    if "prompts.instance" in chosen and "prompts.validation" not in chosen:
        chosen["prompts.validation"] = None  # null: the rendered prompts follow the new instance prompt
    if "data.instance_dir" in chosen:
        chosen["data.instance_dir"] = _photos(Path(chosen["data.instance_dir"]), project)
    if "model.id" in chosen:
        chosen["model.id"] = _model(chosen["model.id"], project)
        if (chosen["model.id"] == "tiny") != (current_model == "tiny"):
            suited = TINY_MODEL if chosen["model.id"] == "tiny" else {
                **REAL_MODEL, "data.resolution": native_resolution(chosen["model.id"])}
            chosen = {**{k: v for k, v in suited.items() if k not in chosen}, **chosen}
    return chosen


def native_resolution(model_id: str) -> int:
    """The resolution `model_id` was trained at, from its config (downloaded or local) or yem's table of SD3 models,
    without loading weights; SD3's 1024 px for one yem cannot see yet."""
    try:
        return architecture.architecture_for(model_id).native_resolution
    except YemError:
        return NATIVE_RESOLUTION


def changes(updates: dict[str, Any], current: dict[str, dict]) -> list[str]:
    """One line per value that differs from params.yaml as it is (`current`, loaded): `key: old → new`."""
    lines = []
    for dotted, value in updates.items():
        old = value_in(current, dotted)
        if old != value:
            lines.append(f"params.yaml {dotted}: {_shown(old)} → {_shown(value)}")
    return lines


def value_in(loaded: dict, dotted: str) -> Any:
    """The value of `section.key` in params.yaml as loaded, or None where the file lacks it."""
    section, _, key = dotted.partition(".")
    values = loaded.get(section)
    return values.get(key) if isinstance(values, dict) else None


def _photos(folder: Path, project: Path) -> str:
    if not folder.expanduser().is_dir():
        what = "is a file, not a folder" if folder.expanduser().exists() else "no such folder"
        raise YemError(f"--data (data.instance_dir): {what} (got {folder}). Give the folder that holds your photos.")
    return _portable(folder, project)


def _model(given: str, project: Path) -> str:
    folder = Path(given).expanduser()
    if given == "tiny" or (not folder.exists() and sd3.is_hub_id(given) and not given.startswith((".", "/", "~"))):
        return given
    sd3.check_pipeline_folder(folder, given)  # names model.id and what to do
    return _portable(folder, project)


def _portable(folder: Path, project: Path) -> str:
    folder = folder.expanduser().resolve()
    return folder.relative_to(project).as_posix() if folder.is_relative_to(project) else str(folder)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)
